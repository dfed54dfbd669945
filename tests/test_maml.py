"""MAML's meta-gradient: finite differences, first-order vs second-order, Meta-SGD, ANIL."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advmaml.data.episodes import Episode
from advmaml.learners import MAML as Learner, query_loss
from advmaml.models import make_model
from advmaml.objectives import natural

N_WAY = 3


def tiny_task(key, k=2, q=2, size=8, dtype=jnp.float32) -> Episode:
  """A random 3-way task of 8x8 images; labels class-major."""
  k1, k2 = jax.random.split(key)
  return Episode(jax.random.uniform(k1, (N_WAY * k, size, size, 1), dtype),
                 jnp.repeat(jnp.arange(N_WAY), k),
                 jax.random.uniform(k2, (N_WAY * q, size, size, 1), dtype),
                 jnp.repeat(jnp.arange(N_WAY), q))


def tiny_model(variant="conv4", conv_impl="im2col", size=8):
  return make_model(N_WAY, (size, size, 1), filters=3, model=variant, conv_impl=conv_impl)


def outer_loss(learner, meta_params, task):
  return natural(learner, meta_params, task, None)[0]


def flat_grad_and_fd(learner, meta_params, task, num_coords=12, eps=1e-6, seed=0):
  """Analytic meta-gradient and central finite differences on random coordinates.

  Run in float64, where a small step keeps both rounding error and the chance
  of stepping across a ReLU kink negligible.
  """
  flat, unravel = jax.flatten_util.ravel_pytree(meta_params)
  f = lambda v: outer_loss(learner, unravel(v), task)
  grad = jax.jit(jax.grad(f))(flat)
  idx = np.random.default_rng(seed).choice(flat.size, num_coords, replace=False)
  steps = jnp.zeros((num_coords, flat.size), flat.dtype).at[jnp.arange(num_coords), idx].set(eps)
  f_batch = jax.jit(jax.vmap(lambda e: f(flat + e)))
  fd = (f_batch(steps) - f_batch(-steps)) / (2 * eps)
  return np.asarray(grad)[idx], np.asarray(fd)


def to64(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


@pytest.mark.parametrize("variant", ["conv4", "conv4_maxpool"])
@pytest.mark.parametrize("steps", [1, 2])
def test_second_order_meta_gradient_matches_finite_differences(x64, variant, steps):
  import jax.flatten_util  # noqa: F401
  size = 8 if variant == "conv4" else 16  # four 2x2 pools need 16 pixels
  model = tiny_model(variant, size=size)
  learner = Learner(model.apply, inner_steps=steps, inner_lr=0.3)
  meta = to64(learner.init_meta_params(model.init(jax.random.key(0))))
  task = tiny_task(jax.random.key(1), size=size, dtype=jnp.float64)
  grad, fd = flat_grad_and_fd(learner, meta, task)
  np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-8)


def test_meta_sgd_learning_rate_gradient_matches_finite_differences(x64):
  import jax.flatten_util  # noqa: F401
  model = tiny_model()
  learner = Learner(model.apply, inner_steps=2, inner_lr=0.2, meta_sgd=True)
  meta = to64(learner.init_meta_params(model.init(jax.random.key(0))))
  task = tiny_task(jax.random.key(2), dtype=jnp.float64)
  grad, fd = flat_grad_and_fd(learner, meta, task, num_coords=16, seed=3)
  np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-8)
  assert np.abs(grad).max() > 0


def test_first_order_equals_query_gradient_at_adapted_params():
  """FOMAML with one step: d/dθ L_q(θ - α·stop_grad(∇L_s(θ))) = ∇L_q evaluated at the adapted params."""
  model = tiny_model()
  fo = Learner(model.apply, inner_steps=1, inner_lr=0.4, first_order=True)
  so = Learner(model.apply, inner_steps=1, inner_lr=0.4, first_order=False)
  meta = fo.init_meta_params(model.init(jax.random.key(0)))
  task = tiny_task(jax.random.key(1))
  fo_grad = jax.grad(lambda m: outer_loss(fo, m, task))(meta)

  # Independent path: adapt by hand, then take the query gradient at the adapted point.
  support_grad = jax.grad(lambda p: query_loss(fo, p, task.support_x, task.support_y)[0])(meta["model"])
  adapted = jax.tree.map(lambda p, g: p - 0.4 * g, meta["model"], support_grad)
  query_grad = jax.grad(lambda p: query_loss(fo, p, task.query_x, task.query_y)[0])(adapted)
  chex.assert_trees_all_close(fo_grad["model"], query_grad, atol=1e-6, rtol=1e-5)

  so_grad = jax.grad(lambda m: outer_loss(so, m, task))(meta)
  diff = jax.tree.reduce(max, jax.tree.map(lambda a, b: jnp.abs(a - b).max(), fo_grad, so_grad))
  assert diff > 1e-4, "second-order gradient should differ from first-order"


def test_zero_inner_steps_is_plain_pretraining_gradient():
  model = tiny_model()
  learner = Learner(model.apply, inner_steps=0)
  meta = learner.init_meta_params(model.init(jax.random.key(0)))
  task = tiny_task(jax.random.key(1))
  chex.assert_trees_all_equal(learner.adapt(meta, task.support_x, task.support_y), meta["model"])


def test_adaptation_lowers_support_loss():
  model = tiny_model()
  learner = Learner(model.apply, inner_steps=5, inner_lr=0.1)
  meta = learner.init_meta_params(model.init(jax.random.key(0)))
  task = tiny_task(jax.random.key(1))
  before = query_loss(learner, meta["model"], task.support_x, task.support_y)[0]
  fast = learner.adapt(meta, task.support_x, task.support_y)
  after = query_loss(learner, fast, task.support_x, task.support_y)[0]
  assert after < before - 0.05


def test_anil_adapts_only_the_head():
  model = tiny_model()
  learner = Learner(model.apply, inner_steps=3, inner_lr=0.5, anil=True)
  meta = learner.init_meta_params(model.init(jax.random.key(0)))
  task = tiny_task(jax.random.key(1))
  fast = learner.adapt(meta, task.support_x, task.support_y)
  for name in meta["model"]:
    same = jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), fast[name], meta["model"][name]))
    assert same == (name != "head"), name
  # The body still gets a (second-order) meta-gradient through the adapted head.
  grads = jax.grad(lambda m: outer_loss(learner, m, task))(meta)
  assert float(jnp.abs(grads["model"]["conv0"]["kernel"]).max()) > 0


def test_meta_sgd_adds_per_parameter_learning_rates():
  model = tiny_model()
  learner = Learner(model.apply, inner_lr=0.25, meta_sgd=True)
  meta = learner.init_meta_params(model.init(jax.random.key(0)))
  chex.assert_trees_all_equal_shapes(meta["inner_lr"], meta["model"])
  assert all(float(x.min()) == 0.25 == float(x.max()) for x in jax.tree.leaves(meta["inner_lr"]))


def test_remat_gives_the_same_meta_gradient():
  model = tiny_model()
  task = tiny_task(jax.random.key(1))
  grads = []
  for remat in (False, True):
    learner = Learner(model.apply, inner_steps=3, inner_lr=0.3, remat=remat)
    meta = learner.init_meta_params(model.init(jax.random.key(0)))
    grads.append(jax.jit(jax.grad(lambda m: outer_loss(learner, m, task)))(meta))
  chex.assert_trees_all_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
