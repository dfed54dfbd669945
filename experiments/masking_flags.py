"""absl flags of the gradient-masking checks of ``evaluate`` (advmaml.eval.masking).

Each check is off unless its flag is given; all need --epsilons (they compare
with, or extend, the white-box robust accuracy) and a query attack.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

from absl import app, flags, logging

from advmaml.eval import masking
from advmaml.eval.trained_runs import TrainedRun, image_shape_for, load_checkpointed_run
from experiments.attack_flags import AttackSettings

TRANSFER_FROM = flags.DEFINE_string(
    "check_transfer_from", None,
    "Masking check: workdir (or checkpoint) of an independently trained surrogate of the same "
    "n_way and image shape. PGD on cross-entropy (--attack_steps, --restarts) against the "
    "surrogate adapted on the same clean support set crafts query examples that the target "
    "must resist at least as well as its own white-box attack, up to the noise.")
BLACK_BOX = flags.DEFINE_bool(
    "check_black_box", False,
    "Masking check: Square (--square_queries, no gradients) must not beat the white-box "
    "attacks by more than the noise.")
LARGE_EPSILON = flags.DEFINE_float(
    "check_large_epsilon", None,
    "Masking check: radius (in --norm) at which the white-box attacks (summed and, unless "
    "--noper_example, the --per_example_attacks aimed at each query) must bring robust "
    "accuracy to at most --check_large_epsilon_tolerance, e.g. 0.5 for linf.")
LARGE_EPSILON_TOLERANCE = flags.DEFINE_float(
    "check_large_epsilon_tolerance", 0.05,
    "Robust accuracy the large-epsilon check still accepts, in [0, 1).")
LOSS_PROGRESS = flags.DEFINE_bool(
    "check_loss_progress", False,
    "Masking check: PGD's CW-margin objective must rise in its first "
    "--check_loss_progress_steps steps for at least half of the clean-correct query examples.")
LOSS_PROGRESS_STEPS = flags.DEFINE_integer(
    "check_loss_progress_steps", 5, "k of --check_loss_progress (at most --attack_steps).")


@dataclasses.dataclass(frozen=True)
class MaskingSettings:
  checks: masking.MaskingChecks
  surrogate: TrainedRun | None
  large_epsilon_tolerance: float

  def metric_params(self, run: TrainedRun):
    """The pytree the wrapped metric fn takes as meta_params."""
    if self.surrogate is None:
      return run.meta_params
    return (run.meta_params, self.surrogate.meta_params)

  def record(self) -> dict:
    c = self.checks
    return {"enabled": list(c.enabled()), "epsilons": list(c.epsilons), "norm": c.norm,
            "reference": c.reference, "steps": c.steps, "restarts": c.restarts,
            "surrogate": None if self.surrogate is None else self.surrogate.source,
            "black_box_queries": c.black_box_queries, "large_epsilon": c.large_epsilon,
            "large_epsilon_attacks": list(c.large_epsilon_attacks),
            "large_epsilon_per_example": list(c.large_epsilon_per_example),
            "large_epsilon_tolerance": self.large_epsilon_tolerance,
            "progress_steps": c.progress_steps, "progress_tolerance": c.progress_tolerance}


def _given(flag) -> bool:
  return not flags.FLAGS[flag.name].using_default_value


def check_flags(settings: AttackSettings) -> bool:
  """Checks the masking flags without loading anything; returns whether any check is on.
  Bad values raise app.UsageError naming the flag."""
  wanted = [f for f in (TRANSFER_FROM, BLACK_BOX, LARGE_EPSILON, LOSS_PROGRESS)
            if _given(f) and f.value is not None and f.value is not False and f.value != ""]
  for setting, check in ((LARGE_EPSILON_TOLERANCE, LARGE_EPSILON), (LOSS_PROGRESS_STEPS, LOSS_PROGRESS)):
    if _given(setting) and check.name not in {f.name for f in wanted}:  # FlagHolders have no ==
      raise app.UsageError(f"--{setting.name} sets a check that is off; add --{check.name} or "
                           f"drop --{setting.name}")
  if not wanted:
    return False
  names = ", ".join(f"--{f.name}" for f in wanted)
  if not settings.epsilons:
    raise app.UsageError(f"{names}: the masking checks test robust accuracy; give --epsilons")
  if settings.target != "query":
    raise app.UsageError(f"{names}: the masking checks test the query attack; use "
                         "--attack_target=query")
  large = LARGE_EPSILON.value
  if large is not None and (not math.isfinite(large) or large <= 0
                            or (settings.norm == "linf" and large > 1)):
    raise app.UsageError(f"--check_large_epsilon={large} must be in (0, 1] for linf, > 0 for l2")
  tol = LARGE_EPSILON_TOLERANCE.value
  if not 0 <= tol < 1:
    raise app.UsageError(f"--check_large_epsilon_tolerance={tol} must be in [0, 1)")
  steps = LOSS_PROGRESS_STEPS.value
  if LOSS_PROGRESS.value and not 1 <= steps <= settings.steps:
    raise app.UsageError(f"--check_loss_progress_steps={steps} must be in [1, --attack_steps="
                         f"{settings.steps}]")
  return True


def masking_settings_from_flags(settings: AttackSettings, run: TrainedRun, *,
                                trust_unverified: bool = False) -> MaskingSettings | None:
  """The checks the flags ask for against ``run``, or None (loads the surrogate)."""
  if not check_flags(settings):
    return None
  large, tol, steps = (LARGE_EPSILON.value, LARGE_EPSILON_TOLERANCE.value,
                       LOSS_PROGRESS_STEPS.value)
  surrogate = None
  if TRANSFER_FROM.value:
    surrogate = load_checkpointed_run(TRANSFER_FROM.value, trust_unverified=trust_unverified)
    if pathlib.Path(surrogate.source).resolve() == pathlib.Path(run.source).resolve():
      raise app.UsageError("--check_transfer_from names the evaluated checkpoint itself; give an "
                           "independently trained surrogate")
    mine = (run.cfg.n_way, image_shape_for(run.cfg))
    theirs = (surrogate.cfg.n_way, image_shape_for(surrogate.cfg))
    if mine != theirs:
      raise app.UsageError(f"--check_transfer_from: the surrogate is {theirs[0]}-way on images "
                           f"{theirs[1]}, the evaluated run {mine[0]}-way on {mine[1]}; train the "
                           "surrogate on the same protocol")
  plain = tuple(n for n in settings.names if n != "autoattack") or ("pgd", "margin", "apgd")
  # With AutoAttack, Square is part of robust_accuracy: compare with its gradient parts alone.
  reference = ("autoattack_fab-t_robust_accuracy" if "autoattack" in settings.names
               else "robust_accuracy")
  checks = masking.MaskingChecks(
      epsilons=settings.epsilons, norm=settings.norm, steps=settings.steps,
      restarts=settings.restarts, n_way=run.cfg.n_way, reference=reference,
      surrogate=None if surrogate is None else surrogate.exp.test_learner,
      black_box_queries=settings.square_queries if BLACK_BOX.value else 0,
      large_epsilon=large, large_epsilon_attacks=plain,
      # The evaluation's own worst case: its aimed attacks too, where it aims any.
      large_epsilon_per_example=settings.per_example if large is not None else (),
      per_example_chunk=settings.per_example_chunk,
      progress_steps=steps if LOSS_PROGRESS.value else 0)
  return MaskingSettings(checks, surrogate, tol)


def report(record: dict, masking_settings: MaskingSettings) -> bool:
  """Adds "masking_checks" to the evaluation record; logs each verdict, a warning per
  failed check. Returns whether all passed."""
  results = masking.verdicts(record["metrics"], masking_settings.checks,
                             large_epsilon_tolerance=masking_settings.large_epsilon_tolerance)
  for r in results:
    if r.passed:
      logging.info("masking check %s", r.message)
    else:
      logging.warning("gradient-masking check failed: %s", r.message)
  passed = all(r.passed for r in results)
  record["masking_checks"] = {"passed": passed, "results": [r.as_dict() for r in results],
                              "settings": masking_settings.record()}
  return passed
