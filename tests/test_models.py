"""The CPU kernels (convolutions, pooling, batch norm) agree with the reference ones, values and gradients."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.flatten_util import ravel_pytree

from advmaml.runtime import host
from conftest import assert_leaves_close_to_scale
from advmaml.bench.flops import count_flops
from advmaml.kernels import (ChunkBudget, CpuKernels, ReferenceKernels, cpu, make_kernels,
                             reference, resolve)
from advmaml.kernels.cpu import conv2d_im2col, conv2d_taps, conv2d_winograd, max_pool_2x2
from advmaml.kernels.reference import conv2d as conv2d_xla
from advmaml.models import make_model


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

  got = jax.grad(inner_then_outer(cpu._narrow_patches_matmul), argnums=(0, 1))(patches, weights)
  want = jax.grad(inner_then_outer(jnp.matmul), argnums=(0, 1))(patches, weights)
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-4)


def forced_chunks(images_per_chunk, patch_bytes_per_image) -> ChunkBudget:
  """A budget that chunks any layer (any stride: the chunked path handles them), so many images a chunk."""
  return ChunkBudget(0, images_per_chunk * patch_bytes_per_image, strides=(1, 2))


@pytest.mark.parametrize("images, budget, plan", [(6, 2, (3, 2)),   # 3 even chunks
                                                  (7, 3, (3, 2))])  # 3 chunks + 1 image apart
@pytest.mark.parametrize("stride", [1, 2])
def test_image_chunked_im2col_matches_xla_to_second_order(images, budget, plan, stride):
  """Chunks of images (patches rebuilt in the backward) give lax.conv's values, gradients
  and gradients of an inner SGD step's gradient (MAML's second order), under vmap."""
  size, cin, cout = 9, 4, 6
  out = -(-size // stride)
  budget = forced_chunks(budget, out * out * 9 * cin * 4)
  assert cpu._image_chunks(images, out * out * 9 * cin * 4, stride, budget) == plan
  im2col = lambda x, w, stride: conv2d_im2col(x, w, stride, budget)
  x = jax.random.normal(jax.random.key(0), (2, images, size, size, cin))   # (tasks, B, H, W, C)
  w = jax.random.normal(jax.random.key(1), (2, 3, 3, cin, cout)) * 0.3
  jaxpr = str(jax.make_jaxpr(lambda x, w: im2col(x, w, stride))(x[0], w[0]))
  assert "scan" in jaxpr and "custom_vjp" in jaxpr  # the chunked path, not the plain one
  np.testing.assert_allclose(jax.vmap(lambda x, w: im2col(x, w, stride))(x, w),
                             jax.vmap(lambda x, w: conv2d_xla(x, w, stride))(x, w),
                             rtol=1e-5, atol=1e-5)

  def inner_then_outer(conv):
    def task(x, w):
      inner = lambda w: jnp.sum(jnp.tanh(conv(x, w, stride)) ** 2)
      fast = w - 0.1 * jax.grad(inner)(w)
      return jnp.sum(jnp.sin(conv(x[::-1], fast, stride)))
    return lambda x, w: jax.vmap(task)(x, w).sum()

  got = jax.grad(inner_then_outer(im2col), argnums=(0, 1))(x, w)
  want = jax.grad(inner_then_outer(conv2d_xla), argnums=(0, 1))(x, w)
  # Gradients reach several hundred here; summation order moves a small entry by up
  # to 6.2e-6 of that scale (measured on the 4 cases).
  assert_leaves_close_to_scale(got, want, rel=2e-5)

  def attack_then_outer(conv):  # an input-gradient step (the kernel unperturbed), then d/dw
    def task(x, w):
      step = jax.grad(lambda x: jnp.sum(jnp.tanh(conv(x, w, stride)) ** 2))(x)
      return jnp.sum(jnp.sin(conv(x + 0.05 * step, w, stride)))
    return lambda x, w: jax.vmap(task)(x, w).sum()

  got = jax.grad(attack_then_outer(im2col), argnums=1)(x, w)
  want = jax.grad(attack_then_outer(conv2d_xla), argnums=1)(x, w)
  assert_leaves_close_to_scale(got, want, rel=2e-5)


def test_image_chunked_im2col_computes_only_the_gradients_asked_for():
  """An attack's input gradient skips the weight-gradient matmul, and vice versa."""
  budget = forced_chunks(2, 8 * 8 * 9 * 4 * 4)
  x, w = jnp.ones((6, 8, 8, 4)), jnp.ones((3, 3, 4, 5))
  loss = lambda x, w: jnp.sum(jnp.sin(conv2d_im2col(x, w, 1, budget)))
  forward = count_flops(lambda x, w: conv2d_im2col(x, w, 1, budget), x, w)
  assert forward == 2 * 6 * 8 * 8 * 36 * 5
  assert count_flops(jax.grad(loss, argnums=0), x, w) == 2 * forward
  assert count_flops(jax.grad(loss, argnums=1), x, w) == 2 * forward
  assert count_flops(jax.grad(loss, argnums=(0, 1)), x, w) == 3 * forward


def test_image_chunks_for_large_stride_1_patches_per_core():
  per_image = 14 * 14 * 576 * 4  # the max-pool Conv4's second layer
  two_cores, one_core = ChunkBudget.for_cores(2), ChunkBudget.for_cores(1)
  assert cpu._image_chunks(25, per_image, 1, two_cores) is None       # 11 MB: at once
  chunks, size = cpu._image_chunks(75, per_image, 1, two_cores)       # 34 MB: chunked
  assert (chunks, size) == (15, 5) and size * per_image <= 2 * cpu.PATCH_CHUNK_BYTES
  assert cpu._image_chunks(25, per_image, 1, one_core) == (6, 4)      # and one image at once
  assert cpu._image_chunks(75, per_image, 1, one_core) == (25, 3)
  strided_per_image = 7 * 7 * 576 * 4  # the strided Conv4's second layer: never chunked
  assert cpu._image_chunks(500, strided_per_image, 2, one_core) is None
  assert cpu._image_chunks(500, per_image, 1, None) is None           # no budget: never
  w = jnp.ones((3, 3, 64, 64))  # 25 images at stride 1 and 100 at stride 2: 11 MB of patches each
  conv = lambda stride: lambda x: conv2d_im2col(x, w, stride, one_core)
  assert "scan" in str(jax.make_jaxpr(conv(1))(jnp.ones((25, 14, 14, 64))))
  assert "scan" not in str(jax.make_jaxpr(conv(2))(jnp.ones((100, 14, 14, 64))))


def test_chunk_budget_is_fixed_when_the_kernels_are_built():
  """Each device's share of the usable cores, from the device count the step is split over."""
  cores = host.usable_cores()
  assert host.cores_per_device(1) == cores
  assert host.cores_per_device(2) == max(1, cores // 2)
  assert host.cores_per_device(cores + 1) == 1
  assert make_kernels("cpu", cores_per_device=3).budget == ChunkBudget.for_cores(3)
  assert make_kernels("cpu").budget == ChunkBudget.for_cores(cores)
  assert ChunkBudget.for_cores(3).threshold_bytes == 3 * cpu.PATCH_CHUNK_THRESHOLD_BYTES
  assert resolve("auto", "cpu") == "cpu"
  assert resolve("auto", "gpu") == resolve("auto", "tpu") == "reference"
  here = CpuKernels if jax.default_backend() == "cpu" else ReferenceKernels
  assert isinstance(make_kernels("auto"), here)  # resolved when built, from the default backend
  assert isinstance(make_kernels("reference", conv_impl="taps"), ReferenceKernels)
  with pytest.raises(ValueError, match="kernels"):
    resolve("fast")


@pytest.mark.parametrize("size", [28, 7, 6, 3])
def test_max_pool_matches_reduce_window(size):
  x = jax.random.normal(jax.random.key(size), (2, size, size, 3))
  ref = lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
  np.testing.assert_array_equal(max_pool_2x2(x), ref(x))
  np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(max_pool_2x2(x) ** 2))(x),
                             jax.grad(lambda x: jnp.sum(ref(x) ** 2))(x), rtol=1e-6)


def test_max_pool_ties_share_the_gradient_as_a_max_reduction_does_to_second_order():
  """Constant image regions tie exactly; the custom JVP splits evenly, as the
  derivative of a max reduction does, in forward and reverse mode."""
  def reduction(x):  # a max reduction over each window: jnp.max's derivative splits ties
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))

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
  tangent = jax.random.normal(jax.random.key(2), x.shape)  # a custom JVP: forward mode works
  np.testing.assert_allclose(jax.jvp(max_pool_2x2, (x,), (tangent,))[1],
                             jax.jvp(reduction, (x,), (tangent,))[1], rtol=1e-6, atol=1e-7)
  got = jax.grad(lambda x: jnp.sum(max_pool_2x2(x) * weight))(x)
  np.testing.assert_array_equal(got, jax.grad(lambda x: jnp.sum(reduction(x) * weight))(x))
  assert float(jnp.abs(got[:, :2, :2, :] - weight[:, :1, :1, :] / 4).max()) < 1e-7
  chex.assert_trees_all_close(inner_then_outer(max_pool_2x2)(x), inner_then_outer(reduction)(x),
                              rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pool", [max_pool_2x2, reference.max_pool_2x2], ids=["cpu", "reference"])
def test_max_pool_gradient_under_jit_through_two_normalised_residual_blocks(x64, pool):
  """Regression: a max *reduction*'s derivative tests x == max(x), and XLA:CPU
  recomputed x (a sum of two batch-normed convolutions) in several fusions,
  rounded differently, so windows matched no element and lost their gradient:
  O(1) errors in float64 under jit, right op by op. Both max-pools now pass."""
  keys = jax.random.split(jax.random.key(0), 5)
  widths = [(1, 4), (4, 6)]
  params = [(jax.random.normal(k1, (1, 1, i, o)) * 0.5, jax.random.normal(k2, (3, 3, i, o)) * 0.3)
            for (i, o), k1, k2 in zip(widths, keys[:2], keys[2:4])]
  x = jax.random.uniform(keys[4], (6, 16, 16, 1), jnp.float64)
  norm = lambda h: reference.batch_stat_norm(h, jnp.ones(h.shape[-1]), jnp.zeros(h.shape[-1]), 1e-5)

  def loss(params, x):
    for shortcut, kernel in params:
      x = pool(norm(reference.conv2d(x, shortcut, 1)) + norm(reference.conv2d(x, kernel, 1)))
    return jnp.sum(jnp.sin(x.mean(axis=(1, 2))))

  flat, unravel = ravel_pytree(params)
  v = jax.random.normal(jax.random.key(5), flat.shape)
  h = 1e-6
  fd = (loss(unravel(flat + h * v), x) - loss(unravel(flat - h * v), x)) / (2 * h)
  jitted = ravel_pytree(jax.jit(jax.grad(loss))(params, x))[0]
  captured = ravel_pytree(jax.jit(lambda x: jax.grad(loss)(params, x))(x))[0]
  np.testing.assert_allclose(float(jitted @ v), float(fd), rtol=1e-6)
  np.testing.assert_allclose(captured, jitted, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("variant,size,feature_shape", [("conv4", 28, (2, 2)), ("conv4_maxpool", 28, (1, 1)),
                                                        ("conv4_maxpool", 84, (5, 5))])
def test_conv4_shapes(variant, size, feature_shape):
  filters = 64 if variant == "conv4" else 32
  model = make_model(5, (size, size, 1), filters=filters, model=variant)
  params = model.init(jax.random.key(0))
  assert params["head"]["kernel"].shape == (feature_shape[0] * feature_shape[1] * filters, 5)
  assert jax.jit(model.apply)(params, jnp.zeros((7, size, size, 1))).shape == (7, 5)


def test_batch_stat_norm_closed_form_backward_matches_autodiff_to_second_order():
  """The custom VJP has the gradients of the plain formula, and their derivatives, under vmap."""
  plain = reference.batch_stat_norm

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

  np.testing.assert_allclose(cpu.batch_stat_norm(x[0], scale[0], bias[0], 1e-5),
                             plain(x[0], scale[0], bias[0], 1e-5), rtol=1e-5, atol=1e-5)
  got = jax.grad(inner_then_outer(cpu.batch_stat_norm), argnums=(0, 1, 2))(x, scale, bias)
  want = jax.grad(inner_then_outer(plain), argnums=(0, 1, 2))(x, scale, bias)
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-4)
