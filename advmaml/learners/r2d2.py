"""R2-D2 (Bertinetto et al. 2019): ridge regression on the support embeddings, in closed form.

With the support embeddings X (S, D) (a column of ones appended when
``ridge_bias``, as in Bertinetto et al.'s code, giving each class an intercept)
and the one-hot labels Y (S, N), the ridge weights

    W = argmin_W ||X W - Y||^2 + lambda ||W||^2 = (X^T X + lambda I_D)^{-1} X^T Y
      = X^T (X X^T + lambda I_S)^{-1} Y                     (Woodbury)

are computed by the second form: an S x S solve (S = N*K, 5 to 100 in few-shot
tasks) instead of a D x D one (D = 256 for Omniglot's Conv4, 16000 for
ResNet-12). ``jax.grad`` differentiates through the Cholesky solve, so the
backbone is meta-learned through the ridge solution. A query's logits are

    logits(x) = alpha * [f(x), 1] W + beta,

with the regulariser lambda, the scale alpha and the offset beta meta-learned
(lambda and alpha as logs, so they stay positive). The offset is the paper's
beta, kept for fidelity: it adds the same number to every class's logit, which
softmax (and a margin loss) ignores, so its gradient is zero.

Bertinetto et al. divide X and Y by sqrt(S) before the solve; that is the same
ridge problem with lambda multiplied by S, so here lambda is the plain
regulariser of the objective above.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import jax.scipy.linalg

from advmaml.learners import embedding
from advmaml.learners.base import check_phase
from advmaml.models import ModelSpec


def with_ones(features: jax.Array) -> jax.Array:
  """(B, D) -> (B, D + 1): the constant feature that carries the intercept."""
  return jnp.concatenate([features, jnp.ones_like(features[:, :1])], axis=1)


def ridge_weights(features: jax.Array, targets: jax.Array, lam: jax.Array) -> jax.Array:
  """X^T (X X^T + lam I)^{-1} Y. features X: (S, D), targets Y: (S, N), lam > 0 -> (D, N).

  A Cholesky solve: X X^T + lam I is symmetric positive definite for lam > 0.
  """
  gram = features @ features.T
  eye = jnp.eye(gram.shape[0], dtype=gram.dtype)
  dual = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(gram + lam * eye), targets)
  return features.T @ dual


def ridge_weights_primal(features: jax.Array, targets: jax.Array, lam: jax.Array) -> jax.Array:
  """(X^T X + lam I_D)^{-1} X^T Y, the D x D form (for tests: same result, D^3 cost)."""
  eye = jnp.eye(features.shape[1], dtype=features.dtype)
  return jnp.linalg.solve(features.T @ features + lam * eye, features.T @ targets)


@dataclasses.dataclass(frozen=True)
class R2D2(embedding.EmbeddingLearner):
  """R2-D2 on a backbone (model, n_way, batch_norm: ``embedding.EmbeddingLearner``)."""
  init_lambda: float = 1.0       # Bertinetto et al.'s initial regulariser
  learn_lambda: bool = True
  init_scale: float = 10.0       # alpha: one-hot regression outputs are O(1), softmax wants O(10)
  ridge_bias: bool = True        # append a constant feature (a per-class intercept)

  def __post_init__(self):
    super().__post_init__()
    embedding.log_init(self.init_lambda)
    embedding.log_init(self.init_scale)

  def init(self, key: jax.Array) -> dict:
    """Meta-parameters: {"model", "log_scale": (), "offset": ()[, "log_lambda": ()]}."""
    meta = {"model": embedding.backbone_params(self.model, key),
            "log_scale": embedding.log_init(self.init_scale),
            "offset": jnp.zeros((), jnp.float32)}
    if self.learn_lambda:
      meta["log_lambda"] = embedding.log_init(self.init_lambda)
    return meta

  def _embed(self, features: jax.Array) -> jax.Array:
    return with_ones(features) if self.ridge_bias else features

  def adapt(self, meta_params: dict, support_x: jax.Array, support_y: jax.Array,
            key: jax.Array | None = None) -> dict:
    """The task state: {"params", "weights": (D[+1], N), "scale": (), "offset": ()}.

    support_x: (S, H, W, C) in [0, 1]; support_y: (S,) int in [0, n_way). key is unused.
    """
    del key
    params, features = embedding.embed_support(self.model, self.batch_norm,
                                               meta_params["model"], support_x)
    dtype = features.dtype
    lam = (embedding.positive(meta_params["log_lambda"]) if self.learn_lambda
           else self.init_lambda)
    targets = embedding.one_hot(support_y, self.n_way, dtype)
    weights = ridge_weights(self._embed(features), targets, jnp.asarray(lam, dtype))
    return {"params": params, "weights": weights,
            "scale": embedding.positive(meta_params["log_scale"]).astype(dtype),
            "offset": meta_params["offset"].astype(dtype)}

  def logits(self, task_state: dict, x: jax.Array) -> jax.Array:
    """x: (B, H, W, C) -> (B, n_way)."""
    queries = self._embed(embedding.features(self.model, task_state["params"], x))
    return task_state["scale"] * (queries @ task_state["weights"]) + task_state["offset"]


def from_config(cfg, model: ModelSpec, *, phase: str = "train") -> R2D2:
  """The R2-D2 of a run, the same in both phases: cfg.n_way, cfg.batch_norm, the
  initial regulariser cfg.r2d2_lambda and scale cfg.head_scale (0: 10)."""
  check_phase(phase)
  return R2D2(model, cfg.n_way, batch_norm=cfg.batch_norm, init_lambda=cfg.r2d2_lambda,
              init_scale=cfg.head_scale or R2D2.init_scale)
