"""Adversarial attacks on image classifiers: FGSM, PGD and APGD.

A model is ``logits_fn(params, x) -> logits`` with ``x`` of shape (B, H, W, C)
in ``[clip_min, clip_max]`` and logits of shape (B, num_classes).

The model may normalise with the statistics of its own batch (batch norm in
training mode), which couples the examples of a batch. Every attack therefore

* perturbs the whole batch jointly, ascending the *sum* of per-example losses
  (:func:`per_example` adds, for each example, attacks ascending that
  example's loss alone, still perturbing the whole batch);
* judges correctness only on whole batches it actually evaluated.

``AttackResult.correct`` is True for an example iff it was classified correctly
at every batch the attack evaluated: the clean batch, every start point, every
iterate and every restart (with the default ``track_best=True``). Robust
accuracy (the mean of ``correct``) is thus monotone by construction: it is at
most the clean accuracy, and more restarts
(restart ``r`` always draws from ``fold_in(key, r)``), more PGD steps at a fixed
step size (PGD-k's trajectory is a prefix of PGD-2k's) or more attacks in
:func:`worst_case` can only lower it.

``track_best=False`` is the training-time attack of Madry et al. (2018): FGSM
or PGD returns its last iterate after ``steps`` gradient evaluations, with no
clean-batch evaluation and no per-example bookkeeping (PGD-7 then costs 7
gradient evaluations, not 8 plus a forward). Evaluations keep the default.

Everything is jittable and vmappable (e.g. over a leading task axis with
per-task adapted parameters); ``cfg`` and ``logits_fn`` are static. Outputs are
wrapped in ``stop_gradient``: adversarial examples are treated as data.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

LogitsFn = Callable[[Any, jax.Array], jax.Array]

_NAMES = ("fgsm", "pgd", "apgd")
_NORMS = ("linf", "l2")
_LOSSES = ("ce", "margin", "dlr")
_TINY = 1e-12
# APGD constants from Croce & Hein (2020), Sec. 3.
_APGD_MOMENTUM = 0.75
_APGD_RHO = 0.75


def check_ball(norm: str, epsilon: float) -> None:
  """Raises ValueError unless norm is "linf" or "l2" and epsilon >= 0 (every
  attack config checks its ball with this)."""
  if norm not in _NORMS:
    raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
  if epsilon < 0:
    raise ValueError(f"epsilon must be >= 0, got {epsilon}")


@dataclasses.dataclass(frozen=True)
class AttackConfig:
  """Static description of one attack (hashable, so usable as a jit static arg).

  Attributes:
    name: "fgsm" | "pgd" | "apgd".
    norm: "linf" | "l2" threat model.
    epsilon: radius of the perturbation ball.
    step_size: PGD/FGSM step; default 2.5 * epsilon / steps for PGD (Madry et
      al.) and epsilon for FGSM. Unused by APGD (starts at 2 * epsilon).
    steps: number of iterations (FGSM always takes one step).
    restarts: independent runs from fresh random starts; the strongest point
      per example is kept.
    random_start: start from a uniform point in the ball instead of x.
    loss: "ce" | "margin" (max_{j!=y} z_j - z_y) | "dlr" (Croce & Hein; falls
      back to margin with < 3 classes, or < 4 classes when targeted).
    targeted: move towards a random other class per example (drawn from the
      key, see :func:`target_labels`) instead of away from the true label.
    clip_min, clip_max: valid input range.
    track_best: keep, per example, the strongest point of every evaluated
      batch (the clean batch, the start, x_1 ... x_steps; robust accuracy is
      then at most clean accuracy). False (FGSM/PGD, one restart): return the
      last iterate x_steps after ``steps`` gradient evaluations, as adversarial
      training does; ``correct`` then covers the evaluated x_0 ... x_{steps-1}.
  """

  name: str = "pgd"
  norm: str = "linf"
  epsilon: float = 0.1
  step_size: float | None = None
  steps: int = 10
  restarts: int = 1
  random_start: bool = True
  loss: str = "ce"
  targeted: bool = False
  clip_min: float = 0.0
  clip_max: float = 1.0
  track_best: bool = True

  def __post_init__(self):
    if self.name not in _NAMES:
      raise ValueError(f"name must be one of {_NAMES}, got {self.name!r}")
    check_ball(self.norm, self.epsilon)
    if self.loss not in _LOSSES:
      raise ValueError(f"loss must be one of {_LOSSES}, got {self.loss!r}")
    if self.steps < 1 or self.restarts < 1:
      raise ValueError("steps and restarts must be >= 1")
    if self.clip_min > self.clip_max:
      raise ValueError("clip_min must be <= clip_max")
    if not self.track_best and (self.name == "apgd" or self.restarts != 1):
      raise ValueError("track_best=False (the last iterate) is for FGSM/PGD with one restart; "
                       "APGD and restarts choose among points, so they need track_best=True")

  def resolved_steps(self) -> int:
    """The gradient steps FGSM/PGD take: FGSM always one."""
    return 1 if self.name == "fgsm" else self.steps

  def resolved_step_size(self) -> float:
    """The step size actually used by FGSM/PGD."""
    if self.step_size is not None:
      return float(self.step_size)
    if self.name == "fgsm":
      return float(self.epsilon)
    return 2.5 * self.epsilon / self.steps


class AttackResult(NamedTuple):
  """Output of an attack.

  Attributes:
    x_adv: (B, H, W, C) per example the strongest point found: misclassified
      points (for targeted attacks, ones hitting the target first) are
      preferred, then the highest attack loss.
    correct: (B,) bool, True iff the example was classified correctly at every
      batch the attack evaluated.
  """

  x_adv: jax.Array
  correct: jax.Array


class _Track(NamedTuple):
  """Running per-example best point; `margin` makes attacks comparable."""

  x: jax.Array  # (B, H, W, C)
  tier: jax.Array  # (B,) int32: 0 correct, 1 misclassified, 2 hit target
  obj: jax.Array  # (B,) attack objective at x
  margin: jax.Array  # (B,) max_{j!=y} z_j - z_y at x (attack independent)
  correct: jax.Array  # (B,) bool, AND over every evaluated batch


# ----------------------------------------------------------------------------
# Geometry.


def _bcast(v: jax.Array, like: jax.Array) -> jax.Array:
  """(B,) -> (B, 1, ..., 1) to broadcast against `like`."""
  return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def perturbation_norm(delta: jax.Array, norm: str) -> jax.Array:
  """Per-example norm of `delta` (B, ...) -> (B,)."""
  flat = delta.reshape(delta.shape[0], -1)
  if norm == "linf":
    return jnp.max(jnp.abs(flat), axis=1)
  if norm == "l2":
    return jnp.sqrt(jnp.sum(flat * flat, axis=1))
  raise ValueError(f"unknown norm {norm!r}")


def project(x_adv: jax.Array, x: jax.Array, cfg: AttackConfig) -> jax.Array:
  """Maps x_adv (B, H, W, C) into the eps-ball around x and the valid box.

  Linf: exact projection onto ball ∩ box. L2: radial projection onto the
  ball, then clipping to the box; clipping only shrinks |delta_i| (x is in the
  box), so the result stays in the ball.
  """
  delta = x_adv - x
  if cfg.norm == "linf":
    delta = jnp.clip(delta, -cfg.epsilon, cfg.epsilon)
  else:
    n = perturbation_norm(delta, "l2")
    delta = delta * _bcast(jnp.minimum(1.0, cfg.epsilon / jnp.maximum(n, _TINY)), x)
  return jnp.clip(x + delta, cfg.clip_min, cfg.clip_max)


def ascent_direction(g: jax.Array, norm: str) -> jax.Array:
  """Steepest ascent direction of unit norm: sign (Linf) or g/||g|| (L2)."""
  if norm == "linf":
    return jnp.sign(g)
  return g / _bcast(jnp.maximum(perturbation_norm(g, "l2"), _TINY), g)


def random_start(key: jax.Array, x: jax.Array, cfg: AttackConfig) -> jax.Array:
  """Uniform in the Linf ball, or uniform direction and radius in the L2 ball."""
  if not cfg.random_start:
    return x
  if cfg.norm == "linf":
    delta = jax.random.uniform(key, x.shape, x.dtype, -cfg.epsilon, cfg.epsilon)
  else:
    k_dir, k_rad = jax.random.split(key)
    d = jax.random.normal(k_dir, x.shape, x.dtype)
    d = d / _bcast(jnp.maximum(perturbation_norm(d, "l2"), _TINY), d)
    delta = d * _bcast(jax.random.uniform(k_rad, x.shape[:1], x.dtype) * cfg.epsilon, d)
  return project(x + delta, x, cfg)  # guards the ball against rounding too


# ----------------------------------------------------------------------------
# Losses (all per example, all to be maximised by the attack).


def _logit_at(z: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.take_along_axis(z, labels[:, None], axis=-1)[:, 0]


def _max_other(z: jax.Array, labels: jax.Array) -> jax.Array:
  """max_{j != labels} z_j, (B, K) -> (B,)."""
  mask = jax.nn.one_hot(labels, z.shape[-1], dtype=bool)
  return jnp.max(jnp.where(mask, -jnp.inf, z), axis=-1)


def margin_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
  """Carlini-Wagner margin max_{j!=y} z_j - z_y, (B, K) -> (B,); > 0 iff wrong."""
  return _max_other(logits, y) - _logit_at(logits, y)


def attack_objective(
    logits: jax.Array, y: jax.Array, loss: str, target: jax.Array | None = None
) -> jax.Array:
  """Per-example objective (B,) that an attack maximises.

  Untargeted: ce = CE(z, y); margin = max_{j!=y} z_j - z_y;
  dlr = margin / (z_pi1 - z_pi3) with z sorted decreasingly.
  Targeted (towards `target`): ce = -CE(z, t); margin = z_t - max_{j!=t} z_j;
  dlr = (z_t - z_y) / (z_pi1 - (z_pi3 + z_pi4) / 2).
  """
  num_classes = logits.shape[-1]
  if target is None:
    if loss == "ce":
      return -_logit_at(jax.nn.log_softmax(logits), y)
    if loss == "margin" or (loss == "dlr" and num_classes < 3):
      return margin_loss(logits, y)
    if loss == "dlr":
      top = lax.top_k(logits, 3)[0]
      return margin_loss(logits, y) / (top[:, 0] - top[:, 2] + _TINY)
  else:
    if loss == "ce":
      return _logit_at(jax.nn.log_softmax(logits), target)
    if loss == "margin" or (loss == "dlr" and num_classes < 4):
      return -margin_loss(logits, target)
    if loss == "dlr":
      top = lax.top_k(logits, 4)[0]
      scale = top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + _TINY
      return (_logit_at(logits, target) - _logit_at(logits, y)) / scale
  raise ValueError(f"unknown loss {loss!r}")


def _split_key(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(key for targets, key whose fold_in(., r) seeds restart r)."""
  k_target, k_runs = jax.random.split(key)
  return k_target, k_runs


def _restart_key(key: jax.Array, r) -> jax.Array:
  """The key restart ``r`` draws its start from (the last-iterate attack uses r = 0)."""
  return jax.random.fold_in(_split_key(key)[1], r)


def target_labels(key: jax.Array, y: jax.Array, num_classes: int) -> jax.Array:
  """The targets (B,) a targeted attack called with `key` uses: uniform over
  the classes other than y."""
  if num_classes < 2:
    raise ValueError("targeted attacks need at least 2 classes")
  k_target, _ = _split_key(key)
  shift = jax.random.randint(k_target, y.shape, 1, num_classes)
  return (y + shift) % num_classes


# ----------------------------------------------------------------------------
# Shared machinery.


def _track_update(tr: _Track, xb, logits, obj, y, target, aim=None) -> _Track:
  """Records an evaluated batch `xb` with its logits and objective.

  aim: None, or the index of the one example an aimed attack is after; then
  `obj` holds that example's objective in every row and the tier is its tier,
  so every row keeps the same batch: the one strongest against that example.
  """
  pred = jnp.argmax(logits, axis=-1)
  wrong = pred != y
  tier = wrong.astype(jnp.int32)
  if target is not None:
    tier = tier + (pred == target).astype(jnp.int32)
  if aim is not None:
    tier = jnp.broadcast_to(tier[aim], tier.shape)
  better = (tier > tr.tier) | ((tier == tr.tier) & (obj > tr.obj))
  return _Track(
      x=jnp.where(_bcast(better, xb), xb, tr.x),
      tier=jnp.where(better, tier, tr.tier),
      obj=jnp.where(better, obj, tr.obj),
      margin=jnp.where(better, margin_loss(logits, y), tr.margin),
      correct=tr.correct & ~wrong,
  )


def _rows_objective(logits, y, loss, target, aim):
  """The per-row objective (B,): each example's own, or with `aim` that
  example's objective in every row."""
  obj = attack_objective(logits, y, loss, target)
  return obj if aim is None else jnp.broadcast_to(obj[aim], obj.shape)


def _make_evaluate(cfg, logits_fn, params, y, target, aim=None, mask=None):
  """xb -> (logits, per-example objective, gradient of the summed objective).

  mask: optional (B,) bool; only those rows' objectives are summed (the
  others remain in the batch).

  With `aim` (an example index), the gradient is that of example `aim`'s
  objective alone, and that objective is returned in every row: APGD's
  per-row step-size control then follows the aimed objective, identically in
  every row, and moves the whole batch for the one example.
  """

  def total(xb):
    logits = logits_fn(params, xb)
    obj = _rows_objective(logits, y, cfg.loss, target, aim)
    if aim is not None:  # every row holds the one objective: row 0 is the scalar to ascend
      return obj[0], (logits, obj)
    return jnp.sum(obj if mask is None else jnp.where(mask, obj, 0.0)), (logits, obj)

  grad_fn = jax.value_and_grad(total, has_aux=True)

  def evaluate(xb):
    (_, (logits, obj)), g = grad_fn(xb)
    return logits, obj, g

  return evaluate


def pgd_step(xk, g, x, cfg: AttackConfig, step_size) -> jax.Array:
  """One FGSM/PGD/APGD step: xk (B, H, W, C) moved step_size along the steepest
  ascent direction of the gradient g, projected into x's ball and the box."""
  return project(xk + step_size * ascent_direction(g, cfg.norm), x, cfg)


def _pgd_restart(cfg, evaluate, record, x, key, tr, steps, step_size):
  """One PGD run: evaluates x_0, ..., x_steps (steps+1 gradient evaluations,
  the last update is discarded) so that PGD-k's evaluations are a prefix of
  PGD-2k's with the same start and step size."""
  x0 = random_start(key, x, cfg)

  def body(_, carry):
    xk, tr = carry
    logits, obj, g = evaluate(xk)
    tr = record(tr, xk, logits, obj)
    return pgd_step(xk, g, x, cfg, step_size), tr

  _, tr = lax.fori_loop(0, steps + 1, body, (x0, tr))
  return tr


def apgd_checkpoints(n_iter: int) -> list[int]:
  """APGD checkpoints w_j = ceil(p_j * n_iter) < n_iter (w_0 = 0 included),
  p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
  p = [0.0, 0.22]
  while p[-1] < 1.0:
    p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
  # round() guards against 0.22 * 100 = 22.000000000000004 -> 23.
  w = sorted({math.ceil(round(pj * n_iter, 6)) for pj in p})
  return [wj for wj in w if wj < n_iter]


def _apgd_restart(cfg, evaluate, record, x, key, tr):
  """One APGD run (Croce & Hein 2020, Alg. 1) with per-example step sizes.

  Iteration k = 0..N-1 produces x^(k+1) (k = 0: plain step, then momentum
  alpha = 0.75) and evaluates it. At a checkpoint k = w_j the step size of an
  example is halved and it restarts from its best point x_max when
  (1) fewer than rho * (w_j - w_{j-1}) of the steps i in [w_{j-1}, w_j - 1]
  increased its loss, or (2) its step size was not halved at w_{j-1} and its
  best loss has not changed since. After a restart the momentum term is
  x_max - x^(k), literally as in Alg. 1, and the gradient is the one stored
  with x_max (recomputing it would cost an extra pass in every iteration
  under jit/vmap, where a data-dependent branch runs both sides).
  """
  n_iter = cfg.steps
  w = apgd_checkpoints(n_iter)
  is_ckpt = np.zeros(n_iter, bool)
  window = np.zeros(n_iter, np.float32)
  for prev, cur in zip(w[:-1], w[1:]):
    is_ckpt[cur] = True
    window[cur] = cur - prev

  x0 = random_start(key, x, cfg)
  logits0, f0, g0 = evaluate(x0)
  tr = record(tr, x0, logits0, f0)
  eta0 = jnp.full(x.shape[:1], 2.0 * cfg.epsilon, x.dtype)
  zero_count = jnp.zeros(x.shape[:1], jnp.float32)
  carry0 = dict(
      x_prev=x0, x_cur=x0, f_cur=f0, g_cur=g0, eta=eta0,
      x_max=x0, f_max=f0, g_max=g0,
      count=zero_count, eta_last=eta0, f_max_last=f0, tr=tr,
  )

  def body(c, xs):
    k, ckpt, win = xs
    eta = _bcast(c["eta"], x)
    x_cur = c["x_cur"]
    z = pgd_step(x_cur, c["g_cur"], x, cfg, eta)
    a = _APGD_MOMENTUM
    x_mom = project(x_cur + a * (z - x_cur) + (1 - a) * (x_cur - c["x_prev"]), x, cfg)
    x_new = jnp.where(k == 0, z, x_mom)
    logits, f_new, g_new = evaluate(x_new)
    tr = record(c["tr"], x_new, logits, f_new)

    increased = (f_new > c["f_cur"]).astype(jnp.float32)
    improved = f_new > c["f_max"]
    x_max = jnp.where(_bcast(improved, x), x_new, c["x_max"])
    g_max = jnp.where(_bcast(improved, x), g_new, c["g_max"])
    f_max = jnp.where(improved, f_new, c["f_max"])

    cond1 = c["count"] < _APGD_RHO * win
    cond2 = (c["eta"] == c["eta_last"]) & (f_max == c["f_max_last"])
    reduce = ckpt & (cond1 | cond2)
    rb = _bcast(reduce, x)
    return dict(
        x_prev=x_cur,
        x_cur=jnp.where(rb, x_max, x_new),
        f_cur=jnp.where(reduce, f_max, f_new),
        g_cur=jnp.where(rb, g_max, g_new),
        eta=jnp.where(reduce, 0.5 * c["eta"], c["eta"]),
        x_max=x_max, f_max=f_max, g_max=g_max,
        # the increase at i = w_j opens the next window
        count=jnp.where(ckpt, increased, c["count"] + increased),
        eta_last=jnp.where(ckpt, c["eta"], c["eta_last"]),
        f_max_last=jnp.where(ckpt, f_max, c["f_max_last"]),
        tr=tr,
    ), None

  xs = (jnp.arange(n_iter), jnp.asarray(is_ckpt), jnp.asarray(window))
  c, _ = lax.scan(body, carry0, xs)
  return c["tr"]


def _last_iterate(cfg: AttackConfig, logits_fn: LogitsFn, params, x, y, key) -> AttackResult:
  """FGSM/PGD's final point after its gradient steps (``track_best=False``).

  Starts where restart 0 of the tracking attack starts (same key use), so
  both follow the same trajectory; only the bookkeeping differs.
  """
  params = lax.stop_gradient(params)
  x = lax.stop_gradient(x)
  num_classes = jax.eval_shape(logits_fn, params, x).shape[-1]
  target = target_labels(key, y, num_classes) if cfg.targeted else None
  evaluate = _make_evaluate(cfg, logits_fn, params, y, target)
  step_size = cfg.resolved_step_size()

  def body(_, carry):
    xk, correct = carry
    logits, _, g = evaluate(xk)
    correct = correct & (jnp.argmax(logits, axis=-1) == y)
    return pgd_step(xk, g, x, cfg, step_size), correct

  x0 = random_start(_restart_key(key, 0), x, cfg)
  x_adv, correct = lax.fori_loop(0, cfg.resolved_steps(), body,
                                 (x0, jnp.ones(y.shape, bool)))
  return AttackResult(lax.stop_gradient(x_adv), correct)


def _run(cfg: AttackConfig, logits_fn: LogitsFn, params, x, y, key, aim=None, targets=None,
         mask=None) -> _Track:
  """Clean batch + all restarts of one attack, as a _Track.

  aim: None (ascend the summed objective of the batch), or an example index
  (possibly traced): ascend that example's objective alone, perturbing the
  whole batch; the track then keeps, in every row, the batch strongest
  against that example, while `correct` still covers every row.
  targets: optional (B,) target classes of a targeted attack (default:
  target_labels(key, ...)). mask: optional (B,) bool, the rows whose
  objectives are summed (not with aim).
  """
  if not cfg.track_best:
    raise ValueError("worst_case compares tracked attacks; use track_best=True")
  params = lax.stop_gradient(params)
  x = lax.stop_gradient(x)
  logits = logits_fn(params, x)
  if targets is not None and not cfg.targeted:
    raise ValueError("targets are for a targeted attack; set targeted=True")
  target = targets
  if cfg.targeted and targets is None:
    target = target_labels(key, y, logits.shape[-1])
  tr = _Track(
      x=x,
      tier=jnp.full(y.shape, -1, jnp.int32),
      obj=jnp.full(y.shape, -jnp.inf, logits.dtype),
      margin=jnp.full(y.shape, -jnp.inf, logits.dtype),
      correct=jnp.ones(y.shape, bool),
  )

  def record(tr, xb, logits, obj):
    return _track_update(tr, xb, logits, obj, y, target, aim)

  # The clean batch counts as evaluated: robust accuracy <= clean accuracy.
  tr = record(tr, x, logits, _rows_objective(logits, y, cfg.loss, target, aim))
  evaluate = _make_evaluate(cfg, logits_fn, params, y, target, aim, mask)

  def one_restart(r, tr):
    k = _restart_key(key, r)
    if cfg.name == "apgd":
      return _apgd_restart(cfg, evaluate, record, x, k, tr)
    return _pgd_restart(cfg, evaluate, record, x, k, tr, cfg.resolved_steps(),
                        cfg.resolved_step_size())

  tr = lax.fori_loop(0, cfg.restarts, one_restart, tr)
  return jax.tree.map(lax.stop_gradient, tr)


# ----------------------------------------------------------------------------
# Public API.


def attack(cfg: AttackConfig, logits_fn: LogitsFn, params, x, y, key, *, targets=None,
           mask=None) -> AttackResult:
  """Runs the attack named by `cfg.name`.

  Args:
    cfg: static attack configuration.
    logits_fn: static model, (params, (B, H, W, C)) -> (B, num_classes).
    params: model parameters (pytree).
    x: (B, H, W, C) clean inputs in [cfg.clip_min, cfg.clip_max].
    y: (B,) int true labels.
    key: typed PRNG key (jax.random.key); targets come from
      target_labels(key, ...), restart r from a fold_in of it.
    targets: optional (B,) classes a targeted attack moves towards instead.
    mask: optional (B,) bool: only these rows' objectives are ascended (the
      others stay in the batch, and correct still covers them).
  Returns:
    AttackResult with x_adv (B, H, W, C) and correct (B,).
  """
  if not cfg.track_best:
    if targets is not None or mask is not None:
      raise ValueError("targets and mask need track_best=True")
    return _last_iterate(cfg, logits_fn, params, x, y, key)
  tr = _run(cfg, logits_fn, params, x, y, key, targets=targets, mask=mask)
  return AttackResult(tr.x, tr.correct)


def fgsm(cfg: AttackConfig, logits_fn: LogitsFn, params, x, y, key) -> AttackResult:
  """FGSM: one ascent step (default size epsilon) from x or, with
  random_start, from a random point in the ball (Wong et al. 2020 use a step
  of 1.25 * epsilon there). Shapes as in :func:`attack`."""
  return attack(dataclasses.replace(cfg, name="fgsm"), logits_fn, params, x, y, key)


def pgd(cfg: AttackConfig, logits_fn: LogitsFn, params, x, y, key) -> AttackResult:
  """PGD (Madry et al. 2018): cfg.steps sign (Linf) / normalised (L2)
  gradient steps, each followed by projection. Shapes as in :func:`attack`."""
  return attack(dataclasses.replace(cfg, name="pgd"), logits_fn, params, x, y, key)


def apgd(cfg: AttackConfig, logits_fn: LogitsFn, params, x, y, key) -> AttackResult:
  """APGD (Croce & Hein 2020) with cfg.steps iterations per restart.
  Shapes as in :func:`attack`."""
  return attack(dataclasses.replace(cfg, name="apgd"), logits_fn, params, x, y, key)


def _strongest(correct: jax.Array, margin: jax.Array) -> jax.Array:
  """Index along axis 0 of the attack to take a point from: one that
  misclassified the example if any did, the largest margin among those.
  correct, margin: (A, ...) -> (...) int."""
  fooled = ~correct
  eligible = fooled | ~jnp.any(fooled, axis=0, keepdims=True)
  return jnp.argmax(jnp.where(eligible, margin, -jnp.inf), axis=0)


def worst_case(
    cfg_list: Sequence[AttackConfig], logits_fn: LogitsFn, params, x, y, key
) -> AttackResult:
  """Ensemble of attacks; attack i runs with key jax.random.fold_in(key, i).

  correct is the AND over attacks; x_adv per example comes from an attack that
  misclassified it if any did, choosing the largest margin
  max_{j!=y} z_j - z_y (comparable across losses) among those.
  Shapes as in :func:`attack`.
  """
  if not cfg_list:
    raise ValueError("worst_case needs at least one attack")
  tracks = [
      _run(c, logits_fn, params, x, y, jax.random.fold_in(key, i))
      for i, c in enumerate(cfg_list)
  ]
  st = jax.tree.map(lambda *a: jnp.stack(a), *tracks)  # leading attack axis
  best = _strongest(st.correct, st.margin)  # (B,)
  x_adv = jnp.take_along_axis(st.x, _bcast(best, x)[None], axis=0)[0]
  return AttackResult(x_adv, jnp.all(st.correct, axis=0))


def per_example(
    cfg_list: Sequence[AttackConfig], logits_fn: LogitsFn, params, x, y, key, *, chunk: int = 0
) -> AttackResult:
  """Aimed attacks: for every example i, each attack ascends example i's
  objective alone while perturbing the whole batch (B attacks per config).

  Where the model normalises with its batch's statistics, the other rows'
  perturbations move those statistics against example i, which an attack on
  the summed objective, pulling every row its own way, does not search for.
  Attack a aimed at example i runs with key fold_in(fold_in(key, a), i).

  Accounting as everywhere in this module: ``correct[j]`` is True iff example
  j was classified correctly in every batch any aimed attack evaluated, not
  only those aimed at j. Every such batch lies in the threat model (each row
  in its own ball and the box), so a misclassification there is as valid a
  witness as one found by the attack aimed at j; ignoring it would only
  overstate robustness.

  Args:
    cfg_list, logits_fn, params, x, y, key: as for :func:`worst_case`.
    chunk: aims vmapped together: 0 all B at once, n > 0 a ``lax.map`` over
      chunks of n (same results, less memory).
  Returns:
    AttackResult with x_adv (B, B, H, W, C), x_adv[i] the whole batch
    strongest against example i (choice as in :func:`worst_case`), and
    correct (B,).
  """
  if not cfg_list:
    raise ValueError("per_example needs at least one attack")
  if chunk < 0:
    raise ValueError(f"chunk must be >= 0, got {chunk}")
  keys = [jax.random.fold_in(key, a) for a in range(len(cfg_list))]

  def aimed(i):
    tracks = [_run(c, logits_fn, params, x, y, jax.random.fold_in(k, i), aim=i)
              for c, k in zip(cfg_list, keys)]
    st = jax.tree.map(lambda *a: jnp.stack(a), *tracks)  # (A, B, ...)
    best = _strongest(st.correct[:, i], st.margin[:, i])  # one attack for row i
    return st.x[best], jnp.all(st.correct, axis=0)

  aims = jnp.arange(y.shape[0])
  if chunk:
    x_adv, correct = lax.map(aimed, aims, batch_size=chunk)
  else:
    x_adv, correct = jax.vmap(aimed)(aims)
  return AttackResult(x_adv, jnp.all(correct, axis=0))


def alone(
    cfg_list: Sequence[AttackConfig], logits_fn: LogitsFn, params, x, y, key, *, chunk: int = 0
) -> AttackResult:
  """Each example attacked by itself, the rest of its batch left clean (B attacks per config).

  The threat model where the adversary controls one query at a time: example i
  may move in its ball while the other rows stay at their clean values. Under
  batch-statistics normalisation the clean rows still enter example i's
  normalisation (so this is weaker than :func:`per_example`, which moves them
  against it); with support-set statistics each query's logits depend on it
  alone, and this equals the joint attack's per-example worst case. Example i's
  attacks run :func:`worst_case` on the one-row problem with key ``fold_in(key, i)``.

  Args:
    cfg_list, logits_fn, params, x, y, key: as for :func:`worst_case`.
    chunk: examples attacked together: 0 all B at once (vmap), n > 0 a ``lax.map``
      over chunks of n (same results, less memory).
  Returns:
    AttackResult with x_adv (B, H, W, C), row i the strongest point found for
    example i (to be evaluated with the other rows clean), and correct (B,):
    example i survived every attack on it.
  """
  if not cfg_list:
    raise ValueError("alone needs at least one attack")

  def one(i):
    def logits_of_row(p, xi):  # xi: (1, H, W, C) -> (1, N), the batch otherwise clean
      return lax.dynamic_index_in_dim(logits_fn(p, x.at[i].set(xi[0])), i, keepdims=True)
    row = lambda a: lax.dynamic_index_in_dim(a, i, keepdims=True)
    res = worst_case(cfg_list, logits_of_row, params, row(x), row(y), jax.random.fold_in(key, i))
    return res.x_adv[0], res.correct[0]

  rows = jnp.arange(y.shape[0])
  x_adv, correct = lax.map(one, rows, batch_size=chunk) if chunk else jax.vmap(one)(rows)
  return AttackResult(x_adv, correct)


__all__ = [
    "AttackConfig", "AttackResult", "attack", "fgsm", "pgd", "apgd", "worst_case", "per_example",
    "alone",
    "perturbation_norm", "project", "pgd_step", "attack_objective", "margin_loss",
    "target_labels", "apgd_checkpoints", "check_ball",
]
