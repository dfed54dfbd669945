"""TensorBoard scalars of a training run, beside ``metrics.jsonl``, and of its evaluations.

Written with tensorboardX (event files in ``<workdir>/tensorboard/``; no
TensorFlow needed to write or to view them with ``tensorboard --logdir``).
Every numeric field of a metrics record becomes the scalar ``<split>/<field>``
(``train/loss``, ``train/steps_per_sec``, ``train/adv_accuracy``,
``val/accuracy``, ...), at the record's step.

A resumed run continues from its checkpoint's step, so the points a killed run
wrote after that step are written again. Each writer therefore opens its event
file with a ``purge_step`` one past the step it starts from: TensorBoard then
drops the earlier files' points at or past it, and shows one line without
duplicates or steps going back, as ``metrics.jsonl`` (truncated to the same
step) reads.

An evaluation of one of the run's checkpoints (``experiments.evaluate``,
``experiments.evaluate_lake``) writes its scalars at the checkpoint's step
into a new event file of its own, in ``<workdir>/tensorboard/evaluation/``:
TensorBoard shows it as a run of its own, and the training's folder, which
TensorBoard follows file by file while the run still appends to its last
one, gets no file from it. That file has no ``purge_step`` (it would hide the
training's points past the evaluated step), so a repeated evaluation adds a
second point at its step.
"""

from __future__ import annotations

import math
import numbers
import pathlib
import time

FOLDER = "tensorboard"
EVAL_FOLDER = f"{FOLDER}/evaluation"


class ScalarWriter:
  """Writes metrics records as TensorBoard scalars; a no-op when ``enabled`` is False.

  start_step: the step a training (re)starts from (its file purges later steps);
  None: no purge (an evaluation's file). folder: relative to ``workdir``.
  """

  def __init__(self, workdir: str | pathlib.Path, start_step: int | None, enabled: bool = True,
               *, folder: str = FOLDER):
    self._writer = None
    if enabled:
      from tensorboardX import SummaryWriter  # local: only runs that write events import it
      # The step resumed from was logged (or not) before its checkpoint: keep it.
      # tensorboardX names the file by the second it opens it and truncates an existing
      # one: a restart within the same second would erase the run's file. The suffix
      # keeps the names unique and in the order TensorBoard reads them (by name).
      self._writer = SummaryWriter(str(pathlib.Path(workdir) / folder),
                                   purge_step=None if start_step is None else start_step + 1,
                                   flush_secs=30, filename_suffix=f".{time.time_ns()}")

  def write(self, record: dict, **extra: float) -> None:
    """``record``: one metrics.jsonl record (``step``, ``split``, numeric fields);
    ``extra``: more scalars of the same split and step (the learning rates)."""
    if self._writer is None:
      return
    from tensorboardX.proto.summary_pb2 import Summary
    step, split = int(record["step"]), record.get("split", "train")
    values = [Summary.Value(tag=f"{split}/{name}", simple_value=float(value))
              for name, value in {**record, **extra}.items()
              if name not in ("step", "split") and not isinstance(value, bool)
              and isinstance(value, numbers.Real) and math.isfinite(value)]
    # One Summary proto rather than add_scalar: tensorboardX's add_scalar rewrites tags to
    # TF node names ("robust_accuracy@0.1" -> "robust_accuracy_0.1"), which TensorBoard
    # does not need; the tags keep metrics.jsonl's and the JSON records' names.
    if values:
      self._writer.file_writer.add_summary(Summary(value=values), step)
    self._writer.flush()   # once per log line: cheap, and a killed run keeps its points

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self) -> "ScalarWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def evaluation_prefix(split: str) -> str:
  """The tag prefix of an evaluation on ``split``: ``test``, and ``eval_train`` and
  ``eval_val`` for the splits whose names the training's own scalars use."""
  return f"eval_{split}" if split in ("train", "val") else split


def write_evaluation(workdir: str | pathlib.Path, step: int, prefix: str,
                     scalars: dict) -> pathlib.Path:
  """One evaluation's scalars {name: value} as ``<prefix>/<name>`` at ``step``, in a new
  event file in ``<workdir>/tensorboard/evaluation/``; returns that folder."""
  with ScalarWriter(workdir, None, folder=EVAL_FOLDER) as writer:
    writer.write({"step": step, "split": prefix, **scalars})
  return pathlib.Path(workdir) / EVAL_FOLDER
