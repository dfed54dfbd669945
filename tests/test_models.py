"""The fast convolution and pooling agree with XLA's reference ops, values and gradients."""

from __future__ import annotations

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from advmaml import models, sharding
from advmaml.flops import count_flops
from advmaml.maml import Learner
from advmaml.models import (conv2d_im2col, conv2d_taps, conv2d_winograd, conv2d_xla, make_model,
                            max_pool_2x2)


@pytest.mark.parametrize("conv", [conv2d_im2col, conv2d_taps, conv2d_winograd])
@pytest.mark.parametrize("size,stride,cin", [(28, 2, 1), (7, 2, 5), (4, 2, 3), (9, 1, 2), (5, 1, 4),
                                             (14, 1, 16), (6, 1, 3), (1, 1, 2), (9, 1, 1)])
def test_fast_convs_match_xla_conv(conv, size, stride, cin):
  kx, kw = jax.random.split(jax.random.key(size + stride))
  x = jax.random.normal(kx, (3, size, size, cin))
  # Single-channel inputs get 12 filters, so im2col takes its narrow-patches path (9 < 12).
  w = jax.random.normal(kw, (3, 3, cin, 12 if cin == 1 else 6))
  np.testing.assert_allclose(conv(x, w, stride), conv2d_xla(x, w, stride), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w, stride)))
  g_fast = jax.grad(loss(conv), argnums=(0, 1))(x, w)
  g_ref = jax.grad(loss(conv2d_xla), argnums=(0, 1))(x, w)
  chex.assert_trees_all_close(g_fast, g_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("conv", [conv2d_im2col, conv2d_taps, conv2d_winograd])
@pytest.mark.parametrize("stride", [1, 2])
def test_fast_convs_match_xla_under_vmap_over_task_weights(conv, stride):
  x = jax.random.normal(jax.random.key(0), (4, 2, 14, 14, 3))
  w = jax.random.normal(jax.random.key(1), (4, 3, 3, 3, 5))
  fast = jax.vmap(lambda x, w: conv(x, w, stride))(x, w)
  ref = jax.vmap(lambda x, w: conv2d_xla(x, w, stride))(x, w)
  np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-5)


def test_narrow_patches_matmul_first_and_second_derivatives_match_matmul():
  """The custom-VJP matmul has @'s gradients, their derivatives (MAML's second order), under vmap."""
  patches = jax.random.normal(jax.random.key(0), (2, 5, 7, 9))  # (tasks, ..., K)
  weights = jax.random.normal(jax.random.key(1), (2, 9, 16))     # (tasks, K, O)

  def inner_then_outer(matmul):
    def task(p, w):
      inner = lambda w: jnp.sum(jnp.tanh(matmul(p, w)) ** 2)
      fast = w - 0.3 * jax.grad(inner)(w)  # one inner SGD step, differentiated through
      return jnp.sum(jnp.sin(matmul(p, fast)))
    return lambda p, w: jax.vmap(task)(p, w).sum()

  got = jax.grad(inner_then_outer(models._narrow_patches_matmul), argnums=(0, 1))(patches, weights)
  want = jax.grad(inner_then_outer(jnp.matmul), argnums=(0, 1))(patches, weights)
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-4)


def _force_image_chunks(monkeypatch, images_per_chunk_budget, patch_bytes_per_image):
  """Makes conv2d_im2col chunk any layer, with a budget of so many images' patches."""
  monkeypatch.setattr(models, "_cpu_cores_per_device", lambda: 1)
  monkeypatch.setattr(models, "PATCH_CHUNK_THRESHOLD_BYTES", 0)
  monkeypatch.setattr(models, "PATCH_CHUNK_BYTES", images_per_chunk_budget * patch_bytes_per_image)
  monkeypatch.setattr(models, "CHUNKED_STRIDES", (1, 2))  # the chunked path handles any stride


@pytest.mark.parametrize("images, budget, plan", [(6, 2, (3, 2)),   # 3 even chunks
                                                  (7, 3, (3, 2))])  # 3 chunks + 1 image apart
@pytest.mark.parametrize("stride", [1, 2])
def test_image_chunked_im2col_matches_xla_to_second_order(monkeypatch, images, budget, plan, stride):
  """Chunks of images (patches rebuilt in the backward) give lax.conv's values, gradients
  and gradients of an inner SGD step's gradient (MAML's second order), under vmap."""
  size, cin, cout = 9, 4, 6
  out = -(-size // stride)
  _force_image_chunks(monkeypatch, budget, out * out * 9 * cin * 4)
  assert models._image_chunks(images, out * out * 9 * cin * 4) == plan
  x = jax.random.normal(jax.random.key(0), (2, images, size, size, cin))   # (tasks, B, H, W, C)
  w = jax.random.normal(jax.random.key(1), (2, 3, 3, cin, cout)) * 0.3
  jaxpr = str(jax.make_jaxpr(lambda x, w: conv2d_im2col(x, w, stride))(x[0], w[0]))
  assert "scan" in jaxpr and "custom_vjp" in jaxpr  # the chunked path, not the plain one
  np.testing.assert_allclose(jax.vmap(lambda x, w: conv2d_im2col(x, w, stride))(x, w),
                             jax.vmap(lambda x, w: conv2d_xla(x, w, stride))(x, w),
                             rtol=1e-5, atol=1e-5)

  def inner_then_outer(conv):
    def task(x, w):
      inner = lambda w: jnp.sum(jnp.tanh(conv(x, w, stride)) ** 2)
      fast = w - 0.1 * jax.grad(inner)(w)
      return jnp.sum(jnp.sin(conv(x[::-1], fast, stride)))
    return lambda x, w: jax.vmap(task)(x, w).sum()

  got = jax.grad(inner_then_outer(conv2d_im2col), argnums=(0, 1))(x, w)
  want = jax.grad(inner_then_outer(conv2d_xla), argnums=(0, 1))(x, w)
  # Gradients reach several hundred here; the all-at-once im2col differs from
  # lax.conv by as much (float32 summation order).
  chex.assert_trees_all_close(got, want, rtol=2e-3, atol=1e-3)

  def attack_then_outer(conv):  # an input-gradient step (the kernel unperturbed), then d/dw
    def task(x, w):
      step = jax.grad(lambda x: jnp.sum(jnp.tanh(conv(x, w, stride)) ** 2))(x)
      return jnp.sum(jnp.sin(conv(x + 0.05 * step, w, stride)))
    return lambda x, w: jax.vmap(task)(x, w).sum()

  got = jax.grad(attack_then_outer(conv2d_im2col), argnums=1)(x, w)
  want = jax.grad(attack_then_outer(conv2d_xla), argnums=1)(x, w)
  chex.assert_trees_all_close(got, want, rtol=2e-3, atol=1e-3)


def test_image_chunked_im2col_computes_only_the_gradients_asked_for(monkeypatch):
  """An attack's input gradient skips the weight-gradient matmul, and vice versa."""
  _force_image_chunks(monkeypatch, 2, 8 * 8 * 9 * 4 * 4)
  x, w = jnp.ones((6, 8, 8, 4)), jnp.ones((3, 3, 4, 5))
  loss = lambda x, w: jnp.sum(jnp.sin(conv2d_im2col(x, w, 1)))
  forward = count_flops(lambda x, w: conv2d_im2col(x, w, 1), x, w)
  assert forward == 2 * 6 * 8 * 8 * 36 * 5
  assert count_flops(jax.grad(loss, argnums=0), x, w) == 2 * forward
  assert count_flops(jax.grad(loss, argnums=1), x, w) == 2 * forward
  assert count_flops(jax.grad(loss, argnums=(0, 1)), x, w) == 3 * forward


def test_image_chunks_for_large_stride_1_patches_per_core(monkeypatch):
  per_image = 14 * 14 * 576 * 4  # the max-pool Conv4's second layer
  monkeypatch.setattr(models, "_cpu_cores_per_device", lambda: 2)  # one device on two cores
  assert models._image_chunks(25, per_image) is None          # 11 MB: at once
  chunks, size = models._image_chunks(75, per_image)          # 34 MB: chunked
  assert (chunks, size) == (15, 5) and size * per_image <= 2 * models.PATCH_CHUNK_BYTES
  monkeypatch.setattr(models, "_cpu_cores_per_device", lambda: 1)  # one of two one-core devices
  assert models._image_chunks(25, per_image) == (6, 4)        # and one image at once
  assert models._image_chunks(75, per_image) == (25, 3)
  strided_per_image = 7 * 7 * 576 * 4  # the strided Conv4's second layer: never chunked
  assert models._image_chunks(500, strided_per_image, stride=2) is None
  w = jnp.ones((3, 3, 64, 64))  # 25 images at stride 1 and 100 at stride 2: 11 MB of patches each
  assert "scan" in str(jax.make_jaxpr(lambda x: conv2d_im2col(x, w, 1))(jnp.ones((25, 14, 14, 64))))
  assert "scan" not in str(jax.make_jaxpr(lambda x: conv2d_im2col(x, w, 2))(jnp.ones((100, 14, 14, 64))))


def test_cpu_cores_per_device_splits_the_cores_among_the_traced_devices():
  """Simulated CPU devices share the process's cores; the step tells the model how many
  devices it is split over (sharding.traced_for_devices; tests/test_sharding.py)."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  assert models._cpu_cores_per_device() == cores
  with sharding.traced_for_devices(2):
    assert models._cpu_cores_per_device() == max(1, cores // 2)
    with sharding.traced_for_devices(cores + 1):
      assert models._cpu_cores_per_device() == 1
    assert models._cpu_cores_per_device() == max(1, cores // 2)
  assert models._cpu_cores_per_device() == cores


@pytest.mark.parametrize("size", [28, 7, 6, 3])
def test_max_pool_matches_reduce_window(size):
  x = jax.random.normal(jax.random.key(size), (2, size, size, 3))
  ref = lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
  np.testing.assert_array_equal(max_pool_2x2(x), ref(x))
  np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(max_pool_2x2(x) ** 2))(x),
                             jax.grad(lambda x: jnp.sum(ref(x) ** 2))(x), rtol=1e-6)


def test_max_pool_ties_share_the_gradient_as_a_max_reduction_does_to_second_order():
  """Constant image regions tie exactly; the custom backward splits evenly, as the
  derivative of a max reduction does."""
  reduction = lambda x: x.reshape(x.shape[0], x.shape[1] // 2, 2, x.shape[2] // 2, 2,
                                  x.shape[3]).max(axis=(2, 4))
  x = jax.random.normal(jax.random.key(0), (2, 8, 6, 3))
  x = jnp.where(jnp.abs(x) < 0.6, 0.25, x)  # about half the entries equal: 2-, 3- and 4-way ties
  x = x.at[:, :2, :2, :].set(1.5)           # whole windows tied
  weight = jax.random.normal(jax.random.key(1), (2, 4, 3, 3))

  def inner_then_outer(pool):  # the gradient of a gradient, as second-order MAML takes it
    def loss(x, a):
      inner = jax.grad(lambda a: jnp.sum(jnp.sin(pool(x * a)) * weight))(a)
      return jnp.sum(jnp.cos(pool(x * (a - 0.3 * inner))) * weight)
    return lambda x: jax.grad(loss, argnums=(0, 1))(x, jnp.linspace(0.5, 1.5, 3))

  np.testing.assert_array_equal(max_pool_2x2(x), reduction(x))
  got = jax.grad(lambda x: jnp.sum(max_pool_2x2(x) * weight))(x)
  np.testing.assert_array_equal(got, jax.grad(lambda x: jnp.sum(reduction(x) * weight))(x))
  assert float(jnp.abs(got[:, :2, :2, :] - weight[:, :1, :1, :] / 4).max()) < 1e-7
  chex.assert_trees_all_close(inner_then_outer(max_pool_2x2)(x), inner_then_outer(reduction)(x),
                              rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant,size,feature_shape", [("strided", 28, (2, 2)), ("maxpool", 28, (1, 1)),
                                                        ("maxpool", 84, (5, 5))])
def test_conv4_shapes(variant, size, feature_shape):
  filters = 64 if variant == "strided" else 32
  model = make_model(5, (size, size, 1), filters=filters, variant=variant)
  params = model.init(jax.random.key(0))
  assert params["head"]["kernel"].shape == (feature_shape[0] * feature_shape[1] * filters, 5)
  assert jax.jit(model.apply)(params, jnp.zeros((7, size, size, 1))).shape == (7, 5)


def test_batch_stat_norm_closed_form_backward_matches_autodiff_to_second_order():
  """The custom VJP has the gradients of the plain formula, and their derivatives, under vmap."""
  def plain(x, scale, bias, epsilon):
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    return (x - mean) * lax.rsqrt(jnp.square(x - mean).mean(axes) + epsilon) * scale + bias

  x = jax.random.normal(jax.random.key(0), (2, 3, 5, 5, 4)) * 2.0 + 0.5  # (tasks, B, H, W, C)
  scale = jax.random.normal(jax.random.key(1), (2, 4))
  bias = jax.random.normal(jax.random.key(2), (2, 4))
  weight = jax.random.normal(jax.random.key(3), (3, 5, 5, 4))

  def inner_then_outer(norm):
    def task(x, scale, bias):
      # a: a per-channel gain before the norm, so the inner gradient also runs through dx.
      inner = lambda a, s, b: jnp.sum(jnp.tanh(norm(x * a, s, b, 1e-5)) * weight)
      a = jnp.linspace(0.5, 1.5, x.shape[-1])
      ga, gs, gb = jax.grad(inner, argnums=(0, 1, 2))(a, scale, bias)  # differentiated through
      fast = (a - 0.3 * ga, scale - 0.3 * gs, bias - 0.3 * gb)
      return jnp.sum(jnp.sin(norm(x * fast[0], fast[1], fast[2], 1e-5)) * weight)
    return lambda x, s, b: jax.vmap(task)(x, s, b).sum()

  np.testing.assert_allclose(models.batch_stat_norm(x[0], scale[0], bias[0], 1e-5),
                             plain(x[0], scale[0], bias[0], 1e-5), rtol=1e-5, atol=1e-5)
  got = jax.grad(inner_then_outer(models.batch_stat_norm), argnums=(0, 1, 2))(x, scale, bias)
  want = jax.grad(inner_then_outer(plain), argnums=(0, 1, 2))(x, scale, bias)
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-4)


def test_batch_norm_uses_batch_statistics():
  """MAML-style BN: a prediction depends on the other examples of its batch, not on running stats."""
  model = make_model(3, (8, 8, 1), filters=4)
  params = model.init(jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1))
  alone = model.apply(params, x[:2])
  with_others = model.apply(params, x)[:2]
  assert float(jnp.abs(alone - with_others).max()) > 1e-4


# Every impl's value and gradient is checked per convolution above; the whole
# second-order path only for the default (compiles of second-order steps are
# what make the suite slow on a CPU).
@pytest.mark.parametrize("variant, chunked", [("strided", False), ("maxpool", False),
                                              ("maxpool", True)])
def test_second_order_meta_gradient_same_as_lax_conv(monkeypatch, variant, chunked):
  """The whole vmapped second-order meta-gradient agrees between the fast path and lax.conv
  (chunked: every im2col layer over chunks of 2-3 of its 6 images)."""
  if chunked:
    _force_image_chunks(monkeypatch, 2, 8 * 8 * 9 * 12 * 4)  # conv1's patches per image
  tasks_x = jax.random.uniform(jax.random.key(0), (2, 6, 16, 16, 1))
  y = jnp.repeat(jnp.arange(3), 2)
  grads = []  # im2col, then the lax.conv reference
  for impl in ("im2col", "xla"):
    # 12 filters: conv0 takes the narrow-patches path (9 columns), conv1-3 the plain one.
    model = make_model(3, (16, 16, 1), filters=12, variant=variant, conv_impl=impl)
    learner = Learner(model.apply, inner_steps=2, inner_lr=0.4)
    meta = learner.init_meta_params(model.init(jax.random.key(1)))

    def meta_loss(m):
      def task_loss(x):
        fast = learner.adapt(m, x, y)
        return learner.loss(fast, x[::-1], y[::-1])[0]
      return jax.vmap(task_loss)(tasks_x).mean()
    grads.append(jax.jit(jax.grad(meta_loss))(meta))
  chex.assert_trees_all_close(grads[0], grads[1], rtol=2e-3, atol=2e-5)
