r"""Score a meta-learner on Lake et al.'s 20 one-shot classification runs.

  python -m experiments.evaluate_lake --runs=all_runs.zip --workdir=runs/lake_20w1s \
      [--epsilons=0.05,0.1 --attacks=pgd,margin,apgd]

The model must have been meta-trained on the background alphabets only
(--split=lake) and be 20-way. Writes <workdir>/eval_lake_runs.json (or --output)
with the error rate of every run and the mean, clean and under attack. The runs
are split over --num_devices (default: all local devices, on CPU one per usable
core); a long scoring logs progress lines. Given a training workdir, the mean
errors are also TensorBoard scalars at the checkpoint's step (lake/error, or
lake/clean_error and lake/robust_error@<eps>) in <workdir>/tensorboard/evaluation/
(--notensorboard: not).
"""

# First, before anything imports JAX: the host device count is fixed when JAX starts.
from advmaml.runtime import host
HOST_DEVICES = host.use_all_cpu_cores()

import jax
from absl import app, flags, logging

from advmaml.data.lake_runs import load_lake_runs
from advmaml.eval.lake_eval import as_float_episodes, check_model_fits_lake, evaluate_lake
from advmaml.eval.trained_runs import (check_outputs_finite, evaluation_mesh, load_checkpointed_run,
                                  test_learner, write_json)
from experiments.attack_flags import attack_record, attack_settings_from_flags, metric_fn_from_settings
from experiments import cli, tensorboard_flag

RUNS = flags.DEFINE_string("runs", None, "Lake's all_runs.zip, or the folder it extracts to.",
                           required=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir, or a checkpoint folder/file.",
                              required=True)
SEED = flags.DEFINE_integer("seed", 0, "Seed of the attacks' random starts.")
INNER_STEPS = flags.DEFINE_integer("inner_steps", None, "Adaptation steps (default: the run's eval_inner_steps).")
OUTPUT = flags.DEFINE_string("output", None, "JSON output path (default <workdir>/eval_lake_runs.json).")
NUM_DEVICES = flags.DEFINE_integer(
    "num_devices", 0, "Devices the runs are split over (0: all local devices). "
    "Results do not depend on it.")


def _main():
  logging.info(HOST_DEVICES)
  if INNER_STEPS.value is not None and INNER_STEPS.value < 0:
    raise app.UsageError(f"--inner_steps={INNER_STEPS.value} must be >= 0 (0: no adaptation)")
  settings = attack_settings_from_flags()
  run = load_checkpointed_run(WORKDIR.value, trust_unverified=cli.TRUST_UNVERIFIED.value)
  cfg = run.cfg
  check_model_fits_lake(cfg)   # before decoding the runs: fail fast
  mesh = evaluation_mesh(NUM_DEVICES.value, "Lake's runs")
  runs, names = load_lake_runs(RUNS.value, image_size=cfg.image_size)
  inner_steps = cfg.eval_inner_steps if INNER_STEPS.value is None else INNER_STEPS.value
  metric_fn = metric_fn_from_settings(settings, cfg.n_way)
  learner = test_learner(cfg, inner_steps=inner_steps,
                         num_devices=mesh.devices.size)   # kernels sized per device
  check_outputs_finite(run, jax.tree.map(lambda x: x[0], as_float_episodes(runs)), learner)
  record = evaluate_lake(learner, run.meta_params, cfg, runs, names, inner_steps=inner_steps,
                         metric_fn=metric_fn, seed=SEED.value, mesh=mesh)
  record.update(checkpoint=run.source, step=run.step, runs_file=str(RUNS.value))
  if settings.epsilons:
    record["attack"] = attack_record(settings, cfg.n_way)
  output = cli.output_path(WORKDIR.value, OUTPUT.value, "eval_lake_runs.json")
  write_json(output, record)
  # Errors, as printed: lake/error (clean), lake/clean_error, lake/robust_error@<eps>, ...
  tensorboard_flag.write_evaluation_scalars(
      WORKDIR.value, run.step, "lake",
      {name.replace("accuracy", "error"): stats["mean"]
       for name, stats in record["mean_error"].items()})
  for name, stats in record["mean_error"].items():
    logging.info("%s error over %d runs: %.2f%% +- %.2f%%", name, stats["n"], 100 * stats["mean"],
                 100 * stats["ci95"])
  logging.info("written to %s", output)


main = cli.entry_point(_main)

if __name__ == "__main__":
  app.run(main)
