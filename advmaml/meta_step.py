"""The meta-train step: sample tasks, adapt, differentiate the outer loss, update.

Everything in one jitted function ``train_step(state, pool, key) -> (state, metrics)``:
episodes are sampled on the device from the class pool, tasks are vmapped,
and the state buffers are donated so parameters are updated in place.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from advmaml.data.episodes import sample_episodes
from advmaml.maml import Learner
from advmaml.objectives import Objective
from advmaml.sharding import shard_tasks


class TrainState(NamedTuple):
  step: jax.Array        # () int32, number of outer updates done
  meta_params: dict      # {"model": ..., ["inner_lr": ...]}
  opt_state: Any         # optax state for meta_params


def init_train_state(meta_params: dict, optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(jnp.zeros((), jnp.int32), meta_params, optimizer.init(meta_params))


def meta_loss(learner: Learner, objective: Objective, meta_params: dict, tasks, key):
  """Mean over the task axis of ``objective``. tasks: Episode with leading (T,) axis."""
  num_tasks = tasks.support_y.shape[0]
  keys = jax.random.split(key, num_tasks)
  losses, metrics = jax.vmap(
      lambda task, k: objective(learner, meta_params, task, k))(tasks, keys)
  return losses.mean(), jax.tree.map(jnp.mean, metrics)


def make_train_step(learner: Learner, objective: Objective,
                    optimizer: optax.GradientTransformation, *, meta_batch_size: int,
                    n_way: int, k_shot: int, q_query: int, jit: bool = True,
                    mesh=None) -> Callable:
  """Returns ``train_step(state, pool, key) -> (state, metrics)``.

  pool: (num_classes, num_examples, H, W[, C]) uint8 class pool on the device.
  key: the run's base key; the step's key is ``fold_in(key, state.step)``, so a
  resumed run draws exactly the tasks an uninterrupted one would.
  mesh: optional ``jax.sharding.Mesh`` with a "tasks" axis: the sampled tasks
  are split over its devices (state and pool should be replicated on it).
  """

  def train_step(state: TrainState, pool: jax.Array, key: jax.Array):
    step_key = jax.random.fold_in(key, state.step)
    task_key, objective_key = jax.random.split(step_key)
    tasks = shard_tasks(sample_episodes(pool, task_key, meta_batch_size, n_way, k_shot, q_query),
                        mesh)
    grad_fn = jax.value_and_grad(
        lambda mp: meta_loss(learner, objective, mp, tasks, objective_key), has_aux=True)
    (loss, metrics), grads = grad_fn(state.meta_params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.meta_params)
    meta_params = optax.apply_updates(state.meta_params, updates)
    metrics = {**metrics, "outer_loss": loss, "grad_norm": optax.tree.norm(grads)}
    return TrainState(state.step + 1, meta_params, opt_state), metrics

  return jax.jit(train_step, donate_argnums=0) if jit else train_step
