r"""Certified L2 accuracy of a trained few-shot learner by randomized smoothing.

  python -m experiments.certify --workdir=runs/maml_5w1s --sigma=0.25 \
      --radii=0.125,0.25,0.5 [--n0=100 --n=1000 --alpha=0.001 --episodes=600 --seed=0]

Episode i is the one ``experiments.evaluate --seed`` draws (advmaml.eval.evaluation);
the learner adapts on its clean support set and every query example is
certified by Cohen et al.'s CERTIFY (advmaml.eval.smoothing). Writes
<workdir>/certify_<split>.json (or --output): certified_accuracy@<r> per radius,
smoothed_accuracy, abstention_rate, mean_certified_radius and clean_accuracy,
each with its 95% interval over episodes, and the settings under "certify".
"""

# First, before anything imports JAX: the host device count is fixed when JAX starts.
from advmaml.runtime import host
HOST_DEVICES = host.use_all_cpu_cores()

import dataclasses
import math

from absl import app, flags, logging

from advmaml.eval import smoothing
from advmaml.eval.robust_eval import metric_key
from advmaml.eval.trained_runs import evaluate_trained, load_trained, write_json
from experiments import cli, run_flags
from experiments.run_flags import (DATA_DIR, EPISODES, INNER_STEPS, NUM_DEVICES, SEED, SPLIT,
                                   WORKDIR)

OUTPUT = flags.DEFINE_string("output", None, "JSON output path (default <workdir>/certify_<split>.json).")
SIGMA = flags.DEFINE_float("sigma", 0.25, "Standard deviation of the smoothing noise (pixels in [0, 1]).")
RADII = flags.DEFINE_string(
    "radii", "0.125,0.25,0.5", "Comma list of L2 radii to report certified accuracy at (at "
    "most sigma * Phi^-1(alpha^(1/n)) can be certified: 0.616 for the defaults).")
N0 = flags.DEFINE_integer("n0", 100, "Noise samples that choose each example's class.")
N = flags.DEFINE_integer("n", 1000, "Noise samples that bound its probability.")
ALPHA = flags.DEFINE_float("alpha", 0.001, "Failure probability of each certificate, in (0, 1).")
SAMPLE_BATCH = flags.DEFINE_integer(
    "sample_batch", 100, "Noisy copies of a query batch vmapped together (memory, not results).")
EPISODE_BATCH = flags.DEFINE_integer(
    "episode_batch", 0, "Episodes per jitted call (0: the run's eval_batch_tasks); with "
    "--sample_batch it bounds memory, not results.")


def config_from_flags() -> smoothing.SmoothingConfig:
  """Checks the flags; bad values raise app.UsageError naming the flag."""
  if not (math.isfinite(SIGMA.value) and SIGMA.value > 0):
    raise app.UsageError(f"--sigma={SIGMA.value} must be a noise level > 0, e.g. 0.25")
  for flag in (N0, N, SAMPLE_BATCH):
    if flag.value < 1:
      raise app.UsageError(f"--{flag.name}={flag.value} must be at least 1")
  if not 0 < ALPHA.value < 1:
    raise app.UsageError(f"--alpha={ALPHA.value} must be in (0, 1), e.g. 0.001")
  run_flags.check_run_flags()
  if EPISODE_BATCH.value < 0:
    raise app.UsageError(f"--episode_batch={EPISODE_BATCH.value} must be >= 0 (0: the run's)")
  if not RADII.value.strip():
    raise app.UsageError("--radii is empty; give a comma list of L2 radii, e.g. 0.125,0.25,0.5")
  cfg = smoothing.SmoothingConfig(sigma=SIGMA.value, n0=N0.value, n=N.value, alpha=ALPHA.value,
                                  batch=SAMPLE_BATCH.value, radii=cli.parse_radii("radii", RADII.value))
  if cfg.max_radius() == 0:
    need = math.ceil(math.log(ALPHA.value) / math.log(0.5)) + 1
    raise app.UsageError(f"--n={N.value} with --alpha={ALPHA.value}: even {N.value} hits out of "
                         f"{N.value} bound the class probability at or below 1/2, so every "
                         f"example would abstain; use --n={need} or more")
  return cfg


def _main():
  logging.info(HOST_DEVICES)
  cfg = config_from_flags()   # before loading anything: fail fast
  beyond = [r for r in cfg.radii if r > cfg.max_radius()]
  if beyond:
    logging.warning("--radii %s exceed %.3f, the largest radius --n=%d samples at --sigma=%g and "
                    "--alpha=%g can certify: their certified accuracy is 0 by construction; raise "
                    "--n or --sigma", ",".join(f"{r:g}" for r in beyond), cfg.max_radius(), cfg.n,
                    cfg.sigma, cfg.alpha)
  run, splits = load_trained(WORKDIR.value, DATA_DIR.value,
                             trust_unverified=cli.TRUST_UNVERIFIED.value)
  if EPISODE_BATCH.value:
    run = dataclasses.replace(run, cfg=run.cfg.replace(eval_batch_tasks=EPISODE_BATCH.value))
  record = evaluate_trained(run, splits, split=SPLIT.value, num_episodes=EPISODES.value,
                            seed=SEED.value, inner_steps=INNER_STEPS.value,
                            metric_fn=smoothing.make_metric_fn(cfg),
                            num_devices=NUM_DEVICES.value)
  record["certify"] = {"sigma": cfg.sigma, "radii": list(cfg.radii), "n0": cfg.n0, "n": cfg.n,
                       "alpha": cfg.alpha, "sample_batch": cfg.batch, "norm": "l2",
                       "max_certifiable_radius": cfg.max_radius()}
  output = cli.output_path(WORKDIR.value, OUTPUT.value, f"certify_{SPLIT.value}.json")
  write_json(output, record)
  m = record["metrics"]
  logging.info("%s over %d episodes, sigma %g: clean %.2f%%, smoothed %.2f%% +- %.2f%%, "
               "abstained %.2f%%", SPLIT.value, record["num_episodes"], cfg.sigma,
               100 * m["clean_accuracy"]["mean"], 100 * m["smoothed_accuracy"]["mean"],
               100 * m["smoothed_accuracy"]["ci95"], 100 * m["abstention_rate"]["mean"])
  for r in cfg.radii:
    acc = m[metric_key(r, "certified_accuracy")]
    logging.info("  certified L2 accuracy at radius %g: %.2f%% +- %.2f%%", r, 100 * acc["mean"],
                 100 * acc["ci95"])
  logging.info("written to %s", output)


main = cli.entry_point(_main)

if __name__ == "__main__":
  app.run(main)
