"""The layers backbones are built from: a bias-free convolution and batch norm without running averages.

Both run on a kernel set (``advmaml.kernels``) fixed when the model is built,
so a backbone written with them works on the ``reference`` and the ``cpu``
kernels and under both batch-norm rules (``--batch_norm=batch|support``).

Batch norm normalises with the statistics of the batch it is given (MAML's
rule, transductive), or, where the params hold ``mean`` and ``var`` (written
by ``ModelSpec.freeze_batch_stats``), with those. A forward pass applied with
the ``batch_stats`` collection mutable records each norm's batch statistics
there: that is how ``freeze_batch_stats`` reads the support set's.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from advmaml.kernels import reference

# The flax collection a forward pass writes each batch norm's statistics into.
STATS = "batch_stats"


class Conv(nn.Module):
  """'SAME' size x size convolution without bias (batch norm follows and has its own).

  (B, H, W, C) -> (B, ceil(H / stride), ceil(W / stride), features).
  """
  features: int
  stride: int
  kernels: object
  size: int = 3

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.glorot_uniform(),
                        (self.size, self.size, x.shape[-1], self.features), jnp.float32)
    return self.kernels.conv(x, kernel, self.stride)


class BatchStatNorm(nn.Module):
  """Batch norm without running averages, learned scale and bias. (..., C) -> (..., C).

  Normalises with x's own statistics, or with ``mean`` and ``var`` where the
  params hold them (``freeze_batch_stats``). Applied with the ``batch_stats``
  collection mutable, it also records x's statistics there.
  """
  kernels: object
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
    if self.is_mutable_collection(STATS) and not self.is_initializing():
      # Plain ops: the statistics are differentiated through, to any order.
      mean, var = reference.moments(x)
      self.put_variable(STATS, "mean", mean)
      self.put_variable(STATS, "var", var)
    elif self.has_variable("params", "mean"):
      mean, var = self.get_variable("params", "mean"), self.get_variable("params", "var")
    else:
      return self.kernels.batch_norm(x, scale, bias, self.epsilon)
    return reference.normalize(x, mean, var, scale, bias, self.epsilon)


def check_min_side(image_shape: Sequence[int], min_side: int, what: str) -> None:
  """ValueError unless both sides of image_shape (H, W, ...) are at least ``min_side`` pixels."""
  if min(image_shape[:2]) < min_side:
    raise ValueError(f"images of {tuple(image_shape[:2])} pixels are too small for {what}; "
                     f"use at least {min_side}x{min_side}")
