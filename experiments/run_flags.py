"""absl flags naming a trained run and its evaluation episodes, shared by evaluate and certify.

Episode i of ``--seed`` is the same in both (advmaml.eval.evaluation), so their
numbers are for the same episodes.
"""

from __future__ import annotations

from absl import app, flags

WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir, or a checkpoint folder/file.",
                              required=True)
SPLIT = flags.DEFINE_enum("split", "test", ["train", "val", "test"], "Class split to evaluate on.")
EPISODES = flags.DEFINE_integer("episodes", None, "Number of episodes (default: the run's test_episodes, 600).")
SEED = flags.DEFINE_integer("seed", 0, "Seed of the evaluation episodes.")
INNER_STEPS = flags.DEFINE_integer("inner_steps", None, "Adaptation steps (default: the run's eval_inner_steps).")
DATA_DIR = flags.DEFINE_string("data_dir", None, "Data folder, if not the one the run was trained with.")
NUM_DEVICES = flags.DEFINE_integer(
    "num_devices", 0, "Devices the episodes are split over (0: all local devices). "
    "Results do not depend on it.")


def check_run_flags() -> None:
  """Bad --episodes or --inner_steps raise app.UsageError naming the flag."""
  if EPISODES.value is not None and EPISODES.value < 1:
    raise app.UsageError(f"--episodes={EPISODES.value} must be at least 1")
  if INNER_STEPS.value is not None and INNER_STEPS.value < 0:
    raise app.UsageError(f"--inner_steps={INNER_STEPS.value} must be >= 0 (0: no adaptation)")
