"""Checks that catch gradient masking in a robust evaluation.

A white-box attack whose gradients are useless (a model that quantises its
input, saturates its logits or hides its gradient behind a stop_gradient)
leaves robust accuracy high although the model is not robust. Four symptoms
(Athalye, Carlini & Wagner 2018; Carlini et al. 2019, "On evaluating
adversarial robustness"), each a check:

* ``transfer``: adversarial query examples crafted white-box against an
  independently trained surrogate (adapted on the same clean support set)
  must not fool the target more than the target's own white-box attack does.
* ``black_box``: Square (no gradients) must not beat the white-box attacks.
* ``large_epsilon``: at a large radius every example can be made any other
  image's class, so robust accuracy must reach (near) 0. It is taken under the
  attack that gives the evaluation's robust accuracy: the summed-loss attacks
  and, where the evaluation aims attacks at each query, those too (on a
  batch-norm model one perturbation of the whole batch can leave a few
  percent of the queries standing at any radius).
* ``loss_progress``: the attack's objective must rise in its first steps.

Each check has two halves: a per-episode metric computed with the robust
evaluation (:func:`masking_metrics`, wrapped around the evaluation's own
metric function so that it sees the same episodes and the white-box numbers
of the same episode), and a pure verdict on the aggregated metrics
(``*_check``, returning a :class:`CheckResult`).

"Noise" for the comparisons: both accuracies come from the same episodes, so
the metric is the per-episode *difference* (white-box minus the other
attack), and its 95% interval (normal approximation over episodes, as for
every number of the evaluation) is the noise. A comparison fails when the
whole interval lies above 0: the other attack is better than white-box by
more than the noise. With one episode there is no interval and the noise is
taken as 0.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from advmaml.adversary import attacks
from advmaml.eval import robust_eval
from advmaml.adversary.attacks import AttackConfig
from advmaml.learners.base import FewShotLearner as Learner, adapt_key
from advmaml.adversary.square import SquareConfig, square

CHECKS = ("transfer", "black_box", "large_epsilon", "loss_progress")


class CheckResult(NamedTuple):
  """One check's verdict. value: the tested number; threshold: what it must
  not exceed (comparisons: the noise); message: one line for the log."""

  name: str
  passed: bool
  value: float
  threshold: float
  message: str

  def as_dict(self) -> dict:
    return self._asdict()


@dataclasses.dataclass(frozen=True)
class MaskingChecks:
  """Which checks run, and their settings (hashable: part of a static metric fn).

  Attributes:
    epsilons: radii of the transfer, black-box and loss-progress checks (the
      evaluation's epsilons).
    norm: "linf" | "l2".
    steps, restarts: budget of the transfer attack (PGD on cross-entropy
      against the surrogate) and of the large-epsilon attack.
    reference: per epsilon, the white-box metric to compare with (the
      prefix of ``<prefix>@<eps>``; gradient attacks only, so that the
      black-box check is not vacuous when AutoAttack's Square is part of it).
    surrogate: the surrogate's "test"-phase learner, or None (no transfer check).
    black_box_queries: Square's budget, 0: no black-box check.
    large_epsilon: radius of the large-epsilon check, None: off; it uses
      large_epsilon_attacks (names as in robust_eval.attack_config) on the
      summed loss and large_epsilon_per_example (() : none) aimed at each query
      example, per_example_chunk aims vmapped together (0: all).
    progress_steps: k of the loss-progress check, 0: off.
    progress_tolerance: the relative rise an example's objective must exceed.
  """

  epsilons: tuple[float, ...]
  norm: str = "linf"
  steps: int = 20
  restarts: int = 1
  n_way: int = 5
  reference: str = "robust_accuracy"
  surrogate: Learner | None = None
  black_box_queries: int = 0
  large_epsilon: float | None = None
  large_epsilon_attacks: tuple[str, ...] = ("pgd", "margin", "apgd")
  large_epsilon_per_example: tuple[str, ...] = ()
  per_example_chunk: int = 0
  progress_steps: int = 0
  progress_tolerance: float = 1e-3

  def enabled(self) -> tuple[str, ...]:
    on = (self.surrogate is not None, self.black_box_queries > 0,
          self.large_epsilon is not None, self.progress_steps > 0)
    return tuple(name for name, ok in zip(CHECKS, on) if ok)


def key_for(check: str, epsilon: float, what: str) -> str:
  """Metric name of one check's per-episode number, e.g. ``masking/transfer_gap@0.1``."""
  return robust_eval.metric_key(epsilon, f"masking/{check}_{what}")


# ----------------------------------------------------------------------------
# Per-episode metrics.


def loss_progress(cfg: AttackConfig, logits_fn, params, x, y, key, steps: int
                  ) -> tuple[jax.Array, jax.Array]:
  """(rise, start), each (B,): PGD's objective rise after ``steps`` steps,
  obj(x_k) - obj(x_0), and obj(x_0).

  PGD as :func:`advmaml.adversary.attacks.pgd` takes it (random start x_0 from
  ``fold_in(key, 0)``, signed steps on the batch's summed ``cfg.loss``), its
  iterates traced here. x: (B, H, W, C), y: (B,).
  """
  params, x = lax.stop_gradient(params), lax.stop_gradient(x)

  def total(xb):
    obj = attacks.attack_objective(logits_fn(params, xb), y, cfg.loss)
    return jnp.sum(obj), obj

  grad_fn = jax.grad(total, has_aux=True)
  x0 = attacks.random_start(jax.random.fold_in(key, 0), x, cfg)
  obj0 = total(x0)[1]
  step = lambda _, xk: attacks.pgd_step(xk, grad_fn(xk)[0], x, cfg, cfg.resolved_step_size())
  xk = lax.fori_loop(0, steps, step, x0)
  return total(xk)[1] - obj0, obj0


def masking_metrics(learner: Learner, meta_params, episode, key, *, base,
                    checks: MaskingChecks) -> dict:
  """The evaluation's metrics of one episode plus the enabled checks' numbers.

  base: the evaluation's metric fn (its numbers are unchanged: it gets
  ``key``; the checks use keys from ``fold_in(key, 7919)``). meta_params: the target's
  meta-parameters, or ``(target, surrogate)`` with a transfer check. Adds,
  per check epsilon, ``masking/transfer_robust_accuracy`` and
  ``masking/transfer_gap`` (reference minus transfer),
  ``masking/black_box_robust_accuracy`` and ``masking/black_box_gap``,
  ``masking/loss_progress_fraction`` (the fraction of query examples, clean
  correct, whose objective rose; over clean accuracy it is the progressed
  share); and ``masking/large_epsilon_robust_accuracy@<large eps>`` (with
  large_epsilon_per_example also ``masking/large_epsilon_summed_robust_accuracy``,
  the summed-loss attacks' alone).
  """
  target, surrogate = meta_params if checks.surrogate is not None else (meta_params, None)
  out = dict(base(learner, target, episode, key))
  k_checks = jax.random.fold_in(key, 7919)
  qx, qy = episode.query_x, episode.query_y
  fast = learner.adapt(target, episode.support_x, episode.support_y, adapt_key(key))
  clean = jnp.argmax(learner.logits(fast, qx), -1) == qy
  acc = lambda ok: jnp.mean((clean & ok).astype(jnp.float32))
  # Accuracies are multiples of 1/Q; rounding makes equal counts give a gap of exactly 0
  # (separately reduced means may differ in the last bit).
  q = qy.shape[0]
  gap = lambda a, b: jnp.round((a - b) * q) / q
  if checks.surrogate is not None:
    fast_s = checks.surrogate.adapt(surrogate, episode.support_x, episode.support_y,
                                    adapt_key(key))
  for eps in checks.epsilons:
    # As in robust_eval: the key depends on epsilon's value, not on the other epsilons.
    k = robust_eval._epsilon_key(jax.random.fold_in(k_checks, 0), eps)
    reference = out[robust_eval.metric_key(eps, checks.reference)]
    if checks.surrogate is not None:
      cfg = robust_eval.attack_config("pgd", eps, n_way=checks.n_way, norm=checks.norm,
                                      steps=checks.steps, restarts=checks.restarts)
      x_adv = attacks.worst_case((cfg,), checks.surrogate.logits, fast_s, qx, qy,
                                 jax.random.fold_in(k, 0)).x_adv
      rob = acc(jnp.argmax(learner.logits(fast, x_adv), -1) == qy)
      out[key_for("transfer", eps, "robust_accuracy")] = rob
      out[key_for("transfer", eps, "gap")] = gap(reference, rob)
    if checks.black_box_queries:
      cfg = SquareConfig(norm=checks.norm, epsilon=eps, queries=checks.black_box_queries)
      rob = acc(square(cfg, learner.logits, fast, qx, qy, jax.random.fold_in(k, 1)).correct)
      out[key_for("black_box", eps, "robust_accuracy")] = rob
      out[key_for("black_box", eps, "gap")] = gap(reference, rob)
    if checks.progress_steps:
      cfg = robust_eval.attack_config("margin", eps, n_way=checks.n_way, norm=checks.norm,
                                      steps=checks.steps)
      rise, obj0 = loss_progress(cfg, learner.logits, fast, qx, qy, jax.random.fold_in(k, 2),
                                 min(checks.progress_steps, checks.steps))
      rose = rise > checks.progress_tolerance * jnp.maximum(jnp.abs(obj0), 1.0)
      out[key_for("loss_progress", eps, "fraction")] = acc(rose)
  if checks.large_epsilon is not None:
    big = (checks.large_epsilon,)
    kwargs = dict(n_way=checks.n_way, norm=checks.norm, steps=checks.steps,
                  restarts=checks.restarts)
    large = robust_eval.robust_metrics(
        learner, target, episode, jax.random.fold_in(k_checks, 1),
        attack_sets=robust_eval.attack_sets(checks.large_epsilon_attacks, big, **kwargs),
        per_example_sets=(robust_eval.attack_sets(checks.large_epsilon_per_example, big, **kwargs)
                          if checks.large_epsilon_per_example else ()),
        per_example_chunk=checks.per_example_chunk)
    for name in ("robust_accuracy", "summed_robust_accuracy"):
      if robust_eval.metric_key(checks.large_epsilon, name) in large:
        out[robust_eval.metric_key(checks.large_epsilon, f"masking/large_epsilon_{name}")] = (
            large[robust_eval.metric_key(checks.large_epsilon, name)])
  return out


@functools.lru_cache(maxsize=None)
def with_masking_metrics(base, checks: MaskingChecks):
  """A hashable metric fn: ``base``'s metrics plus the checks' (cached, so jit reuses it)."""
  return functools.partial(masking_metrics, base=base, checks=checks)


# ----------------------------------------------------------------------------
# Verdicts on aggregated metrics ({"mean", "ci95", ...} as evaluate_episodes gives).


def _noise(metric: dict) -> float:
  ci = metric.get("ci95", float("nan"))
  return float(ci) if math.isfinite(ci) else 0.0


def gap_check(name: str, gap: dict, what: str) -> CheckResult:
  """Fails when the paired gap (white-box minus ``what`` robust accuracy) is
  above 0 by more than its 95% half-width: ``what`` breaks significantly
  more examples than the white-box attacks, which are then masked."""
  mean, noise = float(gap["mean"]), _noise(gap)
  passed = mean <= noise
  verdict = "ok" if passed else "FAILED: the white-box attack looks masked"
  return CheckResult(name, passed, mean, noise,
                     f"{name}: white-box minus {what} robust accuracy is {100 * mean:+.2f} "
                     f"points (noise {100 * noise:.2f}): {verdict}")


def large_epsilon_check(robust: dict, epsilon: float, tolerance: float = 0.05) -> CheckResult:
  """Fails when the mean robust accuracy at the large ``epsilon`` exceeds ``tolerance``."""
  mean = float(robust["mean"])
  passed = mean <= tolerance
  verdict = "ok" if passed else "FAILED: the attack cannot break the model even there"
  return CheckResult("large_epsilon", passed, mean, tolerance,
                     f"large_epsilon: robust accuracy at epsilon {epsilon:g} is {100 * mean:.2f}% "
                     f"(must be <= {100 * tolerance:.2f}%): {verdict}")


def loss_progress_check(fraction: dict, clean: dict, epsilon: float,
                        min_share: float = 0.5) -> CheckResult:
  """Fails when fewer than ``min_share`` of the clean-correct query examples
  saw their objective rise in the attack's first k steps.

  Criterion: example i progressed iff obj_i(x_k) - obj_i(x_0) > tol *
  max(|obj_i(x_0)|, 1) for PGD on the CW margin (logit units, which do not
  saturate as cross-entropy does; x_0 is the random start). On a
  differentiable model a signed gradient step raises the objective to first
  order for almost every example, robust or not, so most progress; where
  gradients vanish or point nowhere (quantised inputs, saturated or
  stop_gradient logits), none moves. All clean-correct examples count, not
  only those that end up broken: conditioning on success would pass a fully
  masked attack, which breaks none, vacuously. The share is the ratio of the
  means over episodes (progressed / clean accuracy).
  """
  share = float(fraction["mean"]) / max(float(clean["mean"]), 1e-12)
  passed = share >= min_share
  verdict = "ok" if passed else "FAILED: the attack's loss stalls at the start"
  return CheckResult(f"loss_progress@{epsilon:g}", passed, share, min_share,
                     f"loss_progress@{epsilon:g}: the objective rose for "
                     f"{100 * share:.1f}% of the clean-correct examples (must be >= "
                     f"{100 * min_share:.0f}%): {verdict}")


def verdicts(metrics: dict, checks: MaskingChecks, *, large_epsilon_tolerance: float = 0.05,
             progress_min_share: float = 0.5) -> list[CheckResult]:
  """Every enabled check's verdict from an evaluation's aggregated metrics."""
  out = []
  for eps in checks.epsilons:
    if checks.surrogate is not None:
      out.append(gap_check(f"transfer@{eps:g}", metrics[key_for("transfer", eps, "gap")],
                           "transfer"))
    if checks.black_box_queries:
      out.append(gap_check(f"black_box@{eps:g}", metrics[key_for("black_box", eps, "gap")],
                           "black-box (Square)"))
    if checks.progress_steps:
      out.append(loss_progress_check(metrics[key_for("loss_progress", eps, "fraction")],
                                     metrics["clean_accuracy"], eps, progress_min_share))
  if checks.large_epsilon is not None:
    key = robust_eval.metric_key(checks.large_epsilon, "masking/large_epsilon_robust_accuracy")
    out.append(large_epsilon_check(metrics[key], checks.large_epsilon, large_epsilon_tolerance))
  return out


__all__ = ["CHECKS", "CheckResult", "MaskingChecks", "key_for", "loss_progress",
           "masking_metrics", "with_masking_metrics", "gap_check", "large_epsilon_check",
           "loss_progress_check", "verdicts"]
