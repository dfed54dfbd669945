"""On-device episode sampling: shapes, labels, distinct classes and drawers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from advmaml.data.episodes import sample_episode, sample_episodes

NUM_CLASSES, NUM_DRAWERS = 12, 20


def identity_pool() -> np.ndarray:
  """(C, D, 2, 2) uint8 pool whose pixels encode (class, drawer), so a sample can be traced back."""
  pool = np.zeros((NUM_CLASSES, NUM_DRAWERS, 2, 2), np.uint8)
  pool[:, :, 0, 0] = np.arange(NUM_CLASSES)[:, None]
  pool[:, :, 0, 1] = np.arange(NUM_DRAWERS)[None, :]
  return pool


def decode(x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
  """(B, 2, 2, 1) float images -> (class ids, drawer ids)."""
  x = np.rint(np.asarray(x)[..., 0] * 255).astype(int)
  return x[:, 0, 0], x[:, 0, 1]


def test_episode_shapes_and_labels():
  ep = sample_episode(jnp.asarray(identity_pool()), jax.random.key(0), n_way=5, k_shot=2, q_query=3)
  assert ep.support_x.shape == (10, 2, 2, 1) and ep.query_x.shape == (15, 2, 2, 1)
  assert ep.support_x.dtype == jnp.float32
  np.testing.assert_array_equal(ep.support_y, np.repeat(np.arange(5), 2))
  np.testing.assert_array_equal(ep.query_y, np.repeat(np.arange(5), 3))


def test_classes_and_drawers_are_distinct_and_consistent_with_labels():
  pool = jnp.asarray(identity_pool())
  batch = sample_episodes(pool, jax.random.key(1), num_tasks=16, n_way=5, k_shot=4, q_query=16)
  for t in range(16):
    s_cls, s_drw = decode(batch.support_x[t])
    q_cls, q_drw = decode(batch.query_x[t])
    cls = np.concatenate([s_cls.reshape(5, 4), q_cls.reshape(5, 16)], axis=1)
    drawers = np.concatenate([s_drw.reshape(5, 4), q_drw.reshape(5, 16)], axis=1)
    # One class per label, five distinct classes, and K+Q = 20 distinct drawers per class.
    assert (cls == cls[:, :1]).all()
    assert len(set(cls[:, 0])) == 5
    assert all(len(set(row)) == 20 for row in drawers)


def test_labels_are_a_fresh_permutation_per_task():
  pool = jnp.asarray(identity_pool())
  batch = sample_episodes(pool, jax.random.key(2), num_tasks=64, n_way=3, k_shot=1, q_query=1)
  first_class = [decode(batch.support_x[t])[0][0] for t in range(64)]
  # Label 0 goes to many different classes across tasks, roughly uniformly.
  counts = np.bincount(first_class, minlength=NUM_CLASSES)
  assert (counts > 0).sum() >= NUM_CLASSES - 1
  assert counts.max() < 16


def test_same_key_same_episode_other_key_other_episode():
  pool = jnp.asarray(identity_pool())
  a = sample_episode(pool, jax.random.key(3), 5, 1, 2)
  b = sample_episode(pool, jax.random.key(3), 5, 1, 2)
  c = sample_episode(pool, jax.random.key(4), 5, 1, 2)
  np.testing.assert_array_equal(a.support_x, b.support_x)
  assert not np.array_equal(a.query_x, c.query_x)


def test_rgb_pools_keep_their_channels():
  pool = jnp.zeros((6, 20, 4, 4, 3), jnp.uint8)
  ep = sample_episode(pool, jax.random.key(0), 2, 1, 1)
  assert ep.support_x.shape == (2, 4, 4, 3)
