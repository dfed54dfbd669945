"""MAML and its variants as one learner: second order, FOMAML, ANIL, Meta-SGD.

Meta-parameters are a plain dict::

    {"model": params}                               # MAML / FOMAML / ANIL
    {"model": params, "inner_lr": per_param_lrs}    # Meta-SGD (Li et al. 2017)

``adapt`` runs ``inner_steps`` steps of an optax transform on the support loss
with ``lax.scan`` (plain SGD at ``inner_lr`` by default, Finn et al. 2017; any
name of ``advmaml.optimizers.INNER_OPTIMIZERS`` or any
``optax.GradientTransformation``; Meta-SGD's learned per-parameter rates are
one more transform, built from the meta-parameters). By default ``jax.grad``
differentiates through the steps (second-order MAML); ``first_order=True``
holds the inner gradients constant (FOMAML); ``anil=True`` adapts only the
head (Raghu et al. 2020). ``remat=True`` wraps each inner step in
``jax.checkpoint``. With ``freeze_stats`` (``--batch_norm=support``) the
adapted params normalise every later batch with the support set's batch-norm
statistics, so a query's logits do not depend on the other queries.

The task state is the adapted network's params; ``logits`` applies the network.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from advmaml import optimizers
from advmaml.learners.base import cross_entropy

Params = dict
ApplyFn = Callable[[Params, jax.Array], jax.Array]


def learned_rates(rates: Params) -> optax.GradientTransformation:
  """Meta-SGD's update ``-rates * g`` as an optax transform (rates: a pytree like the grads)."""
  def update(grads, state, params=None):
    del params
    return jax.tree.map(lambda g, lr: -lr * g, grads, rates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


@dataclasses.dataclass(frozen=True)
class MAML:
  """A network plus MAML inner-loop settings; hashable, so it can be a static jit argument."""
  apply_fn: ApplyFn                 # (params, x (B, H, W, C)) -> logits (B, N)
  inner_steps: int = 1
  inner_lr: float = 0.4
  first_order: bool = False
  meta_sgd: bool = False
  anil: bool = False
  head_names: tuple[str, ...] = ("head",)
  remat: bool = False    # recompute each inner step's activations in the backward pass
  # (params, support_x) -> params normalising with support_x's statistics (None: each batch's own).
  freeze_stats: Callable[[Params, jax.Array], Params] | None = None
  init_fn: Callable[[jax.Array], Params] | None = None   # key -> network params
  # A name of optimizers.INNER_OPTIMIZERS (at inner_lr) or an optax transform.
  inner_optimizer: Any = "sgd"

  # -- the protocol ----------------------------------------------------------
  def init(self, key: jax.Array) -> dict:
    if self.init_fn is None:
      raise ValueError("this MAML learner was built without init_fn; pass the model's init")
    return self.init_meta_params(self.init_fn(key))

  def adapt(self, meta_params: dict, support_x: jax.Array, support_y: jax.Array,
            key: jax.Array | None = None) -> Params:
    """Task-adapted network params after ``inner_steps`` steps on (support_x, support_y).

    support_x: (S, H, W, C), support_y: (S,). Returns a params pytree shaped
    like ``meta_params["model"]`` (with ``freeze_stats``, its batch norms also
    hold the support set's statistics). key: unused (the inner loop is deterministic).
    """
    del key
    params = meta_params["model"]
    adapted = self._adapted(params)
    frozen = {k: v for k, v in params.items() if k not in adapted}
    tx, rates = self._inner_update(meta_params, adapted)

    def support_loss(fast):
      return cross_entropy(self.apply_fn({**frozen, **fast}, support_x), support_y)[0]

    def inner_step(carry, _):
      fast, opt_state = carry
      grads = jax.grad(support_loss)(fast)
      if self.first_order:
        grads = lax.stop_gradient(grads)
      if tx is None:   # plain SGD or Meta-SGD, in closed form (see _inner_update)
        return (jax.tree.map(lambda p, g, lr: p - lr * g, fast, grads, rates), opt_state), None
      updates, opt_state = tx.update(grads, opt_state, fast)
      return (optax.apply_updates(fast, updates), opt_state), None

    # With remat, second-order memory stays flat in the number of inner steps
    # (only each step's fast weights are kept) at the cost of a second forward.
    body = jax.checkpoint(inner_step) if self.remat else inner_step
    opt_state = optax.EmptyState() if tx is None else tx.init(adapted)
    (adapted, _), _ = lax.scan(body, (adapted, opt_state), None, length=self.inner_steps)
    fast = {**frozen, **adapted}
    # The one place the batch-norm rule enters: every use of the adapted params
    # (query loss, attacks on the queries, evaluation) sees the support's statistics.
    return fast if self.freeze_stats is None else self.freeze_stats(fast, support_x)

  def logits(self, task_state: Params, x: jax.Array) -> jax.Array:
    return self.apply_fn(task_state, x)

  def initial_state(self, meta_params: dict) -> Params:
    """The network at its meta-parameters, before adaptation (what ADML attacks)."""
    return meta_params["model"]

  # -- helpers ---------------------------------------------------------------
  def init_meta_params(self, model_params: Params) -> dict:
    """Wraps freshly initialised network params into the meta-parameter dict."""
    meta = {"model": model_params}
    if self.meta_sgd:
      meta["inner_lr"] = jax.tree.map(
          lambda p: jnp.full_like(p, self.inner_lr), self._adapted(model_params))
    return meta

  def _inner_update(self, meta_params: dict, adapted: Params):
    """(transform, None) for an optax inner optimizer, or (None, rates) for plain SGD
    (rates: inner_lr per leaf) and Meta-SGD (rates: the learned ones).

    Those two are the transforms ``optax.sgd(inner_lr)`` and ``learned_rates(rates)``
    (the same numbers, tests/test_learner_protocol.py) applied in closed form as
    p - lr * g: optax's p + (-lr * g) compiles to another program that ran 3-5%
    slower on the B1/B3-strided benchmarks (results/benchmarks/before-after-epyc.json).
    """
    if "inner_lr" in meta_params:   # Meta-SGD: the rates are meta-parameters
      return None, meta_params["inner_lr"]
    if self.inner_optimizer == "sgd":
      return None, jax.tree.map(lambda p: self.inner_lr, adapted)
    if isinstance(self.inner_optimizer, str):
      return optimizers.inner_optimizer(self.inner_optimizer, self.inner_lr), None
    return self.inner_optimizer, None

  def _adapted(self, params: Params) -> Params:
    """The part of the network the inner loop changes."""
    if not self.anil:
      return params
    missing = [n for n in self.head_names if n not in params]
    if missing:
      raise ValueError(f"ANIL: head parameters {missing} not found in {sorted(params)}")
    return {n: params[n] for n in self.head_names}


def from_config(cfg, model, *, phase: str = "train") -> MAML:
  """The MAML learner of ``cfg`` on ``model`` (a ``models.ModelSpec``).

  phase "test" takes ``cfg.eval_inner_steps`` inner steps and differentiates
  them fully (attacks on the support set go through the adaptation).
  """
  test = phase == "test"
  freeze = model.freeze_batch_stats if cfg.batch_norm == "support" else None
  return MAML(model.apply, cfg.eval_inner_steps if test else cfg.inner_steps, cfg.inner_lr,
              first_order=cfg.first_order and not test, meta_sgd=cfg.meta_sgd, anil=cfg.anil,
              head_names=model.head_names, remat=cfg.remat and not test, freeze_stats=freeze,
              init_fn=model.init, inner_optimizer=cfg.inner_optimizer)
