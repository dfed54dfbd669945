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
from advmaml.learners.base import FewShotLearner as Learner
from advmaml.objectives import Objective
from advmaml.runtime.sharding import device_count, shard_tasks


class TrainState(NamedTuple):
  step: jax.Array        # () int32, number of outer updates done
  meta_params: dict      # {"model": ..., ["inner_lr": ...]}
  opt_state: Any         # optax state for meta_params


def init_train_state(meta_params: dict, optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(jnp.zeros((), jnp.int32), meta_params, optimizer.init(meta_params))


AUTO_TASK_CHUNK = -1


def resolve_task_chunk(task_chunk: int, num_devices: int = 1) -> int:
  """The number of tasks to vmap together; -1 (auto) picks by backend.

  On CPU a whole vmapped meta-batch's activations overflow the caches and every
  op streams them through memory; one task per device at a time was 1.4-1.85x
  faster on the B1-B3 workloads (docs/benchmark_notes.md, section 6). GPUs and
  TPUs want the whole batch at once (0).
  """
  if task_chunk != AUTO_TASK_CHUNK:
    return task_chunk
  return num_devices if jax.default_backend() == "cpu" else 0


def meta_loss(learner: Learner, objective: Objective, meta_params: dict, tasks, key):
  """Mean over the task axis of ``objective``. tasks: Episode with leading (T,) axis."""
  num_tasks = tasks.support_y.shape[0]
  keys = jax.random.split(key, num_tasks)
  losses, metrics = jax.vmap(
      lambda task, k: objective(learner, meta_params, task, k))(tasks, keys)
  return losses.mean(), jax.tree.map(jnp.mean, metrics)


def meta_value_and_grad(learner: Learner, objective: Objective, meta_params: dict, tasks, key,
                        task_chunk: int = 0):
  """``((loss, metrics), grads)`` of ``meta_loss``, optionally in chunks of tasks.

  tasks: Episode with leading (T,) axis. task_chunk: 0 (or T) differentiates all T
  vmapped tasks at once; otherwise ``lax.scan`` runs T // task_chunk chunks of
  task_chunk vmapped tasks each and sums their gradients. Same result up to float
  summation order (every task keeps its own key); the point is a working set of one
  chunk's activations, which fits the CPU caches where all T tasks' do not.
  Chunk c holds tasks c, c + n, c + 2n, ... (n = number of chunks), so when the task
  axis is split over devices in contiguous blocks every chunk stays split the same way.
  """
  num_tasks = tasks.support_y.shape[0]
  if not task_chunk or task_chunk >= num_tasks:
    return jax.value_and_grad(
        lambda mp: meta_loss(learner, objective, mp, tasks, key), has_aux=True)(meta_params)
  if num_tasks % task_chunk:
    raise ValueError(f"task_chunk={task_chunk} must divide the {num_tasks} tasks of a meta-batch")
  num_chunks = num_tasks // task_chunk
  keys = jax.random.split(key, num_tasks)

  def chunked(x):  # (T, ...) -> (num_chunks, task_chunk, ...), chunk c = tasks c::num_chunks
    return jnp.swapaxes(x.reshape(task_chunk, num_chunks, *x.shape[1:]), 0, 1)

  def chunk_sums(mp, chunk_tasks, chunk_keys):
    losses, metrics = jax.vmap(
        lambda task, k: objective(learner, mp, task, k))(chunk_tasks, chunk_keys)
    return losses.sum(), jax.tree.map(jnp.sum, metrics)

  def body(grad_total, chunk):
    sums, grads = jax.value_and_grad(chunk_sums, has_aux=True)(meta_params, *chunk)
    return jax.tree.map(jnp.add, grad_total, grads), sums

  # Gradients are carried (their zeros need no trace of the objective, so it is traced
  # once); the per-chunk loss and metric sums come out as the scan's outputs.
  grad_total, chunk_sums_out = jax.lax.scan(
      body, jax.tree.map(jnp.zeros_like, meta_params), jax.tree.map(chunked, (tasks, keys)))
  loss_sum, metric_sums = jax.tree.map(lambda x: x.sum(0), chunk_sums_out)
  mean = lambda tree: jax.tree.map(lambda t: t / num_tasks, tree)
  return (loss_sum / num_tasks, mean(metric_sums)), mean(grad_total)


def make_train_step(learner: Learner, objective: Objective,
                    optimizer: optax.GradientTransformation, *, meta_batch_size: int,
                    n_way: int, k_shot: int, q_query: int, jit: bool = True,
                    mesh=None, task_chunk: int = AUTO_TASK_CHUNK) -> Callable:
  """Returns ``train_step(state, pool, key) -> (state, metrics)``.

  pool: (num_classes, num_examples, H, W[, C]) uint8 class pool on the device.
  key: the run's base key; the step's key is ``fold_in(key, state.step)``, so a
  resumed run draws exactly the tasks an uninterrupted one would.
  mesh: optional ``jax.sharding.Mesh`` with a "tasks" axis: the sampled tasks
  are split over its devices (state and pool should be replicated on it; build
  the learner's model for that many devices, ``training.build_experiment``).
  task_chunk: tasks differentiated together (see ``meta_value_and_grad``; 0: all;
  -1: ``resolve_task_chunk``'s choice for the backend).
  """
  num_devices = device_count(mesh)
  task_chunk = resolve_task_chunk(task_chunk, num_devices)

  def train_step(state: TrainState, pool: jax.Array, key: jax.Array):
    step_key = jax.random.fold_in(key, state.step)
    task_key, objective_key = jax.random.split(step_key)
    tasks = shard_tasks(sample_episodes(pool, task_key, meta_batch_size, n_way, k_shot, q_query),
                        mesh)
    (loss, metrics), grads = meta_value_and_grad(learner, objective, state.meta_params, tasks,
                                                 objective_key, task_chunk)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.meta_params)
    meta_params = optax.apply_updates(state.meta_params, updates)
    metrics = {**metrics, "outer_loss": loss, "grad_norm": optax.tree.norm(grads)}
    return TrainState(state.step + 1, meta_params, opt_state), metrics

  return jax.jit(train_step, donate_argnums=0) if jit else train_step
