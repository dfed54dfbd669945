"""TensorBoard scalars of a training run, beside ``metrics.jsonl``.

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
"""

from __future__ import annotations

import math
import numbers
import pathlib
import time

FOLDER = "tensorboard"


class ScalarWriter:
  """Writes metrics records as TensorBoard scalars; a no-op when ``enabled`` is False."""

  def __init__(self, workdir: str | pathlib.Path, start_step: int, enabled: bool = True):
    self._writer = None
    if enabled:
      from tensorboardX import SummaryWriter  # local: only runs that write events import it
      # The step resumed from was logged (or not) before its checkpoint: keep it.
      # tensorboardX names the file by the second it opens it and truncates an existing
      # one: a restart within the same second would erase the run's file. The suffix
      # keeps the names unique and in the order TensorBoard reads them (by name).
      self._writer = SummaryWriter(str(pathlib.Path(workdir) / FOLDER),
                                   purge_step=start_step + 1, flush_secs=30,
                                   filename_suffix=f".{time.time_ns()}")

  def write(self, record: dict, **extra: float) -> None:
    """``record``: one metrics.jsonl record (``step``, ``split``, numeric fields);
    ``extra``: more scalars of the same split and step (the learning rates)."""
    if self._writer is None:
      return
    step, split = int(record["step"]), record.get("split", "train")
    for name, value in {**record, **extra}.items():
      if name in ("step", "split") or isinstance(value, bool):
        continue
      if isinstance(value, numbers.Real) and math.isfinite(value):
        self._writer.add_scalar(f"{split}/{name}", float(value), step)
    self._writer.flush()   # once per log line: cheap, and a killed run keeps its points

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self) -> "ScalarWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
