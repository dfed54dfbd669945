"""N-way K-shot episode sampling, on the device, inside the jitted step.

A *class pool* is one array holding every image of every class of a split:
``(num_classes, num_drawers, H, W)`` or ``(num_classes, num_drawers, H, W, C)``,
uint8 with 0..255 mapped to [0, 1]. Keeping it on the device as uint8 and
sampling with a key inside the step avoids any host round-trip per step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Episode(NamedTuple):
  """One few-shot task (or a batch of them, with a leading task axis T).

  support_x: (N*K, H, W, C) float32 in [0, 1]; support_y: (N*K,) int32 in 0..N-1.
  query_x:   (N*Q, H, W, C) float32 in [0, 1]; query_y:   (N*Q,) int32.
  classes:   (N,) int32, the pool's index of each label's class (label n is class
             classes[n] of the split), or None where there is no pool (Lake's runs).
             Learners never see it; an objective that trains a classifier over all
             the split's classes (the transfer baseline's) reads it.
  Examples are ordered class-major: labels are [0]*K + [1]*K + ...
  """
  support_x: jax.Array
  support_y: jax.Array
  query_x: jax.Array
  query_y: jax.Array
  classes: jax.Array | None = None


def sample_episode(pool: jax.Array, key: jax.Array, n_way: int, k_shot: int,
                   q_query: int) -> Episode:
  """Draws N distinct classes and K+Q distinct examples of each.

  The classes come out of ``choice`` in a random order, so the label given to
  each class (its position) is a fresh random permutation per task.
  """
  num_classes, num_examples = pool.shape[:2]
  class_key, example_key = jax.random.split(key)
  classes = jax.random.choice(class_key, num_classes, (n_way,), replace=False)
  examples = jax.vmap(
      lambda k: jax.random.choice(k, num_examples, (k_shot + q_query,), replace=False)
  )(jax.random.split(example_key, n_way))                      # (N, K+Q)
  images = pool[classes[:, None], examples]                    # (N, K+Q, H, W[, C])
  if images.ndim == 4:
    images = images[..., None]
  images = images.astype(jnp.float32) / 255.0
  image_shape = images.shape[2:]

  def flat(x):
    return x.reshape(-1, *image_shape)

  labels = jnp.arange(n_way, dtype=jnp.int32)
  return Episode(
      support_x=flat(images[:, :k_shot]),
      support_y=jnp.repeat(labels, k_shot),
      query_x=flat(images[:, k_shot:]),
      query_y=jnp.repeat(labels, q_query),
      classes=classes.astype(jnp.int32))


def sample_episodes(pool: jax.Array, key: jax.Array, num_tasks: int, n_way: int,
                    k_shot: int, q_query: int) -> Episode:
  """A batch of ``num_tasks`` independent episodes; every field gets a leading (T,) axis."""
  keys = jax.random.split(key, num_tasks)
  return jax.vmap(lambda k: sample_episode(pool, k, n_way, k_shot, q_query))(keys)
