"""FAB, the fast adaptive boundary attack (Croce & Hein 2020, ICML), targeted.

A minimum-norm attack: at the current point x_k it linearises the boundary
between the true class y and the target t, f(u) = z_y(u) - z_t(u) ~ f(x_k) +
g . (u - x_k), and projects both x_k and the clean x onto that hyperplane
within the box (the minimum L-inf or L2 norm step, :func:`project_hyperplane`).
The next point is the biased combination

  x_{k+1} = clip((1 - a) (x_k + eta d_k) + a (x + eta d_x)),
  a = min(|d_k| / (|d_k| + |d_x|), alpha_max),

with overshoot eta = 1.05 and alpha_max = 0.1; when x_{k+1} is misclassified
it is kept if closer to x than the best so far and pulled back,
x_{k+1} <- (1 - beta) x + beta x_{k+1}, beta = 0.9. Restart 0 starts at x,
restart r > 0 at a random point of radius min(best norm, epsilon) / 2 (the
published defaults). An example is not robust at epsilon when an adversarial
point of norm <= epsilon is found.

Accounting with batch-coupled models: FAB's iterates are not confined to the
epsilon ball, and with batch norm a row's prediction depends on the other
rows, so a batch with some row outside the ball is outside the threat model.
Correctness is therefore judged on each iterate projected into the ball (one
more forward pass per iteration, and the clean batch): every row of such a
batch is admissible. Without coupling this finds every adversarial point of
norm <= epsilon that FAB's own test would (those rows are unchanged by the
projection), and possibly more. The gradient is that of the summed f, as in
:mod:`advmaml.adversary.attacks`; without coupling it is each row's own.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from advmaml.adversary.attacks import AttackConfig, LogitsFn, check_ball, perturbation_norm, project

_BISECTIONS = 50
_TINY = 1e-12


@dataclasses.dataclass(frozen=True)
class FabConfig:
  """Static description of a targeted FAB attack (hashable).

  Attributes:
    norm: "linf" | "l2".
    epsilon: the radius at which robustness is judged.
    steps: iterations per restart (100 in AutoAttack).
    restarts: runs; restart 0 from x, the others from random points.
    eta, beta, alpha_max: overshoot, backward step and bias bound.
    clip_min, clip_max: valid input range.
  """

  norm: str = "linf"
  epsilon: float = 0.1
  steps: int = 100
  restarts: int = 1
  eta: float = 1.05
  beta: float = 0.9
  alpha_max: float = 0.1
  clip_min: float = 0.0
  clip_max: float = 1.0

  def __post_init__(self):
    check_ball(self.norm, self.epsilon)
    if self.steps < 1 or self.restarts < 1:
      raise ValueError("steps and restarts must be >= 1")

  def ball(self) -> AttackConfig:
    """The epsilon ball and box, for projections."""
    return AttackConfig(norm=self.norm, epsilon=self.epsilon, clip_min=self.clip_min,
                        clip_max=self.clip_max)


class FabResult(NamedTuple):
  """Output of :func:`fab`.

  Attributes:
    x_adv: (B, H, W, C) per example the admissible (in-ball) point where it
      was first misclassified, x where it never was.
    correct: (B,) bool, right at every evaluated in-ball batch (clean included).
    x_min: (B, H, W, C) the closest misclassified point found (any norm).
    norm: (B,) its distance to x (inf where none was found).
  """

  x_adv: jax.Array
  correct: jax.Array
  x_min: jax.Array
  norm: jax.Array


def project_hyperplane(w: jax.Array, c: jax.Array, lo: jax.Array, hi: jax.Array,
                       norm: str) -> jax.Array:
  """Smallest delta (in the L-inf or L2 norm) with w . delta = c and lo <= delta <= hi.

  w, lo, hi: (B, D) with lo <= 0 <= hi; c: (B,). The minimiser is
  clip(t * dir, lo, hi) with dir = sign(c) sign(w) (L-inf) or sign(c) w (L2)
  and t >= 0 the smallest value reaching the plane; h(t) = sign(c) w . delta(t)
  is nondecreasing, so t is found by bisection. Where the plane cannot be
  reached within the box, the delta that comes closest (all coordinates at
  their bound) is returned.
  """
  s = jnp.sign(c)[:, None]
  direction = s * (jnp.sign(w) if norm == "linf" else w)
  reach = jnp.where(direction > 0, hi, -lo)  # how far each coordinate can move
  mag = jnp.abs(direction)
  t_max = jnp.max(jnp.where(mag > _TINY, reach / jnp.maximum(mag, _TINY), 0.0), axis=1)
  target = jnp.abs(c)
  delta = lambda t: jnp.clip(t[:, None] * direction, lo, hi)
  reached = lambda t: jnp.sum(s * w * delta(t), axis=1) >= target

  def bisect(_, bounds):
    a, b = bounds
    mid = 0.5 * (a + b)
    ok = reached(mid)
    return jnp.where(ok, a, mid), jnp.where(ok, mid, b)

  _, t = lax.fori_loop(0, _BISECTIONS, bisect, (jnp.zeros_like(t_max), t_max))
  return delta(t)


def _flat(a):
  return a.reshape(a.shape[0], -1)


def _restart(cfg: FabConfig, grad_fn, logits_fn, params, x, y, active, start, st):
  """One FAB run from ``start``; st = (x_adv, correct, x_min, norm)."""
  lo, hi = _flat(cfg.clip_min - x), _flat(cfg.clip_max - x)
  ball = cfg.ball()
  act = active[:, None, None, None]

  def body(_, carry):
    xk, (x_adv, correct, x_min, best) = carry
    f, g = grad_fn(xk)  # (B,), (B, H, W, C)
    w = _flat(g)
    # Projections onto the linearised boundary f(x_k) + w . (u - x_k) = 0.
    d_k = project_hyperplane(w, -f, lo - _flat(xk - x), hi - _flat(xk - x), cfg.norm)
    c_x = -f + jnp.sum(w * _flat(xk - x), axis=1)
    d_x = project_hyperplane(w, c_x, lo, hi, cfg.norm)
    n_k, n_x = perturbation_norm(d_k, cfg.norm), perturbation_norm(d_x, cfg.norm)
    n_k, n_x = jnp.maximum(n_k, 1e-8), jnp.maximum(n_x, 1e-8)
    alpha = jnp.minimum(n_k / (n_k + n_x), cfg.alpha_max)[:, None]
    step = ((1 - alpha) * (_flat(xk) + cfg.eta * d_k) + alpha * (_flat(x) + cfg.eta * d_x))
    x_new = jnp.clip(step.reshape(x.shape), cfg.clip_min, cfg.clip_max)
    x_new = jnp.where(act, x_new, x)
    adv = active & (jnp.argmax(logits_fn(params, x_new), -1) != y)
    dist = perturbation_norm(x_new - x, cfg.norm)
    closer = adv & (dist < best)
    x_min = jnp.where(closer[:, None, None, None], x_new, x_min)
    best = jnp.where(closer, dist, best)
    # The admissible batch: every row inside the ball.
    x_in = project(x_new, x, ball)
    wrong = jnp.argmax(logits_fn(params, x_in), -1) != y
    first = correct & wrong
    x_adv = jnp.where(first[:, None, None, None], x_in, x_adv)
    x_next = jnp.where(adv[:, None, None, None], (1 - cfg.beta) * x + cfg.beta * x_new, x_new)
    return x_next, (x_adv, correct & ~wrong, x_min, best)

  return lax.fori_loop(0, cfg.steps, body, (start, st))[1]


def fab(cfg: FabConfig, logits_fn: LogitsFn, params, x, y, key, target, *,
        mask: jax.Array | None = None) -> FabResult:
  """Targeted FAB towards ``target`` (B,) classes.

  Args:
    cfg: static configuration.
    logits_fn: static model, (params, (B, H, W, C)) -> (B, num_classes).
    params: model parameters (pytree).
    x: (B, H, W, C) clean inputs in the box; y: (B,) labels.
    key: typed PRNG key; restart r draws its start from fold_in(key, r).
    mask: optional (B,) bool, the rows to attack (the others stay clean).
  Returns:
    FabResult.
  """
  params = lax.stop_gradient(params)
  x = lax.stop_gradient(x)
  active = jnp.ones(y.shape, bool) if mask is None else mask

  def total(xb):
    z = logits_fn(params, xb)
    pick = lambda labels: jnp.take_along_axis(z, labels[:, None], axis=-1)[:, 0]
    f = pick(y) - pick(target)
    return jnp.sum(jnp.where(active, f, 0.0)), f

  g_fn = jax.grad(total, has_aux=True)

  def grad_fn(xb):
    g, f = g_fn(xb)
    return f, g

  correct = jnp.argmax(logits_fn(params, x), -1) == y  # the clean batch counts
  st = (x, correct, x, jnp.full(y.shape, jnp.inf, x.dtype))

  def one_restart(r, st):
    # Restart r > 0: a random start at distance min(best, epsilon) / 2 along a
    # uniform (L-inf) or Gaussian (L2) direction.
    k = jax.random.fold_in(key, r)
    u = (jax.random.uniform(k, x.shape, x.dtype, -1.0, 1.0) if cfg.norm == "linf"
         else jax.random.normal(k, x.shape, x.dtype))
    u = u / jnp.maximum(perturbation_norm(u, cfg.norm), _TINY)[:, None, None, None]
    radius = jnp.where(r > 0, 0.5 * jnp.minimum(st[3], cfg.epsilon), 0.0)
    start = jnp.clip(x + radius[:, None, None, None] * u, cfg.clip_min, cfg.clip_max)
    start = jnp.where(active[:, None, None, None], start, x)
    return _restart(cfg, grad_fn, logits_fn, params, x, y, active, start, st)

  x_adv, correct, x_min, norm = lax.fori_loop(0, cfg.restarts, one_restart, st)
  return FabResult(lax.stop_gradient(x_adv), correct, lax.stop_gradient(x_min), norm)


__all__ = ["FabConfig", "FabResult", "fab", "project_hyperplane"]
