"""Prototypical networks (Snell et al. 2017) as a learner of the protocol.

Each class's prototype is the mean of its support embeddings; a query's logit
for class n is minus its squared Euclidean distance to prototype n::

    c_n = mean_{i: y_i = n} f(x_i),     logits_n(x) = -s * ||f(x) - c_n||^2 [/ D]

Snell et al. use s = 1 and no division. MetaOptNet's ProtoNet head (Lee et al.
2019, whose code the adversarial-querying paper of Goldblum et al. 2020 builds
on) divides by the embedding size D and learns s (initialised at 1); here both
are options (``normalize``, ``learn_scale``). A learned s is meta-learned as
log s, beside the backbone: ``meta_params = {"model": params[, "log_scale": ()]}``.

``prototypes`` and ``distance_logits`` are plain functions so that other heads
(the adversarially trained transfer baseline's nearest-centroid test head) use
the same arithmetic.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from advmaml.learners import embedding
from advmaml.learners.base import check_phase
from advmaml.models import ModelSpec


def prototypes(features: jax.Array, labels: jax.Array, n_way: int) -> jax.Array:
  """Class means. features: (S, D), labels: (S,) in [0, n_way) -> (n_way, D).

  A class without support examples (never the case in an N-way K-shot episode)
  gets the zero vector rather than a division by zero.
  """
  onehot = embedding.one_hot(labels, n_way, features.dtype)        # (S, N)
  counts = onehot.sum(0)[:, None]                                   # (N, 1)
  return (onehot.T @ features) / jnp.maximum(counts, 1)


def squared_distances(queries: jax.Array, centres: jax.Array) -> jax.Array:
  """||q_b - c_n||^2. queries: (B, D), centres: (N, D) -> (B, N).

  Expanded as |q|^2 - 2 q.c + |c|^2: one matmul instead of a (B, N, D) tensor
  (ResNet-12's D is 16000). Rounding may leave a tiny negative value where a
  query sits on a centre; it is not clipped, which would zero its gradient.
  """
  return ((queries * queries).sum(-1, keepdims=True) - 2 * queries @ centres.T
          + (centres * centres).sum(-1)[None, :])


def distance_logits(queries: jax.Array, centres: jax.Array, scale: jax.Array | float = 1.0,
                    normalize: bool = False) -> jax.Array:
  """-scale * squared distance [/ D]. queries: (B, D), centres: (N, D) -> (B, N)."""
  d2 = squared_distances(queries, centres)
  if normalize:
    d2 = d2 / queries.shape[-1]
  return -scale * d2


@dataclasses.dataclass(frozen=True)
class ProtoNet(embedding.EmbeddingLearner):
  """ProtoNet on a backbone (model, n_way, batch_norm: ``embedding.EmbeddingLearner``)."""
  learn_scale: bool = False      # meta-learn the logit scale s (MetaOptNet: yes; Snell et al.: no)
  init_scale: float = 1.0        # s, or its initial value when learned
  normalize: bool = False        # divide distances by D (MetaOptNet's ProtoNet head)

  def __post_init__(self):
    super().__post_init__()
    embedding.log_init(self.init_scale)   # refuses a non-positive scale

  def init(self, key: jax.Array) -> dict:
    """Meta-parameters: {"model": backbone params[, "log_scale": () float32]}."""
    meta = {"model": embedding.backbone_params(self.model, key)}
    if self.learn_scale:
      meta["log_scale"] = embedding.log_init(self.init_scale)
    return meta

  def _scale(self, meta_params: dict):
    return embedding.positive(meta_params["log_scale"]) if self.learn_scale else self.init_scale

  def adapt(self, meta_params: dict, support_x: jax.Array, support_y: jax.Array,
            key: jax.Array | None = None) -> dict:
    """The task state: {"params", "prototypes": (N, D), "scale": ()}.

    support_x: (S, H, W, C) in [0, 1]; support_y: (S,) int in [0, n_way). key is unused.
    """
    del key
    params, features = embedding.embed_support(self.model, self.batch_norm,
                                               meta_params["model"], support_x)
    return {"params": params, "prototypes": prototypes(features, support_y, self.n_way),
            "scale": jnp.asarray(self._scale(meta_params), features.dtype)}

  def logits(self, task_state: dict, x: jax.Array) -> jax.Array:
    """x: (B, H, W, C) -> (B, n_way)."""
    queries = embedding.features(self.model, task_state["params"], x)
    return distance_logits(queries, task_state["prototypes"], task_state["scale"],
                           self.normalize)


def from_config(cfg, model: ModelSpec, *, phase: str = "train") -> ProtoNet:
  """The ProtoNet of a run, the same in both phases: cfg.n_way, cfg.batch_norm,
  cfg.head_scale (0: 1), cfg.protonet_learn_scale and cfg.protonet_normalize."""
  check_phase(phase)
  return ProtoNet(model, cfg.n_way, batch_norm=cfg.batch_norm,
                  learn_scale=cfg.protonet_learn_scale, init_scale=cfg.head_scale or 1.0,
                  normalize=cfg.protonet_normalize)
