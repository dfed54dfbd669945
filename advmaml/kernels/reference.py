"""The reference kernels: plain JAX, on which every transformation works.

``lax.conv_general_dilated``, batch norm written with jnp ops and a max-pool as
a max reduction over 2x2 windows: no custom derivative rules, so grad, grad of
grad, jvp, jacfwd, jax.hessian, jax.linearize, forward-over-reverse
Hessian-vector products and vmap of each all apply. XLA's own kernels run them,
which is what a GPU or TPU wants (``kernels="auto"`` picks these there).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax


def conv2d(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """'SAME' 2-D convolution. x: (B, H, W, C), kernel: (kh, kw, C, O) -> (B, H', W', O)."""
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding="SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean and (biased) variance over all axes but the last. x: (..., C) -> two (C,)."""
  axes = tuple(range(x.ndim - 1))
  mean = x.mean(axes)
  return mean, jnp.square(x - mean).mean(axes)


def normalize(x: jax.Array, mean: jax.Array, var: jax.Array, scale: jax.Array,
              bias: jax.Array, epsilon: float) -> jax.Array:
  """(x - mean) / sqrt(var + epsilon) * scale + bias. x: (..., C), the rest (C,)."""
  return (x - mean) * lax.rsqrt(var + epsilon) * scale + bias


def batch_stat_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
  """Batch norm with x's own statistics over all axes but the last. x: (..., C) -> (..., C)."""
  return normalize(x, *moments(x), scale, bias, epsilon)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool, stride 2, 'VALID'. (B, H, W, C) -> (B, H//2, W//2, C).

  A max reduction over each window, not ``lax.reduce_window``: tied maxima
  share the gradient evenly, as in the CPU kernel, where reduce_window's
  derivative gives it all to one of them (constant image regions tie exactly).
  """
  b, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2, :]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


@dataclasses.dataclass(frozen=True)
class ReferenceKernels:
  """The plain-JAX kernel set (hashable: a flax module attribute)."""

  def conv(self, x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    return conv2d(x, kernel, stride)

  def batch_norm(self, x, scale, bias, epsilon):
    return batch_stat_norm(x, scale, bias, epsilon)

  def max_pool(self, x):
    return max_pool_2x2(x)
