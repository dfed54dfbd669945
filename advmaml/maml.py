"""Functional MAML: the inner loop, as pure functions over parameter pytrees.

``Learner`` bundles a network's ``apply`` with the inner-loop settings. Its
meta-parameters are a plain dict::

    {"model": params}                               # MAML / FOMAML / ANIL
    {"model": params, "inner_lr": per_param_lrs}    # Meta-SGD (Li et al. 2017)

``adapt`` runs ``steps`` SGD steps on the support set with ``lax.scan``. By
default ``jax.grad`` differentiates through them (second-order MAML); with
``first_order=True`` the inner gradients are held constant (FOMAML). With
``anil=True`` only the head is adapted (Raghu et al. 2020), the body is shared.
``remat=True`` wraps each inner step in ``jax.checkpoint``. With
``freeze_stats`` (``--batch_norm=support``, from ``ModelSpec.freeze_batch_stats``)
the adapted params normalise every later batch with the support set's batch-norm
statistics, so a query's logits do not depend on the other queries; the inner
loop's support loss is the same either way.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

Params = dict
ApplyFn = Callable[[Params, jax.Array], jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean softmax cross-entropy and accuracy. logits: (B, N), labels: (B,) -> two scalars."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  accuracy = (logits.argmax(-1) == labels).mean()
  return loss, accuracy


@dataclasses.dataclass(frozen=True)
class Learner:
  """A network plus MAML inner-loop settings; hashable, so it can be a static jit argument."""
  apply_fn: ApplyFn
  inner_steps: int = 1
  inner_lr: float = 0.4
  first_order: bool = False
  meta_sgd: bool = False
  anil: bool = False
  head_names: tuple[str, ...] = ("head",)
  remat: bool = False    # recompute each inner step's activations in the backward pass
  # (params, support_x) -> params normalising with support_x's statistics (None: each batch's own).
  freeze_stats: Callable[[Params, jax.Array], Params] | None = None

  # -- meta-parameters -------------------------------------------------------
  def init_meta_params(self, model_params: Params) -> dict:
    """Wraps freshly initialised network params into the meta-parameter dict."""
    meta = {"model": model_params}
    if self.meta_sgd:
      meta["inner_lr"] = jax.tree.map(
          lambda p: jnp.full_like(p, self.inner_lr), self._adapted(model_params))
    return meta

  def _adapted(self, params: Params) -> Params:
    """The part of the network the inner loop changes."""
    if not self.anil:
      return params
    missing = [n for n in self.head_names if n not in params]
    if missing:
      raise ValueError(f"ANIL: head parameters {missing} not found in {sorted(params)}")
    return {n: params[n] for n in self.head_names}

  # -- losses ----------------------------------------------------------------
  def loss(self, params: Params, x: jax.Array, y: jax.Array):
    """Cross-entropy and accuracy of network ``params`` on x: (B, H, W, C), y: (B,)."""
    return cross_entropy(self.apply_fn(params, x), y)

  # -- inner loop ------------------------------------------------------------
  def adapt(self, meta_params: dict, x: jax.Array, y: jax.Array,
            steps: int | None = None) -> Params:
    """Task-adapted network params after ``steps`` SGD steps on (x, y).

    x: (B, H, W, C) support images, y: (B,) labels. ``steps`` defaults to
    ``inner_steps`` (use more at test time). Returns a params pytree shaped
    like ``meta_params["model"]`` (with ``freeze_stats``, its batch norms also
    hold the support set's statistics).
    """
    steps = self.inner_steps if steps is None else steps
    params = meta_params["model"]
    adapted = self._adapted(params)
    frozen = {k: v for k, v in params.items() if k not in adapted}
    lrs = meta_params.get("inner_lr")

    def support_loss(fast):
      return self.loss({**frozen, **fast}, x, y)[0]

    def sgd_step(fast, _):
      grads = jax.grad(support_loss)(fast)
      if self.first_order:
        grads = lax.stop_gradient(grads)
      if lrs is None:
        fast = jax.tree.map(lambda p, g: p - self.inner_lr * g, fast, grads)
      else:
        fast = jax.tree.map(lambda p, g, lr: p - lr * g, fast, grads, lrs)
      return fast, None

    # With remat, second-order memory stays flat in the number of inner steps
    # (only each step's fast weights are kept) at the cost of a second forward.
    body = jax.checkpoint(sgd_step) if self.remat else sgd_step
    adapted, _ = lax.scan(body, adapted, None, length=steps)
    fast = {**frozen, **adapted}
    # The one place the batch-norm rule enters: every use of the adapted params
    # (query loss, attacks on the queries, evaluation) sees the support's statistics.
    return fast if self.freeze_stats is None else self.freeze_stats(fast, x)
