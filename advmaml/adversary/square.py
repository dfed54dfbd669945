"""Square Attack (Andriushchenko, Croce, Flammarion & Hein 2020), L-inf and L2.

A score-based black-box attack: random search that changes one random square
window of each example per query, keeping the change where the margin
z_y - max_{j!=y} z_j drops. The window covers a fraction p of the image, p
following the paper's piecewise-constant schedule (p_init halved after 10, 50,
200, 500, 1000, 2000, 4000, 6000 and 8000 of 10,000 queries, rescaled to the
budget). Examples already misclassified are not searched further.

* L-inf: start from vertical stripes (each column and channel shifted by
  +-epsilon); a proposal moves the window to a random vertex of the ball, one
  sign per channel.
* L2: start from a 5 x 5 mosaic of pseudo-Gaussian bumps with random signs,
  scaled to norm epsilon; a proposal puts a new bump (plus the window's old
  perturbation, normalised) into window 1, moves the mass of window 2 there
  (window 2 is zeroed), and rescales the whole perturbation to norm epsilon.
  The bump of an s x s window is two rectangles of nested squares weighted
  1 / (k + 1)^2, of opposite signs, transposed at random.

Only logits are used, never gradients: the attack's use in an evaluation is
to catch gradient masking, which it does not see.

Batch-coupled models (batch norm over the attacked batch): every query
evaluates one whole batch, in which each still-robust row carries its own
proposal; rows accept independently, so the loss a row keeps is the one of
the batch it was accepted in, while correctness is judged, as everywhere in
:mod:`advmaml.adversary.attacks`, only on the batches actually evaluated (the clean
batch, the start and every query). Without coupling this is the published
attack.

Deviation, for jit: where an L-inf proposal would not change the window, the
original redraws its signs; here 4 draws are made at once and the first that
changes the window is taken (with one channel a window is otherwise
unchanged half the time late in the run, when windows are single pixels).
The L2 bump's random transposition is drawn per example, where AutoAttack's
code draws one per query for the whole batch.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from advmaml.adversary.attacks import AttackResult, LogitsFn, check_ball, margin_loss

# Fractions of 10,000 queries after which p halves (Andriushchenko et al. 2020).
_P_STEPS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_SIGN_DRAWS = 4
_TINY = 1e-12


@dataclasses.dataclass(frozen=True)
class SquareConfig:
  """Static description of a Square attack (hashable).

  Attributes:
    norm: "linf" | "l2".
    epsilon: radius of the ball.
    queries: model evaluations per restart after the start (5000 in
      AutoAttack's standard version).
    p_init: initial fraction of the image a window covers (0.8 in AutoAttack).
    restarts: independent runs (restart r from fold_in(key, r)).
    clip_min, clip_max: valid input range.
  """

  norm: str = "linf"
  epsilon: float = 0.1
  queries: int = 5000
  p_init: float = 0.8
  restarts: int = 1
  clip_min: float = 0.0
  clip_max: float = 1.0

  def __post_init__(self):
    check_ball(self.norm, self.epsilon)
    if self.queries < 1 or self.restarts < 1:
      raise ValueError("queries and restarts must be >= 1")
    if not 0 < self.p_init <= 1:
      raise ValueError(f"p_init must be in (0, 1], got {self.p_init}")


def p_schedule(p_init: float, query, queries: int) -> jax.Array:
  """Fraction of pixels the window of query ``query`` (0-based, traced) changes."""
  it = jnp.floor(query / queries * 10000)
  halvings = sum((it > t).astype(jnp.int32) for t in _P_STEPS)
  return p_init / 2.0 ** halvings


def window_side(p, height: int, width: int, norm: str = "linf") -> jax.Array:
  """Side s of the square window: round(sqrt(p * H * W)), at least 1 (L-inf)
  or the odd number >= 3 (L2), at most min(H, W) - 1 (or 1)."""
  s = jnp.round(jnp.sqrt(p * height * width)).astype(jnp.int32)
  if norm == "l2":
    s = jnp.maximum(s, 3)
    s = s + (s % 2 == 0)
  return jnp.clip(s, 1, max(min(height, width) - 1, 1))


# ----------------------------------------------------------------------------
# The L2 bump.


def _cumulative_weights(n: int) -> np.ndarray:
  """C[m] = sum_{k < m} 1 / (k + 1)^2 for m = 0..n."""
  return np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n + 1) ** 2)]).astype(np.float32)


def _rectangle(i, j, a, b, cum):
  """The a x b rectangle's bump at (i, j), unnormalised: the nested squares
  k = 0 .. K-1 (K = max(a // 2, b // 2) + 1) centred at (a // 2, b // 2),
  square k of side 2k + 1 weighted 1 / (k + 1)^2, summed over the squares
  that contain (i, j): those k >= its Chebyshev distance to the centre.
  Zero outside the rectangle."""
  ci, cj = a // 2, b // 2
  k0 = jnp.maximum(jnp.abs(i - ci), jnp.abs(j - cj))
  big_k = jnp.maximum(ci, cj) + 1
  inside = (i >= 0) & (i < a) & (j >= 0) & (j < b)
  return jnp.where(inside, jnp.take(cum, big_k) - jnp.take(cum, jnp.minimum(k0, big_k)), 0.0)


def bump(i, j, s, grid: int):
  """The s x s window's bump at local coordinates (i, j) (any shape, zero
  outside the window): the upper s // 2 rows a unit-norm rectangle bump, the
  lower rows minus one, the whole of unit norm. s may be traced; grid >= s
  bounds it (for the normalising sums)."""
  cum = jnp.asarray(_cumulative_weights(grid + 1))
  g = jnp.arange(grid)
  gi, gj = g[:, None], g[None, :]
  top, low = s // 2, s - s // 2
  norm_of = lambda a: jnp.sqrt(jnp.sum(_rectangle(gi, gj, a, s, cum) ** 2))
  n_top, n_low = norm_of(top), norm_of(low)
  upper = _rectangle(i, j, top, s, cum) / jnp.maximum(n_top, _TINY)
  lower = _rectangle(i - top, j, low, s, cum) / jnp.maximum(n_low, _TINY)
  total = jnp.sqrt((n_top > 0).astype(jnp.float32) + (n_low > 0))
  return (upper - lower) / total


def _l2_start(key, x, eps):
  """The mosaic: tiles of side H // 5 (centred), each a bump with a random
  transposition and a random sign per example and channel; norm eps."""
  b, h, w, c = x.shape
  side = max(h // 5, 1)
  offset_h, offset_w = max((h - 5 * side) // 2, 0), max((w - 5 * side) // 2, 0)
  rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
  tile_i = np.where((rows >= offset_h) & (rows < offset_h + (h - offset_h) // side * side),
                    (rows - offset_h) // side, -1)
  tile_j = np.where((cols >= offset_w) & (cols < offset_w + (w - offset_w) // side * side),
                    (cols - offset_w) // side, -1)
  inside = (tile_i >= 0) & (tile_j >= 0)  # (H, W)
  n_j = max((w - offset_w) // side, 1)
  tile = np.where(inside, tile_i * n_j + tile_j, 0)
  li, lj = (rows - offset_h) % side, (cols - offset_w) % side
  k_t, k_s = jax.random.split(key)
  n_tiles = int(tile.max()) + 1
  flip = jax.random.bernoulli(k_t, 0.5, (b, n_tiles))[:, tile]  # (B, H, W)
  pattern = jnp.where(flip, bump(lj, li, side, max(h, w)), bump(li, lj, side, max(h, w)))
  signs = jax.random.rademacher(k_s, (b, n_tiles, c), x.dtype)
  delta = jnp.where(inside[None, :, :, None], pattern[..., None] * signs[:, tile], 0.0)
  return delta


def _l2_norm(d):
  return jnp.sqrt(jnp.sum(d * d, axis=(1, 2, 3)))


def _scale_to(delta, x, eps, lo, hi):
  """x + delta rescaled to L2 norm eps, clipped to the box."""
  n = _l2_norm(delta)[:, None, None, None]
  return jnp.clip(x + eps * delta / jnp.maximum(n, _TINY), lo, hi)


# ----------------------------------------------------------------------------
# The search.


class _State(NamedTuple):
  x_best: jax.Array    # (B, H, W, C)
  margin: jax.Array    # (B,) z_y - max_{j!=y} z_j at the accepted point (> 0: correct)
  correct: jax.Array   # (B,) bool, AND over every evaluated batch


def _evaluate(logits_fn, params, xb, y):
  logits = logits_fn(params, xb)
  return -margin_loss(logits, y), jnp.argmax(logits, -1) == y


def _window(key, b, h, w, s):
  """A random s x s window per example: its mask (B, H, W, 1) and the local
  coordinates of every pixel relative to its corner, (B, H, W) each."""
  corner = jax.random.randint(key, (b, 2), 0, jnp.array([h, w]) - s + 1)
  li = jnp.arange(h)[None, :, None] - corner[:, :1, None]
  lj = jnp.arange(w)[None, None, :] - corner[:, 1:, None]
  mask = (li >= 0) & (li < s) & (lj >= 0) & (lj < s)
  return mask[..., None], li, lj


def _propose_linf(cfg, key, x, x_best, s):
  b, h, w, c = x.shape
  k_pos, k_sign = jax.random.split(key)
  window, _, _ = _window(k_pos, b, h, w, s)
  signs = jax.random.rademacher(k_sign, (_SIGN_DRAWS, b, 1, 1, c), x.dtype)
  vertex = jnp.clip(x + cfg.epsilon * signs, cfg.clip_min, cfg.clip_max)  # (T, B, H, W, C)
  changes = jnp.any(window & (jnp.abs(vertex - x_best) > 1e-7), axis=(2, 3, 4))  # (T, B)
  pick = jnp.argmax(changes, axis=0)  # the first draw that changes the window, else draw 0
  vertex = jnp.take_along_axis(vertex, pick[None, :, None, None, None], axis=0)[0]
  return jnp.where(window, vertex, x_best)


def _propose_l2(cfg, key, x, x_best, s):
  b, h, w, c = x.shape
  eps = cfg.epsilon
  k1, k2, k_flip, k_sign = jax.random.split(key, 4)
  w1, li, lj = _window(k1, b, h, w, s)
  w2, _, _ = _window(k2, b, h, w, s)
  delta = x_best - x
  per_channel = lambda d: jnp.sqrt(jnp.sum(d * d, axis=(1, 2), keepdims=True))  # (B, 1, 1, C)
  norm_w1 = per_channel(jnp.where(w1, delta, 0.0))
  norm_windows = _l2_norm(jnp.where(w1 | w2, delta, 0.0))[:, None, None, None]
  norm_image = _l2_norm(delta)[:, None, None, None]
  flip = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1))
  pattern = jnp.where(flip, bump(lj, li, s, max(h, w)), bump(li, lj, s, max(h, w)))[..., None]
  new = pattern * jax.random.rademacher(k_sign, (b, 1, 1, c), x.dtype)
  new = jnp.where(w1, new + delta / (_TINY + norm_w1), 0.0)
  # The window gets the budget left over plus the mass of both windows.
  budget = jnp.sqrt(jnp.maximum(eps ** 2 - norm_image ** 2, 0.0) / c + norm_windows ** 2)
  new = new / (_TINY + per_channel(new)) * budget
  delta = jnp.where(w1, new, jnp.where(w2, 0.0, delta))
  return _scale_to(delta, x, eps, cfg.clip_min, cfg.clip_max)


def _restart(cfg: SquareConfig, logits_fn, params, x, y, key, active, correct):
  """One run; returns (x_best, margin, correct AND its evaluations)."""
  b, h, w, c = x.shape
  eps, lo, hi = cfg.epsilon, cfg.clip_min, cfg.clip_max
  act = active[:, None, None, None]
  k0 = jax.random.fold_in(key, 0)
  if cfg.norm == "linf":
    start = jnp.clip(x + eps * jax.random.rademacher(k0, (b, 1, w, c), x.dtype), lo, hi)
  else:
    start = _scale_to(_l2_start(k0, x, eps), x, eps, lo, hi)
  x0 = jnp.where(act, start, x)
  margin, ok = _evaluate(logits_fn, params, x0, y)
  propose = _propose_linf if cfg.norm == "linf" else _propose_l2

  def body(i, st: _State) -> _State:
    s = window_side(p_schedule(cfg.p_init, i, cfg.queries), h, w, cfg.norm)
    search = active & (st.margin > 0)  # rows still correct
    x_new = jnp.where(search[:, None, None, None],
                      propose(cfg, jax.random.fold_in(key, i + 1), x, st.x_best, s), st.x_best)
    margin, ok = _evaluate(logits_fn, params, x_new, y)
    accept = search & (margin < st.margin)
    return _State(x_best=jnp.where(accept[:, None, None, None], x_new, st.x_best),
                  margin=jnp.where(accept, margin, st.margin), correct=st.correct & ok)

  st = lax.fori_loop(0, cfg.queries, body, _State(x0, margin, correct & ok))
  return st.x_best, st.margin, st.correct


def square(cfg: SquareConfig, logits_fn: LogitsFn, params, x, y, key, *,
           mask: jax.Array | None = None) -> AttackResult:
  """Square Attack, untargeted.

  Args:
    cfg: static configuration.
    logits_fn: static model, (params, (B, H, W, C)) -> (B, num_classes).
    params: model parameters (pytree).
    x: (B, H, W, C) clean inputs in [cfg.clip_min, cfg.clip_max].
    y: (B,) int labels.
    key: typed PRNG key; restart r uses fold_in(key, r).
    mask: optional (B,) bool, the rows to attack (default all); the others
      stay clean in every batch (as when AutoAttack drops broken examples).
  Returns:
    AttackResult: x_adv (B, H, W, C) per example its accepted point of lowest
    margin over the restarts, correct (B,) True iff right at every evaluated
    batch, the clean one included.
  """
  params = lax.stop_gradient(params)
  x = lax.stop_gradient(x)
  active = jnp.ones(y.shape, bool) if mask is None else mask
  margin0, correct0 = _evaluate(logits_fn, params, x, y)

  def one_restart(r, carry):
    x_best, margin, correct = carry
    xr, mr, correct = _restart(cfg, logits_fn, params, x, y, jax.random.fold_in(key, r), active,
                               correct)
    better = mr < margin
    return jnp.where(better[:, None, None, None], xr, x_best), jnp.where(better, mr, margin), correct

  x_adv, _, correct = lax.fori_loop(0, cfg.restarts, one_restart, (x, margin0, correct0))
  return AttackResult(lax.stop_gradient(x_adv), correct)


__all__ = ["SquareConfig", "square", "p_schedule", "window_side", "bump"]
