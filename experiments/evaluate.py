r"""Evaluate a trained few-shot learner on test episodes, clean or under attack.

  python -m experiments.evaluate --workdir=runs/maml_5w1s [--episodes=600 --seed=0]
  python -m experiments.evaluate --workdir=runs/maml_5w1s --epsilons=0.025,0.05,0.1 \
      --attacks=pgd,margin,apgd --norm=linf --attack_steps=20 --attack_target=query

Writes <workdir>/eval_<split>.json (or --output) with the mean accuracy and its
95% confidence interval. With --epsilons, the metrics are clean_accuracy and
robust_accuracy@<eps> (per-example worst case over --attacks), the attack
settings are recorded under "attack", and (unless --noplot)
<workdir>/robustness_<split>.png and <workdir>/adversarial_examples_<split>.png
are written.
"""

import dataclasses
import math
import pathlib

import jax
from absl import app, flags, logging

from advmaml import plots, robust_eval
from advmaml.checkpoint import CheckpointError
from advmaml.config import ConfigError
from advmaml.data.episodes import sample_episode
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
ATTACKS = flags.DEFINE_string(
    "attacks", "pgd,margin,apgd",
    "Comma list of attacks whose per-example worst case gives robust accuracy: pgd (PGD on "
    "cross-entropy), margin (PGD on the CW margin), apgd (APGD-DLR; APGD-CE if n_way < 3), fgsm.")
EPSILONS = flags.DEFINE_string(
    "epsilons", "", "Comma list of attack radii, e.g. 0.025,0.05,0.1 (pixels in [0, 1]); "
    "empty: clean accuracy only.")
NORM = flags.DEFINE_string("norm", "linf", "Threat model: linf or l2.")
ATTACK_STEPS = flags.DEFINE_integer("attack_steps", 20, "Iterations per attack restart (PGD, APGD).")
RESTARTS = flags.DEFINE_integer("restarts", 1, "Random restarts per attack.")
ATTACK_TARGET = flags.DEFINE_string(
    "attack_target", "query",
    "query: attack the query set after adapting on the clean support (evasion); support: "
    "perturb the support set before adaptation (poisoning); both: either or both.")
PLOT = flags.DEFINE_bool(
    "plot", None, "Write robustness_<split>.png and adversarial_examples_<split>.png next to "
    "the workdir's JSON (default: on when --epsilons is given).")


@dataclasses.dataclass(frozen=True)
class AttackSettings:
  names: tuple[str, ...]
  epsilons: tuple[float, ...]
  norm: str
  steps: int
  restarts: int
  target: str
  plot: bool


def _parse_list(flag: str, value: str) -> list[str]:
  items = [s.strip() for s in value.split(",")] if value.strip() else []
  if any(not s for s in items):
    raise app.UsageError(f"--{flag}={value!r} has an empty entry; give a comma list without blanks")
  return items


def attack_settings_from_flags() -> AttackSettings:
  """Checks the attack flags; bad values raise app.UsageError naming the flag."""
  names = tuple(_parse_list("attacks", ATTACKS.value))
  unknown = [n for n in names if n not in robust_eval.ATTACK_NAMES]
  if unknown:
    raise app.UsageError(f"--attacks: unknown {unknown}; choose from {robust_eval.ATTACK_NAMES}")
  if len(set(names)) != len(names):
    raise app.UsageError(f"--attacks={ATTACKS.value!r} names an attack twice")
  epsilons = []
  for s in _parse_list("epsilons", EPSILONS.value):
    try:
      eps = float(s)
    except ValueError:
      raise app.UsageError(f"--epsilons: {s!r} is not a number") from None
    if not math.isfinite(eps) or eps < 0:
      raise app.UsageError(f"--epsilons: {s!r} must be a finite number >= 0")
    epsilons.append(eps)
  if len(set(epsilons)) != len(epsilons):
    raise app.UsageError(f"--epsilons={EPSILONS.value!r} repeats a value")
  if epsilons and not names:
    raise app.UsageError("--attacks is empty but --epsilons asks for robust accuracy")
  if NORM.value not in robust_eval.NORMS:
    raise app.UsageError(f"--norm={NORM.value!r}; choose one of {robust_eval.NORMS}")
  if ATTACK_STEPS.value < 1:
    raise app.UsageError(f"--attack_steps={ATTACK_STEPS.value} must be at least 1")
  if RESTARTS.value < 1:
    raise app.UsageError(f"--restarts={RESTARTS.value} must be at least 1")
  if ATTACK_TARGET.value not in robust_eval.TARGETS:
    raise app.UsageError(f"--attack_target={ATTACK_TARGET.value!r}; choose one of {robust_eval.TARGETS}")
  if PLOT.value and not epsilons:
    raise app.UsageError("--plot needs --epsilons (the plots show accuracy against epsilon)")
  plot = bool(epsilons) if PLOT.value is None else PLOT.value
  return AttackSettings(names, tuple(epsilons), NORM.value, ATTACK_STEPS.value, RESTARTS.value,
                        ATTACK_TARGET.value, plot)


def _write_plots(run, splits, record, settings: AttackSettings, folder: pathlib.Path) -> list[str]:
  """The robustness curve and the attacked images of the first evaluation episode."""
  cfg, split = run.cfg, record["split"]
  curve = plots.plot_robustness_curve(
      record, folder / f"robustness_{split}.png", norm=settings.norm,
      title=f"{split}: {'+'.join(settings.names)}, target {settings.target}, step {run.step}")
  # The middle epsilon: the largest ones often give unreadable images.
  eps = sorted(settings.epsilons)[(len(settings.epsilons) - 1) // 2]
  cfgs = robust_eval.attack_sets(settings.names, (eps,), n_way=cfg.n_way, norm=settings.norm,
                                 steps=settings.steps, restarts=settings.restarts)[0]
  # Episode 0 of the evaluation, with its metric key, as evaluate_episodes draws it.
  sample_key, metric_key = jax.random.split(jax.random.fold_in(jax.random.key(record["seed"]), 0))
  episode = sample_episode(jax.numpy.asarray(splits[split].images), sample_key, cfg.n_way,
                           cfg.k_shot, cfg.eval_q_query)
  ex = jax.device_get(robust_eval.adversarial_examples(
      run.exp.learner, run.meta_params, episode, metric_key, inner_steps=record["inner_steps"],
      cfgs=cfgs, target=settings.target))
  grid = plots.plot_adversarial_grid(
      ex["clean_x"], ex["adv_x"], ex["y"], ex["clean_pred"], ex["adv_pred"],
      folder / f"adversarial_examples_{split}.png",
      title=f"{settings.target} attack, {settings.norm} epsilon {eps:g}")
  record["attack"]["examples_epsilon"] = eps
  return [str(curve), str(grid)]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if EPISODES.value is not None and EPISODES.value < 1:
    raise app.UsageError(f"--episodes={EPISODES.value} must be at least 1")
  settings = attack_settings_from_flags()  # before loading anything: fail fast
  try:
    run, splits = load_trained(WORKDIR.value, DATA_DIR.value)
    metric_fn = None
    if settings.epsilons:
      inner_steps = run.cfg.eval_inner_steps if INNER_STEPS.value is None else INNER_STEPS.value
      sets = robust_eval.attack_sets(settings.names, settings.epsilons, n_way=run.cfg.n_way,
                                     norm=settings.norm, steps=settings.steps,
                                     restarts=settings.restarts)
      metric_fn = robust_eval.make_metric_fn(
          settings.names, settings.epsilons, n_way=run.cfg.n_way, inner_steps=inner_steps,
          norm=settings.norm, steps=settings.steps, restarts=settings.restarts,
          target=settings.target)
    record = evaluate_trained(run, splits, split=SPLIT.value, num_episodes=EPISODES.value,
                              seed=SEED.value, inner_steps=INNER_STEPS.value, metric_fn=metric_fn)
  except (ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  workdir = pathlib.Path(WORKDIR.value)
  folder = workdir if workdir.is_dir() else workdir.parent
  output = OUTPUT.value or folder / f"eval_{SPLIT.value}.json"
  if not settings.epsilons:
    write_json(output, record)
    acc = record["metrics"]["accuracy"]
    logging.info("%s accuracy over %d episodes: %.2f%% +- %.2f%% (95%% CI); written to %s",
                 SPLIT.value, record["num_episodes"], 100 * acc["mean"], 100 * acc["ci95"], output)
    return
  record["attack"] = {
      "attacks": list(settings.names), "epsilons": list(settings.epsilons), "norm": settings.norm,
      "steps": settings.steps, "restarts": settings.restarts, "target": settings.target,
      "configs": {robust_eval.metric_key(cfgs[0].epsilon): [dataclasses.asdict(c) for c in cfgs]
                  for cfgs in sets}}
  if settings.plot:
    record["plots"] = _write_plots(run, splits, record, settings, folder)
  write_json(output, record)
  clean = record["metrics"]["clean_accuracy"]
  logging.info("%s clean accuracy over %d episodes: %.2f%% +- %.2f%% (95%% CI)",
               SPLIT.value, record["num_episodes"], 100 * clean["mean"], 100 * clean["ci95"])
  for eps in settings.epsilons:
    rob = record["metrics"][robust_eval.metric_key(eps)]
    logging.info("  %s robust accuracy at %s epsilon %g: %.2f%% +- %.2f%%", settings.target,
                 settings.norm, eps, 100 * rob["mean"], 100 * rob["ci95"])
  logging.info("written to %s", output)


if __name__ == "__main__":
  app.run(main)
