r"""Meta-train a few-shot learner.

  python -m experiments.train --preset=omniglot_5w1s --workdir=runs/maml_5w1s \
      --data_dir=../shared/data/omniglot

Running again with the same --workdir resumes from its newest checkpoint.
"""

from absl import app, flags, logging

from advmaml.config import ConfigError
from advmaml.data.omniglot import DataError
from advmaml.training import train
from experiments import config_flags

WORKDIR = flags.DEFINE_string("workdir", None, "Folder for config, metrics and checkpoints.",
                              required=True)
config_flags.define_config_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    cfg = config_flags.config_from_flags()
    logging.info("Config:\n%s", cfg.to_json())
    train(cfg, WORKDIR.value)
  except (ConfigError, DataError) as e:
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  app.run(main)
