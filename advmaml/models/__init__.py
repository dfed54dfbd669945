"""Few-shot networks: a registry of backbones, each given a linear head here.

A backbone is a flax module that maps images (B, H, W, C) to features (B, D),
built by a function ``builder(image_shape, filters, kernels) -> module``
(ValueError for images it cannot take). ``BACKBONES`` names them:

* ``conv4``: MAML's stride-2 Omniglot Conv4 (``models/conv4.py``);
* ``conv4_maxpool``: MAML's max-pool Conv4 for Mini-ImageNet-like data;
* ``resnet12``: MetaOptNet's ResNet-12 (``models/resnet12.py``).

``make_model`` builds one and adds the linear ``head`` (D -> num_classes):
the only place a head is added, so a new backbone is one file plus one line in
``BACKBONES`` (or a ``register`` call from outside the library). The
meta-learning code only ever sees ``ModelSpec.apply(params, x) -> logits`` and
a plain ``params`` pytree: the backbone's params at the top level, beside
``head`` (so ``strided``/``maxpool`` checkpoints from before the registry load
unchanged; the names they were saved under map to ``conv4``/``conv4_maxpool``).

Batch norm (``models.layers.BatchStatNorm``) has no running averages. By
default it normalises with the statistics of the batch it is given, at train
and at test time, as MAML does (Finn et al. 2017): a task's prediction depends
on the other examples of its support or query batch (transductive).
``ModelSpec.freeze_batch_stats(params, support_x)`` returns params whose batch
norms normalise every batch with the support set's statistics instead (the
non-transductive setting of Nichol et al. 2018, ``--batch_norm=support``).

The convolution, batch norm and max-pool come from a kernel set
(``advmaml.kernels``: ``reference`` or ``cpu``), chosen when the model is built.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

from advmaml.kernels import make_kernels
from advmaml.models import conv4, resnet12
from advmaml.models.layers import STATS, BatchStatNorm, Conv

# (image_shape (H, W, C), filters, kernels) -> flax module: (B, H, W, C) -> features (B, D).
Builder = Callable[[Sequence[int], int, object], nn.Module]

BACKBONES: dict[str, Builder] = {
    "conv4": conv4.conv4,
    "conv4_maxpool": conv4.conv4_maxpool,
    "resnet12": resnet12.resnet12,
}

# Names saved in configs and checkpoints before the registry (2026-12-01).
RENAMED = {"strided": "conv4", "maxpool": "conv4_maxpool"}

HEAD = "head"


def names() -> tuple[str, ...]:
  """The registered backbone names, in registration order (what --model accepts)."""
  return tuple(BACKBONES)


def register(name: str, builder: Builder) -> None:
  """Adds a backbone under ``name`` (ValueError if the name is taken)."""
  if name in BACKBONES or name in RENAMED:
    raise ValueError(f"a backbone named {name!r} is already registered")
  BACKBONES[name] = builder


def canonical_name(name: str, *, note: bool = True) -> str:
  """The registered name for ``name``: a pre-registry name maps to its new one (logged if note)."""
  if name in RENAMED:
    if note:
      logging.warning("--model=%s is now called --model=%s; using %s", name, RENAMED[name],
                      RENAMED[name])
    return RENAMED[name]
  return name


class _Head(nn.Module):
  """The linear head as a child named ``head``: its initial values are those the
  Conv4 gave its head before the registry (flax derives each module's key from its path)."""
  num_classes: int

  @nn.compact
  def __call__(self, features):
    return nn.Dense(self.num_classes, name=HEAD)(features)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What the meta-learner needs from a network: init and a pure apply."""
  init: Callable[[jax.Array], dict]           # key -> params pytree
  apply: Callable[[dict, jax.Array], jax.Array]  # (params, x (B,H,W,C)) -> logits (B, N)
  head_names: tuple[str, ...] = (HEAD,)       # top-level param names adapted by ANIL
  # (params, x (S,H,W,C)) -> params that normalise every batch with x's statistics.
  freeze_batch_stats: Callable[[dict, jax.Array], dict] | None = None
  kernels: object = None                      # the kernel set it runs on (advmaml.kernels)
  features: Callable[[dict, jax.Array], jax.Array] | None = None  # (params, x) -> (B, D)


def _merged(params: dict, stats: dict) -> dict:
  """params with each batch norm's recorded statistics (mean, var) added beside its scale and bias."""
  out = dict(params)
  for name, value in stats.items():
    out[name] = _merged(params[name], value) if isinstance(value, dict) else value
  return out


def make_model(num_classes: int, image_shape: Sequence[int], filters: int = 64,
               model: str = "conv4", conv_impl: str = "im2col", *,
               kernels="auto", cores_per_device: int | None = None) -> ModelSpec:
  """Builds the backbone ``model`` (a name of ``names()``) with a linear head. image_shape: (H, W, C).

  filters: the backbone's width (Conv4: channels per layer; ResNet-12: the first
  block's, 64 for 64-160-320-640). kernels: "auto", "reference" or "cpu"
  (``advmaml.kernels.make_kernels``, with conv_impl and cores_per_device: each
  device's share of the cores, which sizes the CPU kernels' image chunks; None:
  all usable cores, one device), or a kernel set itself (e.g. ``CpuKernels``
  with a chosen ``ChunkBudget``).
  """
  model = canonical_name(model)
  if model not in BACKBONES:
    raise ValueError(f"unknown model {model!r}; choose one of {names()}")
  if isinstance(kernels, str):
    kernels = make_kernels(kernels, conv_impl, cores_per_device)
  backbone = BACKBONES[model](tuple(image_shape), filters, kernels)
  head = _Head(num_classes)
  dummy = jnp.zeros((2, *image_shape), jnp.float32)

  @jax.jit  # eager flax init dispatches op by op: seconds for Conv4 on a CPU
  def init(key):
    params = backbone.init(key, dummy)["params"]
    if HEAD in params:
      raise ValueError(f"backbone {model!r} has a parameter named {HEAD!r}; the head's name")
    features = backbone.apply({"params": params}, dummy)
    return {**params, **head.init(key, features)["params"]}

  def split(params):
    return {k: v for k, v in params.items() if k != HEAD}, {HEAD: params[HEAD]}

  def features(params, x):
    return backbone.apply({"params": split(params)[0]}, x)

  def apply(params, x):
    body, top = split(params)
    return head.apply({"params": top}, backbone.apply({"params": body}, x))

  def freeze_batch_stats(params, x):
    body, top = split(params)
    _, stats = backbone.apply({"params": body}, x, mutable=[STATS])
    return {**_merged(body, stats.get(STATS, {})), **top}

  return ModelSpec(init=init, apply=apply, freeze_batch_stats=freeze_batch_stats,
                   kernels=kernels, features=features)


__all__ = ["BACKBONES", "RENAMED", "BatchStatNorm", "Conv", "ModelSpec", "canonical_name",
           "make_model", "names", "register"]
