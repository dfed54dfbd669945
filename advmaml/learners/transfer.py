"""The (adversarially trained) transfer baseline of Goldblum, Fowl & Goldstein (2020), as a learner.

Its meta-training is not episodic: a classifier over all C classes of the
meta-train split is trained on the images of each meta-batch with their
split-wide labels (``objectives/transfer.py``: ``--objective=transfer``, or
``transfer_at`` for PGD adversarial training, Madry et al. 2018). At test the
classifier is dropped and a nearest-centroid head is fitted on the support
features (ProtoNet's arithmetic, ``protonet.prototypes``): negative squared
distances to the class means, which the evaluation then scores and attacks
like any learner's logits. The AQ paper's baseline fits such a head (or a
logistic regression) on an adversarially trained network's features.

meta_params = {"model": backbone params, "classifier": {"kernel": (D, C), "bias": (C,)}}.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from advmaml.learners import embedding, protonet
from advmaml.learners.base import check_phase
from advmaml.models import HEAD, ModelSpec


@dataclasses.dataclass(frozen=True)
class TransferBaseline(protonet.ProtoNet):
  """A C-way classifier in training, a nearest-centroid head on its features at test.

  At test it is a ProtoNet with scale 1 (``adapt`` and ``logits`` are ProtoNet's,
  which read only ``meta_params["model"]``). model, n_way, batch_norm:
  ``embedding.EmbeddingLearner`` (the batch-norm rule applies at test;
  ``classify`` normalises each batch with its own statistics, as ordinary
  training does). num_classes: C, the meta-train split's classes.
  """
  num_classes: int = 0

  def __post_init__(self):
    super().__post_init__()
    if self.num_classes < 2:
      raise ValueError(f"num_classes={self.num_classes}: the transfer baseline's classifier "
                       "needs the meta-train split's class count (--transfer_classes)")

  def init(self, key: jax.Array) -> dict:
    """{"model": backbone params, "classifier": {"kernel": (D, C) LeCun normal, "bias": (C,) 0}}."""
    k_model, k_head = jax.random.split(key)
    params = self.model.init(k_model)
    dim = params[HEAD]["kernel"].shape[0]          # the backbone's feature size D
    kernel = jax.nn.initializers.lecun_normal()(k_head, (dim, self.num_classes), jnp.float32)
    return {"model": {k: v for k, v in params.items() if k != HEAD},
            "classifier": {"kernel": kernel, "bias": jnp.zeros((self.num_classes,), jnp.float32)}}

  def classify(self, meta_params: dict, x: jax.Array) -> jax.Array:
    """The C-way classifier's logits. x: (B, H, W, C_in) -> (B, num_classes)."""
    head = meta_params["classifier"]
    return embedding.features(self.model, meta_params["model"], x) @ head["kernel"] + head["bias"]


def from_config(cfg, model: ModelSpec, *, phase: str = "train") -> TransferBaseline:
  """The transfer baseline of a run: cfg.n_way, cfg.batch_norm, cfg.transfer_classes."""
  check_phase(phase)
  return TransferBaseline(model, cfg.n_way, batch_norm=cfg.batch_norm,
                          num_classes=cfg.transfer_classes)
