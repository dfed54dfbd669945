"""AutoAttack (Croce & Hein 2020), standard version, L-inf or L2: APGD-CE,
APGD-T, FAB-T and Square, run one after another.

As in AutoAttack, each later attack only goes after the examples the earlier
ones left robust; here that is a mask, not a subset, so that everything stays
vmappable and the batch a batch-norm model sees keeps its size: the
objectives of the masked-out rows are not ascended, but the rows stay in the
batch (gradient attacks still move them where their perturbation helps the
others through the batch statistics; Square and FAB leave them clean). An
example is robust iff no evaluated batch of any part misclassified it, the
rule of :mod:`advmaml.adversary.attacks`, so the cumulative robust accuracy after each
part is the AND of the parts as run.

Parts (the published defaults of the standard version):

* APGD-CE: APGD on cross-entropy, ``steps`` (100) iterations, ``restarts`` (1).
* APGD-T: APGD on the targeted DLR loss towards each of the ``targets`` (9,
  at most N-1 in N-way) classes with the highest clean logits after the top
  one, ``steps`` iterations and ``restarts`` restarts per target.
* FAB-T: minimum-norm targeted attack (:mod:`advmaml.adversary.fab`) against the same
  target classes, ``steps`` iterations, ``restarts`` per target.
* Square: score-based random search (:mod:`advmaml.adversary.square`),
  ``square_queries`` (5000) queries, p_init 0.8, one restart.

Known deviation: APGD starts where :mod:`advmaml.adversary.attacks` starts it, uniformly
in the ball, where AutoAttack's code scales its random start to the ball's
surface.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from advmaml.adversary import attacks, fab, square
from advmaml.adversary.attacks import AttackConfig, AttackResult, LogitsFn

PARTS = ("apgd-ce", "apgd-t", "fab-t", "square")


@dataclasses.dataclass(frozen=True)
class AutoAttackConfig:
  """Static description of an AutoAttack run (hashable).

  Attributes:
    epsilon: radius of the ball.
    norm: "linf" | "l2".
    steps: iterations of APGD-CE, APGD-T (per target) and FAB-T (per target).
    restarts: restarts of each gradient attack (per target for the targeted ones).
    targets: target classes of APGD-T and FAB-T, capped at num_classes - 1.
    square_queries: Square's query budget.
    parts: which of PARTS to run, in that order.
    cascade: each part only goes after the examples the earlier ones left
      robust (AutoAttack); False: every part attacks every example (each
      part's own robust accuracy, at the cost of attacking broken examples).
    clip_min, clip_max: valid input range.
  """

  epsilon: float = 0.1
  norm: str = "linf"
  steps: int = 100
  restarts: int = 1
  targets: int = 9
  square_queries: int = 5000
  parts: tuple[str, ...] = PARTS
  cascade: bool = True
  clip_min: float = 0.0
  clip_max: float = 1.0

  def __post_init__(self):
    attacks.check_ball(self.norm, self.epsilon)
    unknown = [p for p in self.parts if p not in PARTS]
    if unknown or not self.parts or len(set(self.parts)) != len(self.parts):
      raise ValueError(f"parts must be distinct names from {PARTS}, got {self.parts}")
    if self.steps < 1 or self.restarts < 1 or self.targets < 1 or self.square_queries < 1:
      raise ValueError("steps, restarts, targets and square_queries must be >= 1")

  def apgd(self, loss: str, targeted: bool = False) -> AttackConfig:
    return AttackConfig("apgd", norm=self.norm, epsilon=self.epsilon, steps=self.steps,
                        restarts=self.restarts, loss=loss, targeted=targeted,
                        clip_min=self.clip_min, clip_max=self.clip_max)

  def fab(self) -> fab.FabConfig:
    return fab.FabConfig(norm=self.norm, epsilon=self.epsilon, steps=self.steps,
                         restarts=self.restarts, clip_min=self.clip_min, clip_max=self.clip_max)

  def square(self) -> square.SquareConfig:
    return square.SquareConfig(norm=self.norm, epsilon=self.epsilon, queries=self.square_queries,
                               clip_min=self.clip_min, clip_max=self.clip_max)


class AutoAttackResult(NamedTuple):
  """Output of :func:`autoattack`.

  Attributes:
    x_adv: (B, H, W, C) per example the point of the first part that broke it
      (x where none did).
    correct: (B,) bool, robust under every part (= cumulative[-1]).
    cumulative: (P, B) bool, robust under parts 0..p.
    part_correct: (P, B) bool, robust under part p as run (with cascade,
      an example it was not asked to attack counts as robust wherever its
      batches classified it correctly).
  """

  x_adv: jax.Array
  correct: jax.Array
  cumulative: jax.Array
  part_correct: jax.Array


def target_order(logits: jax.Array, count: int) -> jax.Array:
  """(B, K) logits -> (count, B): the classes of the 2nd, 3rd, ... highest logit."""
  order = jnp.argsort(-logits, axis=-1)
  return order[:, 1:count + 1].T


def _over_targets(run, targets: jax.Array, x, mask):
  """AND over ``run(k, target_row, mask) -> AttackResult`` for each row of
  targets (T, B), with lax.fori_loop; each target only goes after the
  examples the earlier ones left correct (within ``mask``, None: all), as in
  AutoAttack; the first breaking point is kept."""
  correct0 = jnp.ones(x.shape[:1], bool)

  def body(k, carry):
    x_adv, correct = carry
    r = run(k, targets[k], correct if mask is None else correct & mask)
    new = correct & ~r.correct
    return jnp.where(new[:, None, None, None], r.x_adv, x_adv), correct & r.correct

  return lax.fori_loop(0, targets.shape[0], body, (x, correct0))


def apgd_targeted(cfg: AttackConfig, logits_fn: LogitsFn, params, x, y, key, *, targets: int,
                  mask=None) -> AttackResult:
  """APGD-T: ``cfg`` (a targeted APGD) towards each of the ``targets`` classes
  of highest clean logit after the top one, in turn; target k uses
  fold_in(key, k). Shapes as in :func:`advmaml.adversary.attacks.attack`."""
  logits = logits_fn(lax.stop_gradient(params), x)
  order = target_order(logits, min(targets, logits.shape[-1] - 1))
  run = lambda k, t, m: attacks.attack(cfg, logits_fn, params, x, y, jax.random.fold_in(key, k),
                                       targets=t, mask=m)
  x_adv, correct = _over_targets(run, order, x, mask)
  return AttackResult(lax.stop_gradient(x_adv), correct)


def fab_targeted(cfg: fab.FabConfig, logits_fn: LogitsFn, params, x, y, key, *, targets: int,
                 mask=None) -> AttackResult:
  """FAB-T: :func:`advmaml.adversary.fab.fab` towards each of the ``targets`` classes of
  highest clean logit after the top one, in turn; target k uses fold_in(key, k)."""
  logits = logits_fn(lax.stop_gradient(params), x)
  order = target_order(logits, min(targets, logits.shape[-1] - 1))
  run = lambda k, t, m: fab.fab(cfg, logits_fn, params, x, y, jax.random.fold_in(key, k), t,
                                mask=m)
  x_adv, correct = _over_targets(run, order, x, mask)
  return AttackResult(lax.stop_gradient(x_adv), correct)


def autoattack(cfg: AutoAttackConfig, logits_fn: LogitsFn, params, x, y, key) -> AutoAttackResult:
  """Runs cfg.parts in order, each on the examples still robust; part p uses
  fold_in(key, index of the part in PARTS), so a part's key does not depend on
  which others run.

  Args: as :func:`advmaml.adversary.attacks.attack` (x (B, H, W, C), y (B,)).
  """
  params = lax.stop_gradient(params)
  x = lax.stop_gradient(x)
  num_classes = jax.eval_shape(logits_fn, params, x).shape[-1]
  n_targets = min(cfg.targets, num_classes - 1)
  robust = jnp.argmax(logits_fn(params, x), -1) == y  # the clean batch counts
  x_adv = x
  cumulative, part_correct = [], []
  for name in cfg.parts:
    k = jax.random.fold_in(key, PARTS.index(name))
    mask = robust if cfg.cascade else None
    if name == "apgd-ce":
      r = attacks.attack(cfg.apgd("ce"), logits_fn, params, x, y, k, mask=mask)
    elif name == "apgd-t":
      r = apgd_targeted(cfg.apgd("dlr", targeted=True), logits_fn, params, x, y, k,
                        targets=n_targets, mask=mask)
    elif name == "fab-t":
      r = fab_targeted(cfg.fab(), logits_fn, params, x, y, k, targets=n_targets, mask=mask)
    else:
      r = square.square(cfg.square(), logits_fn, params, x, y, k, mask=mask)
    new = robust & ~r.correct
    x_adv = jnp.where(new[:, None, None, None], r.x_adv, x_adv)
    robust = robust & r.correct
    cumulative.append(robust)
    part_correct.append(r.correct)
  return AutoAttackResult(lax.stop_gradient(x_adv), robust, jnp.stack(cumulative),
                          jnp.stack(part_correct))


__all__ = ["PARTS", "AutoAttackConfig", "AutoAttackResult", "autoattack", "apgd_targeted",
           "fab_targeted", "target_order"]
