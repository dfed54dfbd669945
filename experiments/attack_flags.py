"""absl flags for attacks at evaluation time, shared by evaluate and evaluate_lake."""

from __future__ import annotations

import dataclasses

from absl import app, flags

from advmaml.eval import robust_eval
from experiments import cli

# Budgets by name; flags given explicitly override them.
PRESETS = {
    "fast": dict(attacks="pgd,margin,apgd", attack_steps=20, restarts=1),
    "strong": dict(attacks="pgd,margin,apgd", attack_steps=100, restarts=5),
    "autoattack": dict(attacks="autoattack", attack_steps=100, restarts=1),
}
ATTACK_PRESET = flags.DEFINE_enum(
    "attack_preset", "fast", list(PRESETS),
    "Attack budget by name: fast (pgd,margin,apgd, 20 steps, 1 restart), strong (the same with "
    "100 steps and 5 restarts), autoattack (AutoAttack's standard version: 100 steps, 1 restart "
    "per target, Square with --square_queries). --attacks, --attack_steps and --restarts given "
    "explicitly override the preset.")
ATTACKS = flags.DEFINE_string(
    "attacks", "pgd,margin,apgd",
    "Comma list of attacks whose per-example worst case gives robust accuracy: pgd (PGD on "
    "cross-entropy), margin (PGD on the CW margin), apgd (APGD-DLR; APGD-CE if n_way < 3), fgsm, "
    "autoattack (APGD-CE, APGD-T, FAB-T, Square in turn; query attacks).")
SQUARE_QUERIES = flags.DEFINE_integer("square_queries", 5000,
                                      "Query budget of AutoAttack's Square attack.")
EPSILONS = flags.DEFINE_string(
    "epsilons", "", "Comma list of attack radii, e.g. 0.025,0.05,0.1 (pixels in [0, 1]); "
    "empty: clean accuracy only.")
NORM = flags.DEFINE_enum("norm", "linf", list(robust_eval.NORMS), "Threat model.")
ATTACK_STEPS = flags.DEFINE_integer("attack_steps", 20, "Iterations per attack restart (PGD, APGD).")
RESTARTS = flags.DEFINE_integer("restarts", 1, "Random restarts per attack.")
ATTACK_TARGET = flags.DEFINE_enum(
    "attack_target", "query", list(robust_eval.TARGETS),
    "query: attack the query set after adapting on the clean support (evasion); support: "
    "perturb the support set before adaptation (poisoning); both: either or both.")
PER_EXAMPLE = flags.DEFINE_bool(
    "per_example", True,
    "Also attack every query example alone: for each one, the --per_example_attacks ascend its "
    "loss while perturbing the whole query batch, whose batch-norm statistics couple the "
    "queries. Robust accuracy then counts those batches too; the summed-loss attacks' number is "
    "written beside it as summed_robust_accuracy@<eps>. Query attacks only (off for "
    "--attack_target=support). --noper_example: summed-loss attacks only.")
PER_EXAMPLE_ATTACKS = flags.DEFINE_string(
    "per_example_attacks", "margin,apgd",
    "Comma list of the attacks aimed at each query example (names as in --attacks but "
    "autoattack; the same steps and restarts).")
PER_EXAMPLE_CHUNK = flags.DEFINE_integer(
    "per_example_chunk", 0,
    "Aimed attacks vmapped together (0: all N*Q of an episode at once); smaller uses less "
    "memory, same results.")
ATTACK_ALONE = flags.DEFINE_bool(
    "attack_alone", False,
    "Also the non-transductive threat model: each query attacked by itself with the other "
    "queries left clean (the gradient attacks of --attacks), reported as "
    "alone_robust_accuracy@<eps> beside the joint robust_accuracy@<eps>. Query attacks only.")
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
  per_example: tuple[str, ...] = ()   # attacks aimed at each query example; () off
  per_example_chunk: int = 0
  square_queries: int = 5000
  preset: str = "fast"
  alone: bool = False                 # also each query attacked with the others clean


def _attack_names(flag, value=None) -> tuple[str, ...]:
  value = flag.value if value is None else value
  names = tuple(cli.parse_list(flag.name, value))
  unknown = [n for n in names if n not in robust_eval.ATTACK_NAMES]
  if unknown:
    raise app.UsageError(f"--{flag.name}: unknown {unknown}; choose from {robust_eval.ATTACK_NAMES}")
  if len(set(names)) != len(names):
    raise app.UsageError(f"--{flag.name}={value!r} names an attack twice")
  return names


def _per_example_names(target: str) -> tuple[str, ...]:
  """The aimed attacks the flags ask for: () when off or without a query attack."""
  names = _attack_names(PER_EXAMPLE_ATTACKS)
  if "autoattack" in names:
    raise app.UsageError("--per_example_attacks cannot aim autoattack at one example; name "
                         "gradient attacks (e.g. margin,apgd)")
  if PER_EXAMPLE_CHUNK.value < 0:
    raise app.UsageError(f"--per_example_chunk={PER_EXAMPLE_CHUNK.value} must be >= 0 (0: all at once)")
  if not PER_EXAMPLE.value:
    return ()
  if target == "support":
    if not flags.FLAGS["per_example"].using_default_value:
      raise app.UsageError("--per_example attacks the query set, which --attack_target=support "
                           "leaves clean; drop --per_example or attack the query set")
    return ()
  if not names:
    raise app.UsageError("--per_example_attacks is empty; name attacks or pass --noper_example")
  return names


def _preset_value(flag):
  """The flag's value, or the preset's where the flag was not given."""
  preset = PRESETS[ATTACK_PRESET.value]
  if not flags.FLAGS[flag.name].using_default_value or flag.name not in preset:
    return flag.value
  return preset[flag.name]


def attack_settings_from_flags() -> AttackSettings:
  """Checks the attack flags; bad values raise app.UsageError naming the flag."""
  if ATTACK_PRESET.value not in PRESETS:
    raise app.UsageError(f"--attack_preset={ATTACK_PRESET.value!r}; choose one of {tuple(PRESETS)}")
  names = _attack_names(ATTACKS, _preset_value(ATTACKS))
  steps, restarts = _preset_value(ATTACK_STEPS), _preset_value(RESTARTS)
  epsilons = cli.parse_radii("epsilons", EPSILONS.value)
  if epsilons and not names:
    raise app.UsageError("--attacks is empty but --epsilons asks for robust accuracy")
  if NORM.value not in robust_eval.NORMS:
    raise app.UsageError(f"--norm={NORM.value!r}; choose one of {robust_eval.NORMS}")
  if NORM.value == "linf" and any(eps > 1 for eps in epsilons):
    raise app.UsageError(f"--epsilons={EPSILONS.value!r}: an L-inf radius above 1 covers the "
                         "whole [0, 1] pixel range; use radii in [0, 1]")
  if steps < 1:
    raise app.UsageError(f"--attack_steps={steps} must be at least 1")
  if restarts < 1:
    raise app.UsageError(f"--restarts={restarts} must be at least 1")
  if ATTACK_TARGET.value not in robust_eval.TARGETS:
    raise app.UsageError(f"--attack_target={ATTACK_TARGET.value!r}; choose one of {robust_eval.TARGETS}")
  if SQUARE_QUERIES.value < 1:
    raise app.UsageError(f"--square_queries={SQUARE_QUERIES.value} must be at least 1")
  if ATTACK_ALONE.value and ATTACK_TARGET.value != "query":
    raise app.UsageError("--attack_alone attacks one query at a time; use --attack_target=query")
  if "autoattack" in names and ATTACK_TARGET.value != "query":
    raise app.UsageError("--attacks=autoattack attacks the query set; use --attack_target=query")
  if PLOT.value and not epsilons:
    raise app.UsageError("--plot needs --epsilons (the plots show accuracy against epsilon)")
  plot = bool(epsilons) if PLOT.value is None else PLOT.value
  return AttackSettings(names, tuple(epsilons), NORM.value, steps, restarts,
                        ATTACK_TARGET.value, plot, _per_example_names(ATTACK_TARGET.value),
                        PER_EXAMPLE_CHUNK.value, SQUARE_QUERIES.value, ATTACK_PRESET.value,
                        ATTACK_ALONE.value)


def metric_fn_from_settings(settings: AttackSettings, n_way: int):
  """The per-episode metric: None (clean accuracy) without epsilons, else clean + robust."""
  if not settings.epsilons:
    return None
  return robust_eval.make_metric_fn(
      settings.names, settings.epsilons, n_way=n_way,
      norm=settings.norm, steps=settings.steps, restarts=settings.restarts, target=settings.target,
      per_example=settings.per_example, per_example_chunk=settings.per_example_chunk,
      square_queries=settings.square_queries, alone=settings.alone)


def attack_record(settings: AttackSettings, n_way: int) -> dict:
  """The attack settings as written into an evaluation's JSON."""
  def configs(names):
    sets = robust_eval.attack_sets(names, settings.epsilons, n_way=n_way, norm=settings.norm,
                                   steps=settings.steps, restarts=settings.restarts,
                                   square_queries=settings.square_queries)
    return {robust_eval.metric_key(cfgs[0].epsilon): [dataclasses.asdict(c) for c in cfgs]
            for cfgs in sets}

  record = {"preset": settings.preset, "attacks": list(settings.names),
            "epsilons": list(settings.epsilons),
            "norm": settings.norm, "steps": settings.steps, "restarts": settings.restarts,
            "target": settings.target, "configs": configs(settings.names),
            "per_example": list(settings.per_example), "alone": settings.alone}
  if settings.per_example:
    record["per_example_configs"] = configs(settings.per_example)
  return record
