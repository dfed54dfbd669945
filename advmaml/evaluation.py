"""Few-shot evaluation over many test episodes, with 95% confidence intervals.

Episode ``i`` is always drawn from ``fold_in(key, i)``, so results depend only
on the seed and the number of episodes, not on how many episodes are batched
into one jitted call.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from advmaml.data.episodes import Episode, sample_episode
from advmaml.maml import Learner
from advmaml.meta_step import AUTO_TASK_CHUNK, resolve_task_chunk

# (learner, meta_params, episode, key) -> dict of per-episode scalars.
EpisodeMetricFn = Callable[[Learner, dict, Episode, jax.Array], dict]


def clean_accuracy(learner: Learner, meta_params: dict, episode: Episode, key, *,
                   inner_steps: int) -> dict:
  """Adapt on the support set with ``inner_steps`` steps, score the query set."""
  del key
  fast = learner.adapt(meta_params, episode.support_x, episode.support_y, steps=inner_steps)
  _, accuracy = learner.loss(fast, episode.query_x, episode.query_y)
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


@functools.partial(jax.jit, static_argnames=(
    "learner", "metric_fn", "n_way", "k_shot", "q_query", "batch_tasks", "task_chunk"))
def _evaluate_batch(meta_params, pool, key, start, *, learner, metric_fn, n_way, k_shot,
                    q_query, batch_tasks, task_chunk=AUTO_TASK_CHUNK):
  indices = start + jnp.arange(batch_tasks)

  def one(i):
    episode, metric_key = evaluation_episode(pool, key, i, n_way, k_shot, q_query)
    return metric_fn(learner, meta_params, episode, metric_key)

  # Episodes vmapped together: by default one at a time on CPU, where that keeps the
  # working set in cache, and the whole batch elsewhere (meta_step.resolve_task_chunk).
  chunk = min(resolve_task_chunk(task_chunk) or batch_tasks, batch_tasks)
  return jax.lax.map(one, indices, batch_size=chunk)


def evaluate_episodes(learner: Learner, meta_params: dict, pool, key, *, num_episodes: int,
                      n_way: int, k_shot: int, q_query: int, inner_steps: int,
                      batch_tasks: int = 50, metric_fn: EpisodeMetricFn | None = None) -> dict:
  """Runs ``num_episodes`` episodes; returns {metric: {"mean", "ci95", "std", "n"}}.

  pool: (C, D, H, W[, ch]) uint8 class pool. ``metric_fn`` defaults to clean
  accuracy after ``inner_steps`` adaptation steps; it must be hashable
  (a module-level function or a ``functools.partial`` of one).
  """
  if metric_fn is None:
    metric_fn = functools.partial(clean_accuracy, inner_steps=inner_steps)
  batch_tasks = min(batch_tasks, num_episodes)
  pool = jnp.asarray(pool)
  chunks = []
  for start in range(0, num_episodes, batch_tasks):
    out = _evaluate_batch(meta_params, pool, key, start, learner=learner, metric_fn=metric_fn,
                          n_way=n_way, k_shot=k_shot, q_query=q_query, batch_tasks=batch_tasks)
    chunks.append(jax.device_get(out))
  per_episode = {name: np.concatenate([c[name] for c in chunks])[:num_episodes]
                 for name in chunks[0]}
  return {name: mean_and_ci95(values) for name, values in per_episode.items()}
