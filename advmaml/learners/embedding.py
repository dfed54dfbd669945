"""What the metric and closed-form learners share: a backbone without its head, the batch-norm rule.

ProtoNet, R2-D2 and MetaOptNet-SVM (``learners/protonet.py``, ``r2d2.py``,
``metaoptnet.py``) embed the support set with the backbone, fit a classifier on
the embeddings in closed form (or by a convex solve), and score queries with it.
They meta-learn the backbone only: ``make_model``'s linear ``head`` is dropped
from their meta-parameters (``backbone_params``), so it neither takes optimiser
memory nor appears in their checkpoints.

The batch-norm rule (``--batch_norm``) is applied here, the one place for all
three: with ``"batch"`` every batch (support, then queries) is normalised with
its own statistics, as MAML does (transductive); with ``"support"`` the support
set's statistics are frozen into the params first (``ModelSpec.freeze_batch_stats``)
and the queries are embedded with those params, so a query's logits do not depend
on the other queries. The task state carries the params the queries use.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from advmaml.models import HEAD, ModelSpec

BATCH_NORMS = ("batch", "support")


def check_settings(model: ModelSpec, n_way: int, batch_norm: str) -> None:
  """ValueError for settings no metric learner can run with."""
  if model.features is None:
    raise ValueError("the model has no features function (ModelSpec.features); "
                     "build it with advmaml.models.make_model")
  if n_way < 2:
    raise ValueError(f"n_way={n_way}: a few-shot task needs at least 2 classes")
  if batch_norm not in BATCH_NORMS:
    raise ValueError(f"batch_norm={batch_norm!r}; choose one of {BATCH_NORMS}")
  if batch_norm == "support" and model.freeze_batch_stats is None:
    raise ValueError("batch_norm='support' needs ModelSpec.freeze_batch_stats")


@dataclasses.dataclass(frozen=True)
class EmbeddingLearner:
  """The fields and checks ProtoNet, R2-D2 and MetaOptNet-SVM share (each adds its head's).

  model: from ``advmaml.models.make_model`` (its head is not used). n_way: classes
  per task. batch_norm: "batch" or "support" (see the module docstring).
  Hashable (frozen), so a learner can be a static jit argument.
  """
  model: ModelSpec
  n_way: int
  batch_norm: str = "batch"

  def __post_init__(self):
    check_settings(self.model, self.n_way, self.batch_norm)


def backbone_params(model: ModelSpec, key: jax.Array) -> dict:
  """Freshly initialised network params without the linear head (metric learners have none)."""
  return {k: v for k, v in model.init(key).items() if k != HEAD}


def features(model: ModelSpec, params: dict, x: jax.Array) -> jax.Array:
  """Backbone features (B, D) of x (B, H, W, C) from head-less params."""
  # ModelSpec's functions split the head off by name: an empty one stands in for it.
  return model.features({**params, HEAD: {}}, x)


def embed_support(model: ModelSpec, batch_norm: str, params: dict,
                  support_x: jax.Array) -> tuple[dict, jax.Array]:
  """(params to embed the queries with, support features (S, D)). support_x: (S, H, W, C)."""
  if batch_norm == "support":
    frozen = model.freeze_batch_stats({**params, HEAD: {}}, support_x)
    params = {k: v for k, v in frozen.items() if k != HEAD}
  return params, features(model, params, support_x)


def one_hot(labels: jax.Array, n_way: int, dtype) -> jax.Array:
  """(S,) int labels in [0, n_way) -> (S, n_way) one-hot of dtype."""
  return jax.nn.one_hot(labels, n_way, dtype=dtype)


def positive(log_value: jax.Array) -> jax.Array:
  """A learned positive scalar from its log (scales and regularisers are log-parameterised:
  they stay positive, and Adam's step moves them by a relative amount whatever their size)."""
  return jnp.exp(log_value)


def log_init(value: float) -> jax.Array:
  """The float32 log of a positive initial value (ValueError otherwise)."""
  if not value > 0:
    raise ValueError(f"initial value {value} must be positive (it is learned as its log)")
  return jnp.log(jnp.asarray(value, jnp.float32))
