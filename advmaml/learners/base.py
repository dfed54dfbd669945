"""The few-shot learner protocol, and the losses every objective and evaluator share.

A learner turns a support set into a classifier. Training, the objectives,
evaluation, robust evaluation, the masking checks, certification and Lake's
runs use nothing of a learner but these three pure functions (so a new
learner runs through all of them unchanged)::

    meta_params = learner.init(key)
    task_state = learner.adapt(meta_params, support_x, support_y, key)
    logits = learner.logits(task_state, x)

Attacks take ``learner.logits`` as their ``logits_fn(task_state, x)``, so
they attack any learner. A learner is a frozen (hashable) dataclass: it is a
static argument of the jitted steps, and everything it holds is fixed when it
is built (network, kernels, inner-loop settings).

One optional method: ``initial_state(meta_params) -> task_state``, the
classifier before any adaptation (MAML's network at its meta-parameters). The
objectives that attack the support set against the unadapted model (ADML,
adversarial support) need it and say so when a learner lacks it.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import optax

PHASES = ("train", "test")   # what a learner factory builds: the meta-train step's, or evaluation's


def check_phase(phase: str) -> None:
  """ValueError unless ``phase`` is one of PHASES."""
  if phase not in PHASES:
    raise ValueError(f"phase={phase!r}; choose one of {PHASES}")


MetaParams = Any   # a pytree
TaskState = Any    # a pytree


@runtime_checkable
class FewShotLearner(Protocol):
  """What every part of advmaml needs from a few-shot learner."""

  def init(self, key: jax.Array) -> MetaParams:
    """Fresh meta-parameters (the pytree the outer optimizer updates)."""

  def adapt(self, meta_params: MetaParams, support_x: jax.Array, support_y: jax.Array,
            key: jax.Array) -> TaskState:
    """The task's classifier from its support set.

    support_x: (S, H, W, C) float32 in [0, 1]; support_y: (S,) int32 in [0, N).
    Differentiable in meta_params (the meta-gradient) and in support_x (attacks
    on the support set).
    """

  def logits(self, task_state: TaskState, x: jax.Array) -> jax.Array:
    """x: (B, H, W, C) -> (B, N) class scores of the adapted classifier."""


def cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean softmax cross-entropy and accuracy. logits: (B, N), labels: (B,) -> two scalars."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  accuracy = (logits.argmax(-1) == labels).mean()
  return loss, accuracy


def query_loss(learner: FewShotLearner, task_state: TaskState, x: jax.Array,
               y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy and accuracy of the adapted classifier on x: (B, H, W, C), y: (B,)."""
  return cross_entropy(learner.logits(task_state, x), y)


def adapt_key(key: jax.Array) -> jax.Array:
  """The key an objective or evaluator hands to ``adapt``, derived from a task's key.

  A fold-in, so the splits of ``key`` that attacks use stay what they were
  before learners took a key (same attacks, same numbers). None stays None
  (for deterministic learners called without a key, e.g. in a notebook).
  """
  return None if key is None else jax.random.fold_in(key, 0x5EED)


def initial_state(learner: FewShotLearner, meta_params: MetaParams, needed_by: str) -> TaskState:
  """``learner.initial_state(meta_params)``, or a ValueError naming who needs it."""
  fn = getattr(learner, "initial_state", None)
  if fn is None:
    raise ValueError(f"{needed_by} attacks the unadapted model, which the learner "
                     f"{type(learner).__name__} does not have (no initial_state method); "
                     "use --objective=aq or rmaml with it")
  return fn(meta_params)
