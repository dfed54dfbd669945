"""--tensorboard, shared by train, evaluate and evaluate_lake.

Training writes its logged metrics in ``<workdir>/tensorboard/``; an evaluation
of a training workdir writes its scalars, at the evaluated checkpoint's step,
in ``<workdir>/tensorboard/evaluation/`` (``advmaml.io.tensorboard_scalars``).
"""

from __future__ import annotations

import os

from absl import flags, logging

from advmaml.io import tensorboard_scalars
from advmaml.io.workdir import describe_os_error, is_training_workdir

TENSORBOARD = flags.DEFINE_bool(
    "tensorboard", True, "Also write the metrics as TensorBoard scalars (tensorboardX): "
    "training's in <workdir>/tensorboard/, an evaluation's (of a training --workdir, at its "
    "checkpoint's step) in <workdir>/tensorboard/evaluation/.")


def write_evaluation_scalars(workdir: str | os.PathLike, step: int, prefix: str,
                             scalars: dict) -> None:
  """Writes an evaluation's {name: value} as ``<prefix>/<name>`` if --tensorboard and
  ``workdir`` is a training workdir (a bare checkpoint has no run to show them with)."""
  if not TENSORBOARD.value:
    return
  if not is_training_workdir(workdir):
    logging.info("No TensorBoard scalars: --workdir=%s is a checkpoint, not a training workdir",
                 workdir)
    return
  try:
    folder = tensorboard_scalars.write_evaluation(workdir, step, prefix, scalars)
  except OSError as e:
    # The JSON, the result, is written (perhaps to --output, beside a workdir one may only
    # read): a warning, not a failed command.
    logging.warning("TensorBoard scalars not written: %s", describe_os_error(e))
    return
  logging.info("TensorBoard scalars %s/... at step %d written to %s", prefix, step, folder)
