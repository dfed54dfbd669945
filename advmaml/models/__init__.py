"""Few-shot backbones: MAML's Conv4 (strided, for Omniglot) and its max-pool variant.

The networks are flax modules, but the meta-learning code only ever sees
``apply_fn(params, x) -> logits`` and a plain ``params`` pytree, so any flax
module (or hand-written function) can stand in for them.

Batch norm has no running averages. By default it normalises with the
statistics of the batch it is given, at train and at test time: this is what
MAML does (Finn et al. 2017), and it makes a task's prediction depend on the
other examples of that task's support or query batch (transductive batch norm).
``ModelSpec.freeze_batch_stats(params, support_x)`` returns params whose batch
norms normalise every batch with the support set's statistics instead (the
non-transductive setting of Nichol et al. 2018, ``--batch_norm=support``): a
query's prediction then depends on the support set and on that query alone.

The convolution, batch norm and max-pool come from a kernel set
(``advmaml.kernels``: ``reference`` or ``cpu``), chosen when the model is built.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from advmaml.kernels import make_kernels, reference

VARIANTS = ("strided", "maxpool")

# The flax collection a forward pass writes each batch norm's statistics into.
_STATS = "batch_stats"


class Conv(nn.Module):
  """3x3 'SAME' convolution without bias (batch norm follows and has its own)."""
  features: int
  stride: int
  kernels: object

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.glorot_uniform(),
                        (3, 3, x.shape[-1], self.features), jnp.float32)
    return self.kernels.conv(x, kernel, self.stride)


class BatchStatNorm(nn.Module):
  """Batch norm without running averages, learned scale and bias. (..., C) -> (..., C).

  Normalises with x's own statistics, or with ``mean`` and ``var`` where the
  params hold them (``freeze_batch_stats``); ``capture=True`` also records x's
  statistics in the ``batch_stats`` collection.
  """
  kernels: object
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, capture: bool = False):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
    if capture:  # plain ops: the statistics are differentiated through, to any order
      mean, var = reference.moments(x)
      self.put_variable(_STATS, "mean", mean)
      self.put_variable(_STATS, "var", var)
    elif self.has_variable("params", "mean"):
      mean, var = self.get_variable("params", "mean"), self.get_variable("params", "var")
    else:
      return self.kernels.batch_norm(x, scale, bias, self.epsilon)
    return reference.normalize(x, mean, var, scale, bias, self.epsilon)


class Conv4(nn.Module):
  """MAML's four-block ConvNet.

  ``variant="strided"``: 4 x [3x3 conv stride 2, BN, ReLU] (MAML's Omniglot net, 64 filters).
  ``variant="maxpool"``: 4 x [3x3 conv, BN, ReLU, 2x2 max-pool] (MAML's Mini-ImageNet net, 32 filters).
  Input (B, H, W, C) -> logits (B, num_classes).
  """
  num_classes: int
  filters: int
  variant: str
  kernels: object

  @nn.compact
  def __call__(self, x, capture_stats: bool = False):
    for i in range(4):
      stride = 2 if self.variant == "strided" else 1
      x = Conv(self.filters, stride, self.kernels, name=f"conv{i}")(x)
      x = BatchStatNorm(self.kernels, name=f"norm{i}")(x, capture_stats)
      x = nn.relu(x)
      if self.variant == "maxpool":
        x = self.kernels.max_pool(x)
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes, name="head")(x)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What the meta-learner needs from a network: init and a pure apply."""
  init: Callable[[jax.Array], dict]           # key -> params pytree
  apply: Callable[[dict, jax.Array], jax.Array]  # (params, x (B,H,W,C)) -> logits (B, N)
  head_names: tuple[str, ...] = ("head",)     # top-level param names adapted by ANIL
  # (params, x (S,H,W,C)) -> params that normalise every batch with x's statistics.
  freeze_batch_stats: Callable[[dict, jax.Array], dict] | None = None
  kernels: object = None                      # the kernel set it runs on (advmaml.kernels)


def make_model(num_classes: int, image_shape: Sequence[int], filters: int = 64,
               variant: str = "strided", conv_impl: str = "im2col", *,
               kernels="auto", cores_per_device: int | None = None) -> ModelSpec:
  """Builds a Conv4 ModelSpec. image_shape: (H, W, C).

  kernels: "auto", "reference" or "cpu" (``advmaml.kernels.make_kernels``, with
  conv_impl and cores_per_device: each device's share of the cores, which sizes
  the CPU kernels' image chunks; None: all usable cores, one device), or a
  kernel set itself (e.g. ``CpuKernels`` with a chosen ``ChunkBudget``).
  """
  if variant not in VARIANTS:
    raise ValueError(f"unknown model variant {variant!r}; choose one of {VARIANTS}")
  side = min(image_shape[:2])
  for _ in range(4):
    side = -(-side // 2) if variant == "strided" else side // 2
  if side < 1:
    raise ValueError(f"images of {tuple(image_shape[:2])} pixels are too small for four "
                     f"{variant} blocks; use at least 16x16 with max-pooling")
  if isinstance(kernels, str):
    kernels = make_kernels(kernels, conv_impl, cores_per_device)
  module = Conv4(num_classes, filters, variant, kernels)
  dummy = jnp.zeros((2, *image_shape), jnp.float32)

  @jax.jit  # eager flax init dispatches op by op: seconds for Conv4 on a CPU
  def init(key):
    return module.init(key, dummy)["params"]

  def apply(params, x):
    return module.apply({"params": params}, x)

  def freeze_batch_stats(params, x):
    _, stats = module.apply({"params": params}, x, capture_stats=True, mutable=[_STATS])
    return {**params, **{name: {**params[name], **s} for name, s in stats[_STATS].items()}}

  return ModelSpec(init=init, apply=apply, freeze_batch_stats=freeze_batch_stats, kernels=kernels)
