"""MetaOptNet-SVM (Lee et al. 2019): a Crammer-Singer linear SVM on the support embeddings.

Each task fits a multi-class SVM (``learners/qp.py``: its dual, solved on the
device by a fixed number of ADMM iterations, differentiated implicitly) to the
support embeddings X (S, D); a query's logits are

    logits(x) = s * f(x)^T W,        W = X^T alpha  (D, N),

with s a meta-learned scale (MetaOptNet's ``ClassificationHead`` learns it,
initialised at 1; here as log s). Defaults follow MetaOptNet's code: C = 0.1,
dual ridge 1.0 (the identity it adds to the QP matrix). MetaOptNet runs its
interior-point QP solver for only 3 iterations in meta-training; ADMM's
iterations are far cheaper, and ``iterations``/``eval_iterations`` choose them
for the two phases (``from_config``).

meta_params = {"model": backbone params, "log_scale": ()}.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from advmaml.learners import embedding, qp
from advmaml.learners.base import check_phase
from advmaml.models import ModelSpec


def svm_weights(features: jax.Array, labels: jax.Array, n_way: int, *, C: float,
                ridge: float, iterations: int, implicit: bool = True) -> jax.Array:
  """The Crammer-Singer SVM's class weights W (D, N). features: (S, D), labels: (S,)."""
  targets = embedding.one_hot(labels, n_way, features.dtype)
  alpha = qp.crammer_singer(features @ features.T, targets, C=C, ridge=ridge,
                            iterations=iterations, implicit=implicit)
  return features.T @ alpha


@dataclasses.dataclass(frozen=True)
class MetaOptNetSVM(embedding.EmbeddingLearner):
  """MetaOptNet-SVM on a backbone (model, n_way, batch_norm: ``embedding.EmbeddingLearner``)."""
  C: float = 0.1                 # the SVM's cost (MetaOptNet's C_reg)
  dual_ridge: float = 1.0        # r in K + r I (MetaOptNet's added identity)
  iterations: int = 50           # ADMM iterations, forward and implicit backward
  implicit: bool = True          # implicit differentiation, else through the iterations
  init_scale: float = 1.0        # s at initialisation
  learn_scale: bool = True

  def __post_init__(self):
    super().__post_init__()
    embedding.log_init(self.init_scale)
    if not (self.C > 0 and self.dual_ridge > 0):
      raise ValueError(f"C={self.C} and dual_ridge={self.dual_ridge} must be positive")
    if self.iterations < 1:
      raise ValueError(f"iterations={self.iterations} must be >= 1")

  def init(self, key: jax.Array) -> dict:
    """Meta-parameters: {"model": backbone params[, "log_scale": () float32]}."""
    meta = {"model": embedding.backbone_params(self.model, key)}
    if self.learn_scale:
      meta["log_scale"] = embedding.log_init(self.init_scale)
    return meta

  def adapt(self, meta_params: dict, support_x: jax.Array, support_y: jax.Array,
            key: jax.Array | None = None) -> dict:
    """The task state: {"params", "weights": (D, N), "scale": ()}.

    support_x: (S, H, W, C) in [0, 1]; support_y: (S,) int in [0, n_way). key is unused.
    """
    del key
    params, features = embedding.embed_support(self.model, self.batch_norm,
                                               meta_params["model"], support_x)
    weights = svm_weights(features, support_y, self.n_way, C=self.C, ridge=self.dual_ridge,
                          iterations=self.iterations, implicit=self.implicit)
    scale = (embedding.positive(meta_params["log_scale"]) if self.learn_scale
             else self.init_scale)
    return {"params": params, "weights": weights,
            "scale": jnp.asarray(scale, features.dtype)}

  def logits(self, task_state: dict, x: jax.Array) -> jax.Array:
    """x: (B, H, W, C) -> (B, n_way)."""
    return task_state["scale"] * (embedding.features(self.model, task_state["params"], x)
                                  @ task_state["weights"])


def from_config(cfg, model: ModelSpec, *, phase: str = "train") -> MetaOptNetSVM:
  """The MetaOptNet-SVM of a run: cfg.n_way, cfg.batch_norm, cfg.svm_c, cfg.head_scale
  (0: 1), and cfg.svm_iterations ADMM iterations in "train", cfg.svm_eval_iterations in
  "test" (defaults 50 and 100: evaluation runs once per episode and is what is reported)."""
  check_phase(phase)
  iterations = cfg.svm_iterations if phase == "train" else cfg.svm_eval_iterations
  return MetaOptNetSVM(model, cfg.n_way, batch_norm=cfg.batch_norm, C=cfg.svm_c,
                       init_scale=cfg.head_scale or 1.0, iterations=iterations)
