"""Square Attack (Andriushchenko, Croce, Flammarion & Hein 2020), L-inf.

A score-based black-box attack: random search over perturbations at the
vertices of the L-inf ball. It starts from vertical stripes (each column and
channel of the image shifted by +-epsilon) and then, once per query, moves one
random square window of each example to a random vertex (one sign per
channel), keeping the change where the margin z_y - max_{j!=y} z_j drops.
The window covers a fraction p of the image, p following the paper's
piecewise-constant schedule (p_init halved at 10, 50, 200, 500, 1000, 2000,
4000, 6000 and 8000 of 10,000 queries, rescaled to the budget). Examples
already misclassified are not searched further.

Only logits are used, never gradients: the attack's use in an evaluation is
to catch gradient masking, which it does not see.

Batch-coupled models (batch norm over the attacked batch): every query
evaluates one whole batch, in which each still-robust row carries its own
proposal; rows accept independently, so the loss a row keeps is the one of
the batch it was accepted in, while correctness is judged, as everywhere in
:mod:`advmaml.attacks`, only on the batches actually evaluated (the clean
batch, the start and every query). Without coupling this is the published
attack.

Deviation, for jit: the original redraws a proposal's signs until the window
changes; here 4 draws are made at once and the first that changes is taken
(with one channel a window is otherwise unchanged half the time late in the
run, when windows are single pixels).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from advmaml.attacks import AttackResult, LogitsFn, margin_loss

# Fractions of 10,000 queries after which p halves (Andriushchenko et al. 2020).
_P_STEPS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_SIGN_DRAWS = 4


@dataclasses.dataclass(frozen=True)
class SquareConfig:
  """Static description of a Square attack (hashable).

  Attributes:
    epsilon: L-inf radius.
    queries: model evaluations per restart, the start included (5000 in
      AutoAttack's standard version).
    p_init: initial fraction of the image a window covers (0.8 in AutoAttack).
    restarts: independent runs (restart r from fold_in(key, r)).
    clip_min, clip_max: valid input range.
  """

  epsilon: float = 0.1
  queries: int = 5000
  p_init: float = 0.8
  restarts: int = 1
  clip_min: float = 0.0
  clip_max: float = 1.0

  def __post_init__(self):
    if self.epsilon < 0:
      raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")
    if self.queries < 1 or self.restarts < 1:
      raise ValueError("queries and restarts must be >= 1")
    if not 0 < self.p_init <= 1:
      raise ValueError(f"p_init must be in (0, 1], got {self.p_init}")


def p_schedule(p_init: float, query, queries: int) -> jax.Array:
  """Fraction of pixels the window of query ``query`` (1-based, traced) changes."""
  it = jnp.floor(query / queries * 10000)
  halvings = sum((it > t).astype(jnp.int32) for t in _P_STEPS)
  return p_init / 2.0 ** halvings


def window_side(p, height: int, width: int) -> jax.Array:
  """Side s of the square window: round(sqrt(p * H * W)), between 1 and min(H, W) - 1
  (1 for images smaller than 2x2)."""
  s = jnp.round(jnp.sqrt(p * height * width)).astype(jnp.int32)
  return jnp.clip(s, 1, max(min(height, width) - 1, 1))


class _State(NamedTuple):
  x_best: jax.Array    # (B, H, W, C)
  margin: jax.Array    # (B,) z_y - max_{j!=y} z_j at the accepted point (> 0: correct)
  correct: jax.Array   # (B,) bool, AND over every evaluated batch


def _evaluate(logits_fn, params, xb, y):
  logits = logits_fn(params, xb)
  return -margin_loss(logits, y), jnp.argmax(logits, -1) == y


def _restart(cfg: SquareConfig, logits_fn, params, x, y, key, active, correct):
  """One run; returns (x_best, correct AND its evaluations)."""
  b, h, w, c = x.shape
  eps, lo, hi = cfg.epsilon, cfg.clip_min, cfg.clip_max
  act = active[:, None, None, None]
  stripes = eps * jax.random.rademacher(jax.random.fold_in(key, 0), (b, 1, w, c), x.dtype)
  x0 = jnp.where(act, jnp.clip(x + stripes, lo, hi), x)
  margin, ok = _evaluate(logits_fn, params, x0, y)
  rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]

  def body(i, st: _State) -> _State:
    k = jax.random.fold_in(key, i)
    k_pos, k_sign = jax.random.split(k)
    s = window_side(p_schedule(cfg.p_init, i, cfg.queries), h, w)
    corner = jax.random.randint(k_pos, (b, 2), 0, jnp.array([h, w]) - s + 1)
    window = ((rows >= corner[:, :1, None]) & (rows < corner[:, :1, None] + s)
              & (cols >= corner[:, 1:, None]) & (cols < corner[:, 1:, None] + s))  # (B, H, W)
    window = window[..., None]
    signs = jax.random.rademacher(k_sign, (_SIGN_DRAWS, b, 1, 1, c), x.dtype)
    vertex = jnp.clip(x + eps * signs, lo, hi)  # (T, B, H, W, C)
    changes = jnp.any(window & (jnp.abs(vertex - st.x_best) > 1e-7), axis=(2, 3, 4))  # (T, B)
    pick = jnp.argmax(changes, axis=0)  # first draw that changes the window, else draw 0
    vertex = jnp.take_along_axis(vertex, pick[None, :, None, None, None], axis=0)[0]
    search = active & (st.margin > 0)  # rows still correct
    x_new = jnp.where(window & search[:, None, None, None], vertex, st.x_best)
    margin, ok = _evaluate(logits_fn, params, x_new, y)
    accept = search & (margin < st.margin)
    return _State(x_best=jnp.where(accept[:, None, None, None], x_new, st.x_best),
                  margin=jnp.where(accept, margin, st.margin), correct=st.correct & ok)

  st = lax.fori_loop(1, cfg.queries, body, _State(x0, margin, correct & ok))
  return st.x_best, st.margin, st.correct


def square(cfg: SquareConfig, logits_fn: LogitsFn, params, x, y, key, *,
           mask: jax.Array | None = None) -> AttackResult:
  """Square Attack, L-inf, untargeted.

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


__all__ = ["SquareConfig", "square", "p_schedule", "window_side"]
