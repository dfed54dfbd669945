"""The reference kernels: plain JAX, on which every transformation works.

``lax.conv_general_dilated``, batch norm written with jnp ops and
``lax.reduce_window`` max-pool: no custom derivative rules, so grad, grad of
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
  """2x2 max-pool, stride 2, 'VALID' (odd sizes are floored). (B, H, W, C) -> (B, H//2, W//2, C).

  ``lax.reduce_window`` with ``lax.max``, as ``flax.linen.max_pool``: its
  derivative (``select_and_gather_add``, transposed to ``select_and_scatter_add``)
  carries each window's tangent with its value through one reduction, so it
  never compares activations computed in two places. A max *reduction*
  (``reshape(...).max(axis=(2, 4))``) does: its derivative tests ``x == max(x)``,
  and XLA:CPU (jax 0.10.2) recomputes ``x`` in several fusions, rounded
  differently, so some windows matched no element and silently lost their
  gradient: O(1) errors on ResNet-12 and conv4_maxpool, in float64 as well
  (docs/speed.md, "The max-pool derivative"). A tie goes to one of the tied
  elements (the CPU kernel splits it evenly; only the routing of tied
  gradients differs, which constant image regions make exact ties).
  """
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


@dataclasses.dataclass(frozen=True)
class ReferenceKernels:
  """The plain-JAX kernel set (hashable: a flax module attribute)."""

  def conv(self, x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    return conv2d(x, kernel, stride)

  def batch_norm(self, x, scale, bias, epsilon):
    return batch_stat_norm(x, scale, bias, epsilon)

  def max_pool(self, x):
    return max_pool_2x2(x)
