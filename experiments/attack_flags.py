"""absl flags for attacks at evaluation time, shared by evaluate and evaluate_lake."""

from __future__ import annotations

import dataclasses
import math

from absl import app, flags

from advmaml import robust_eval

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
  if NORM.value == "linf" and any(eps > 1 for eps in epsilons):
    raise app.UsageError(f"--epsilons={EPSILONS.value!r}: an L-inf radius above 1 covers the "
                         "whole [0, 1] pixel range; use radii in [0, 1]")
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




def metric_fn_from_settings(settings: AttackSettings, n_way: int, inner_steps: int):
  """The per-episode metric: None (clean accuracy) without epsilons, else clean + robust."""
  if not settings.epsilons:
    return None
  return robust_eval.make_metric_fn(
      settings.names, settings.epsilons, n_way=n_way, inner_steps=inner_steps,
      norm=settings.norm, steps=settings.steps, restarts=settings.restarts, target=settings.target)


def attack_record(settings: AttackSettings, n_way: int) -> dict:
  """The attack settings as written into an evaluation's JSON."""
  sets = robust_eval.attack_sets(settings.names, settings.epsilons, n_way=n_way,
                                 norm=settings.norm, steps=settings.steps, restarts=settings.restarts)
  return {"attacks": list(settings.names), "epsilons": list(settings.epsilons),
          "norm": settings.norm, "steps": settings.steps, "restarts": settings.restarts,
          "target": settings.target,
          "configs": {robust_eval.metric_key(cfgs[0].epsilon): [dataclasses.asdict(c) for c in cfgs]
                      for cfgs in sets}}
