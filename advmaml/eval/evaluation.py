"""Few-shot evaluation over many test episodes, with 95% confidence intervals.

Episode ``i`` is always drawn from ``fold_in(key, i)``, so results depend only
on the seed and the number of episodes, not on how many episodes are batched
into one jitted call, nor on whether an interrupted evaluation resumed from
the episodes it had finished (``partial_path``).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from advmaml.runtime import sharding
from advmaml.data.episodes import Episode, sample_episode
from advmaml.learners.base import FewShotLearner as Learner, adapt_key, query_loss
from advmaml.train.meta_step import AUTO_TASK_CHUNK, resolve_task_chunk
from advmaml.io import partial_results
from advmaml.io.progress import Progress

# (learner, meta_params, episode, key) -> dict of per-episode scalars.
EpisodeMetricFn = Callable[[Learner, dict, Episode, jax.Array], dict]


def clean_accuracy(learner: Learner, meta_params: dict, episode: Episode, key) -> dict:
  """Adapt on the support set, score the query set (learner: a "test"-phase learner)."""
  state = learner.adapt(meta_params, episode.support_x, episode.support_y, adapt_key(key))
  _, accuracy = query_loss(learner, state, episode.query_x, episode.query_y)
  return {"accuracy": accuracy}


def mean_and_ci95(values: np.ndarray) -> dict:
  """Mean and the half-width of its normal-approximation 95% interval. values: (n,)."""
  values = np.asarray(values, np.float64)
  n = values.size
  std = float(values.std(ddof=1)) if n > 1 else 0.0
  return {"mean": float(values.mean()), "ci95": 1.96 * std / math.sqrt(n) if n > 1 else float("nan"),
          "std": std, "n": int(n)}


def evaluation_episode(pool, key, index, n_way: int, k_shot: int, q_query: int):
  """Episode ``index`` of an evaluation with ``key``, and the key its metric uses."""
  sample_key, metric_key = jax.random.split(jax.random.fold_in(key, index))
  return sample_episode(pool, sample_key, n_way, k_shot, q_query), metric_key


def map_over_devices(fn, xs, shared, *, mesh: Mesh | None = None,
                     task_chunk: int = AUTO_TASK_CHUNK):
  """Inside jit: ``fn(x, shared)`` for every ``x`` along the leading axis of ``xs``.

  xs: pytree of arrays with a leading (N,) axis (episode indices, episodes);
  shared: pytree every call sees whole (meta_params, the pool, the key).
  Returns fn's outputs stacked: {name: (N,)}. mesh: optional 1-D "tasks" mesh;
  each of its devices runs a contiguous block of N / devices items (which must
  divide), with ``shared`` replicated. Item i is the same computation wherever
  it runs, so the results do not depend on the mesh.
  """
  devices = sharding.device_count(mesh)
  n = jax.tree.leaves(xs)[0].shape[0]
  if n % devices:
    raise ValueError(f"{n} evaluation episodes per call do not split over "
                     f"{devices} devices; use a multiple of {devices}")
  # Items vmapped together: by default one at a time per device on CPU, where that
  # keeps the working set in cache, and the whole block elsewhere (resolve_task_chunk).
  per_device = n // devices
  chunk = min(resolve_task_chunk(task_chunk) or per_device, per_device)

  def run(xs, shared):  # xs: this device's block
    return jax.lax.map(lambda x: fn(x, shared), xs, batch_size=chunk)

  if devices == 1:
    return run(xs, shared)
  # shard_map rather than a sharding constraint: every device runs its own lax.map
  # over its block, which the SPMD partitioner would not split out of one scan.
  # check_vma=False: the models' custom VJPs return unannotated cotangents, and
  # nothing here is differentiated through the shard_map or reduced across devices.
  by_task, whole = PartitionSpec(sharding.TASK_AXIS), PartitionSpec()
  return jax.shard_map(run, mesh=mesh, in_specs=(by_task, whole), out_specs=by_task,
                       check_vma=False)(xs, shared)


@functools.partial(jax.jit, static_argnames=(
    "learner", "metric_fn", "n_way", "k_shot", "q_query", "batch_tasks", "task_chunk", "mesh"))
def _evaluate_batch(meta_params, pool, key, start, *, learner, metric_fn, n_way, k_shot,
                    q_query, batch_tasks, task_chunk=AUTO_TASK_CHUNK, mesh: Mesh | None = None):
  """Metrics of episodes ``start .. start + batch_tasks - 1``: {name: (batch_tasks,)}.

  mesh: optional 1-D "tasks" mesh splitting the episodes (``map_over_devices``);
  meta_params and pool should be replicated on it.
  """
  def one(i, shared):
    meta_params, pool, key = shared
    episode, metric_key = evaluation_episode(pool, key, i, n_way, k_shot, q_query)
    return metric_fn(learner, meta_params, episode, metric_key)
  return map_over_devices(one, start + jnp.arange(batch_tasks), (meta_params, pool, key),
                          mesh=mesh, task_chunk=task_chunk)


def evaluate_episodes(learner: Learner, meta_params: dict, pool, key, *, num_episodes: int,
                      n_way: int, k_shot: int, q_query: int,
                      batch_tasks: int = 50, metric_fn: EpisodeMetricFn | None = None,
                      mesh: Mesh | None = None, partial_path=None, identity: str = "") -> dict:
  """Runs ``num_episodes`` episodes; returns {metric: {"mean", "ci95", "std", "n"}}.

  learner: the learner as evaluated (``make_learner(..., phase="test")``: e.g.
  MAML with its eval_inner_steps). pool: (C, D, H, W[, ch]) uint8 class pool.
  ``metric_fn`` defaults to clean accuracy; it must be hashable
  (a module-level function or a ``functools.partial`` of one). mesh: optional
  "tasks" mesh (``sharding.make_mesh``) whose devices split each call's episodes;
  the results do not depend on it. partial_path: optional file that keeps the
  per-episode results after every call (:mod:`advmaml.io.partial_results`);
  an evaluation finding it there with the same ``identity`` (a string naming
  everything its results depend on: the caller's settings, checkpoint, data)
  starts after its episodes. The caller removes it once the results are kept.
  """
  if metric_fn is None:
    metric_fn = clean_accuracy
  devices = sharding.device_count(mesh)
  if devices == 1:
    mesh = None   # one compiled program for every single-device caller
  # Rounded up to split over the devices; episodes past num_episodes are dropped.
  batch_tasks = -(-min(batch_tasks, num_episodes) // devices) * devices
  pool = sharding.replicate(jnp.asarray(pool), mesh)
  meta_params = sharding.replicate(meta_params, mesh)
  done = partial_results.load(partial_path, identity) if partial_path is not None else {}
  # A longer evaluation's first episodes are this one's (episode i depends on i alone);
  # _concatenate drops any past num_episodes.
  chunks = [done] if done else []
  first = min(len(next(iter(done.values()))), num_episodes) if done else 0
  # A line every progress.EVERY_SECONDS (600 episodes under attack take minutes).
  progress = Progress("evaluation", num_episodes, "episodes", done=first)
  for start in range(first, num_episodes, batch_tasks):
    out = _evaluate_batch(meta_params, pool, key, start, learner=learner, metric_fn=metric_fn,
                          n_way=n_way, k_shot=k_shot, q_query=q_query, batch_tasks=batch_tasks,
                          mesh=mesh)
    chunks.append(jax.device_get(out))
    if partial_path is not None:
      partial_results.save(partial_path, identity, _concatenate(chunks, num_episodes))
    progress.update(min(start + batch_tasks, num_episodes))
  per_episode = _concatenate(chunks, num_episodes)
  return {name: mean_and_ci95(values) for name, values in per_episode.items()}


def _concatenate(chunks: list[dict], num_episodes: int) -> dict:
  """{name: (num_episodes,)} of the chunks' {name: (n_i,)} (a last batch's extra episodes dropped)."""
  return {name: np.concatenate([np.asarray(c[name]) for c in chunks])[:num_episodes]
          for name in chunks[0]}
