"""The model registry: ResNet-12's size and a real meta-step on 84x84 images, a backbone
registered from outside the library trained and evaluated, pre-registry model names."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from advmaml import models
from advmaml.config import Config, ConfigError, preset, validate
from advmaml.eval.evaluation import evaluate_episodes
from advmaml.learners import cross_entropy
from advmaml.train.meta_step import init_train_state, make_train_step
from advmaml.models import BatchStatNorm, Conv, make_model
from advmaml.models.resnet12 import widths
from advmaml.objectives import natural
from advmaml.train.training import build_experiment
from conftest import assert_leaves_close_to_scale


def resnet12_parameter_count(channels, in_channels: int, n_way: int) -> int:
  """By hand: per block three 3x3 convs and a 1x1 shortcut (no biases), four batch
  norms (scale and bias), then the head's kernel and bias."""
  total, c_in = 0, in_channels
  for c in channels:
    total += 9 * c_in * c + 2 * 9 * c * c + c_in * c + 4 * 2 * c
    c_in = c
  return total + c_in * n_way + n_way


def test_resnet12_shapes_and_parameter_count_at_full_width():
  model = make_model(5, (84, 84, 3), filters=64, model="resnet12")
  params = jax.eval_shape(model.init, jax.random.key(0))  # shapes only: nothing heavy runs
  assert widths(64) == (64, 160, 320, 640)
  count = sum(leaf.size for leaf in jax.tree.leaves(params))
  assert count == resnet12_parameter_count((64, 160, 320, 640), 3, 5) == 12_427_525
  assert sorted(params) == ["block0", "block1", "block2", "block3", "head"]
  assert params["block3"]["conv2"]["kernel"].shape == (3, 3, 640, 640)
  assert params["block1"]["shortcut"]["kernel"].shape == (1, 1, 64, 160)
  assert params["head"]["kernel"].shape == (640, 5)
  x = jax.ShapeDtypeStruct((7, 84, 84, 3), jnp.float32)
  assert jax.eval_shape(model.features, params, x).shape == (7, 640)  # global average pool
  assert jax.eval_shape(model.apply, params, x).shape == (7, 5)
  with pytest.raises(ValueError, match="too small for four resnet12 blocks"):
    make_model(5, (12, 12, 3), model="resnet12")


def test_resnet12_meta_train_step_on_84x84_images():
  """One first-order MAML step (1 inner step, 2 tasks, 2-way 1-shot, 1 query; first order
  halves the compile) with support-set batch-norm statistics: a finite loss, and every
  parameter moves. The second-order step at full width is B5 (test_benchmark.py traces it)."""
  cfg = preset("tiny", model="resnet12", filters=4, n_way=2, k_shot=1, q_query=1,
               meta_batch_size=2, image_size=84, batch_norm="support", first_order=True)
  exp = build_experiment(cfg, (84, 84, 3))
  pool = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 3, 84, 84, 3), dtype=np.uint8))
  state = init_train_state(exp.learner.init_meta_params(exp.model.init(jax.random.key(0))),
                           exp.optimizer)
  step = make_train_step(exp.learner, natural, exp.optimizer, meta_batch_size=2, n_way=2,
                         k_shot=1, q_query=1)
  before = jax.device_get(state.meta_params)
  state, metrics = step(state, pool, jax.random.key(1))
  assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
  after = jax.device_get(state.meta_params)
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after)
  assert all(jax.tree.leaves(moved)), moved


def test_resnet12_reference_gradients_and_forward_mode(x64):
  """A narrow ResNet-12 on 16x16 images, float64, reference kernels: reverse and forward
  mode in the parameters agree with finite differences along random directions (each
  batch's statistics); with the support's statistics, forward mode in the images agrees
  with reverse mode (<u, J w> = <J^T u, w>)."""
  model = make_model(3, (16, 16, 1), filters=2, model="resnet12", kernels="reference")
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), model.init(jax.random.key(0)))
  sx = jax.random.uniform(jax.random.key(1), (3, 16, 16, 1), jnp.float64)
  qx = jax.random.uniform(jax.random.key(2), (6, 16, 16, 1), jnp.float64)
  qy = jnp.repeat(jnp.arange(3), 2)
  loss = lambda p: cross_entropy(model.apply(p, qx), qy)[0]
  check_grads(jax.jit(loss), (params,), order=1, modes=["fwd", "rev"], eps=1e-6)
  frozen = model.freeze_batch_stats(params, sx)
  f = lambda x: model.apply(frozen, x)
  w = jax.random.normal(jax.random.key(4), qx.shape, jnp.float64)
  u = jax.random.normal(jax.random.key(5), (6, 3), jnp.float64)
  forward, reverse = jax.jit(lambda: (jnp.vdot(u, jax.jvp(f, (qx,), (w,))[1]),
                                      jnp.vdot(jax.vjp(f, qx)[1](u)[0], w)))()
  np.testing.assert_allclose(forward, reverse, rtol=1e-9)
  assert abs(float(forward)) > 1e-3


def test_resnet12_cpu_kernels_match_reference():
  """Logits equal to float32 rounding; gradients to within 1% of each leaf's largest entry
  (a 4-4-10-20 ResNet-12 on 16x16 images is ill-conditioned: its last batch norms see
  few values, and float32 summation order moves its gradients by ~0.4%)."""
  x = jax.random.uniform(jax.random.key(2), (6, 16, 16, 1))
  y = jnp.repeat(jnp.arange(3), 2)
  out = []
  for kernels in ("cpu", "reference"):
    model = make_model(3, (16, 16, 1), filters=4, model="resnet12", kernels=kernels)
    params = model.init(jax.random.key(0))
    frozen = lambda p, model=model: model.freeze_batch_stats(p, x[:3])
    f = lambda p, model=model: cross_entropy(model.apply(frozen(p), x), y)[0]
    out.append(jax.device_get(jax.jit(lambda p, model=model, f=f: (
        model.apply(p, x), model.apply(frozen(p), x), jax.grad(f)(p)))(params)))
  (cpu_batch, cpu_support, cpu_grads), (ref_batch, ref_support, ref_grads) = out
  np.testing.assert_allclose(cpu_batch, ref_batch, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(cpu_support, ref_support, rtol=1e-4, atol=1e-5)
  assert_leaves_close_to_scale(cpu_grads, ref_grads, rel=1e-2)


class TinyBackbone(nn.Module):
  """A toy backbone written outside the library: one strided conv, batch norm, pooled."""
  filters: int
  kernels: object

  @nn.compact
  def __call__(self, x):  # (B, H, W, C) -> (B, filters)
    x = Conv(self.filters, 2, self.kernels, name="conv")(x)
    return nn.relu(BatchStatNorm(self.kernels, name="norm")(x)).mean(axis=(1, 2))


@pytest.fixture
def toy_registered():
  models.register("toy", lambda image_shape, filters, kernels: TinyBackbone(filters, kernels))
  yield
  models.BACKBONES.pop("toy")


def test_a_registered_backbone_trains_and_evaluates_without_library_changes(toy_registered):
  """Support-set statistics, so freeze_batch_stats runs on the toy's batch norm too."""
  cfg = preset("tiny", model="toy", n_way=3, k_shot=2, q_query=2, filters=8, meta_batch_size=4,
               outer_lr=3e-3, image_size=8, batch_norm="support")
  validate(cfg)
  exp = build_experiment(cfg, (8, 8, 1))
  params = exp.model.init(jax.random.key(0))
  assert sorted(params) == ["conv", "head", "norm"]  # the head added by the registry
  assert "mean" in exp.learner.freeze_stats(params, jnp.ones((3, 8, 8, 1)))["norm"]
  rng = np.random.default_rng(0)
  patterns = rng.integers(0, 256, (6, 1, 8, 8))
  pool = jnp.asarray(np.clip(patterns + rng.integers(-30, 30, (6, 20, 8, 8)), 0, 255)
                     .astype(np.uint8))
  state = init_train_state(exp.learner.init_meta_params(params), exp.optimizer)
  step = make_train_step(exp.learner, natural, exp.optimizer, meta_batch_size=4, n_way=3,
                         k_shot=2, q_query=2)
  losses = []
  for _ in range(30):
    state, metrics = step(state, pool, jax.random.key(1))
    losses.append(float(metrics["loss"]))
  assert np.mean(losses[-5:]) < np.mean(losses[:5])
  out = evaluate_episodes(dataclasses.replace(exp.test_learner, inner_steps=2), state.meta_params,
                          pool, jax.random.key(2), num_episodes=8, n_way=3, k_shot=2, q_query=2,
                          batch_tasks=4)
  assert out["accuracy"]["n"] == 8 and out["accuracy"]["mean"] > 1 / 3


def test_registry_refuses_a_taken_name_and_lists_the_names():
  assert models.names() == ("conv4", "conv4_maxpool", "resnet12")
  with pytest.raises(ValueError, match="already registered"):
    models.register("resnet12", lambda image_shape, filters, kernels: None)
  with pytest.raises(ConfigError, match="--model='resnet'; choose one of .*resnet12"):
    validate(Config(model="resnet"))


def test_pre_registry_names_map_to_the_new_ones_with_a_note(caplog):
  assert preset("tiny", model="strided").model == "conv4"
  assert preset("tiny", model="maxpool").model == "conv4_maxpool"
  assert "--model=maxpool is now called --model=conv4_maxpool" in caplog.text
  with pytest.raises(ConfigError, match="--model='maxpool' .now called 'conv4_maxpool'"):
    validate(Config(model="maxpool"))  # set past preset(): named, not guessed
  old = make_model(3, (16, 16, 1), filters=4, model="maxpool")
  new = make_model(3, (16, 16, 1), filters=4, model="conv4_maxpool")
  same = jax.tree.map(np.array_equal, old.init(jax.random.key(0)), new.init(jax.random.key(0)))
  assert all(jax.tree.leaves(same))
