r"""Meta-train a few-shot learner.

  python -m experiments.train --preset=omniglot_5w1s --workdir=runs/maml_5w1s \
      --data_dir=../shared/data/omniglot

Running again with the same --workdir resumes from its newest checkpoint.
"""

# First, before anything imports JAX: the host device count is fixed when JAX starts.
from advmaml.runtime import host
HOST_DEVICES = host.use_all_cpu_cores()

import jax
from absl import app, flags, logging

from advmaml.config import validate
from advmaml.train.training import train
from experiments import cli, config_flags
from experiments.tensorboard_flag import TENSORBOARD

WORKDIR = flags.DEFINE_string("workdir", None, "Folder for config, metrics and checkpoints.",
                              required=True)
COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: host:port of process 0; with --num_processes and "
    "--process_id calls jax.distributed.initialize (on TPU pods and SLURM, the flag "
    "--distributed alone lets JAX find them).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with "
                                "settings detected from the cluster environment.")
config_flags.define_config_flags()


def _main():
  logging.info(HOST_DEVICES)
  if COORDINATOR.value or DISTRIBUTED.value:
    jax.distributed.initialize(coordinator_address=COORDINATOR.value,
                               num_processes=NUM_PROCESSES.value, process_id=PROCESS_ID.value)
  cfg = config_flags.config_from_flags()
  validate(cfg)   # before the config is printed: NaN is refused, not printed
  logging.info("Config:\n%s", cfg.to_json())
  train(cfg, WORKDIR.value, trust_unverified=cli.TRUST_UNVERIFIED.value,
        tensorboard=TENSORBOARD.value)


main = cli.entry_point(_main)

if __name__ == "__main__":
  app.run(main)
