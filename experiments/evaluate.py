r"""Evaluate a trained few-shot learner on test episodes.

  python -m experiments.evaluate --workdir=runs/maml_5w1s [--episodes=600 --seed=0]

Writes <workdir>/eval_<split>.json (or --output) with the mean accuracy and its
95% confidence interval.
"""

import pathlib

from absl import app, flags, logging

from advmaml.checkpoint import CheckpointError
from advmaml.config import ConfigError
from advmaml.data.omniglot import DataError
from advmaml.trained_runs import evaluate_trained, load_trained, write_json

WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir, or a checkpoint folder/file.",
                              required=True)
SPLIT = flags.DEFINE_string("split", "test", "Class split to evaluate on: train, val or test.")
EPISODES = flags.DEFINE_integer("episodes", None, "Number of episodes (default: the run's test_episodes, 600).")
SEED = flags.DEFINE_integer("seed", 0, "Seed of the evaluation episodes.")
INNER_STEPS = flags.DEFINE_integer("inner_steps", None, "Adaptation steps (default: the run's eval_inner_steps).")
DATA_DIR = flags.DEFINE_string("data_dir", None, "Data folder, if not the one the run was trained with.")
OUTPUT = flags.DEFINE_string("output", None, "JSON output path (default <workdir>/eval_<split>.json).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if EPISODES.value is not None and EPISODES.value < 1:
    raise app.UsageError(f"--episodes={EPISODES.value} must be at least 1")
  try:
    run, splits = load_trained(WORKDIR.value, DATA_DIR.value)
    record = evaluate_trained(run, splits, split=SPLIT.value, num_episodes=EPISODES.value,
                              seed=SEED.value, inner_steps=INNER_STEPS.value)
  except (ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  workdir = pathlib.Path(WORKDIR.value)
  output = OUTPUT.value or (workdir if workdir.is_dir() else workdir.parent) / f"eval_{SPLIT.value}.json"
  write_json(output, record)
  acc = record["metrics"]["accuracy"]
  logging.info("%s accuracy over %d episodes: %.2f%% +- %.2f%% (95%% CI); written to %s",
               SPLIT.value, record["num_episodes"], 100 * acc["mean"], 100 * acc["ci95"], output)


if __name__ == "__main__":
  app.run(main)
