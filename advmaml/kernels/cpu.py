"""The CPU kernels: im2col convolution in image chunks, batch norm and max-pool derivatives by hand.

Numerically the reference kernels (``advmaml.kernels.reference``) to float32
rounding, written for XLA's CPU backend:

* convolutions (``conv_impl``): ``"im2col"`` (default), nine shifted strided
  slices concatenated into patches, then one matmul. When MAML vmaps per-task
  weights over tasks, XLA turns ``lax.conv`` into a grouped convolution, whose
  CPU backward pass is slow; the im2col form becomes a batched matmul instead,
  and its backward is matmuls plus pads. Large stride-1 layers run over chunks
  of images that fit the caches (``ChunkBudget``). ``"taps"`` and
  ``"winograd"``: one matmul per kernel tap, and Winograd F(2x2, 3x3); both
  measured slower than im2col on CPU and kept to reproduce
  ``docs/benchmark_notes.md`` (sections 5, 7 and 10). ``"xla"``: ``lax.conv``.
* batch norm and max-pool with hand-written derivatives that save passes over
  the activations.

The im2col matmuls and batch norm are ``custom_vjp``: reverse mode to any order
(MAML's second order), but no forward mode (``jax.jvp``, ``jax.jacfwd``,
``jax.hessian``). The max-pool is a ``custom_jvp`` (both modes; its transpose
compiled to the same training step). The reference kernels have every
transformation.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from advmaml.kernels import reference

CONV_IMPLS = ("im2col", "taps", "winograd", "xla")


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TF/'SAME' padding (low, high) for one spatial axis."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def _pad_same(x: jax.Array, kh: int, kw: int, stride: int) -> tuple[jax.Array, int, int]:
  """'SAME'-padded x (B, H+p, W+q, C) and the output size (ceil(H/stride), ceil(W/stride))."""
  _, h, w, _ = x.shape
  (pt, pb), (pl, pr) = _same_padding(h, kh, stride), _same_padding(w, kw, stride)
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  return xp, -(-h // stride), -(-w // stride)


@jax.custom_vjp
def _narrow_patches_matmul(patches: jax.Array, weights: jax.Array) -> jax.Array:
  """patches @ weights for patches with fewer columns than outputs (K < O).

  patches: (..., K), weights: (K, O) -> (..., O). Same values and gradients as
  ``@``; only the weight gradient's operand order differs. JAX's transpose of
  ``@`` writes it as g^T @ patches, which XLA's CPU backend runs by transposing
  the output gradient g (..., O), through a loop fused with batch norm's
  backward that reads g at an O-float stride; patches^T @ g transposes the
  O/K times smaller patches instead.
  """
  return patches @ weights


def _narrow_patches_matmul_fwd(patches, weights):
  return patches @ weights, (patches, weights)


def _patches_weight_gradient(patches: jax.Array, g: jax.Array) -> jax.Array:
  """(K, O) = patches^T g over all position axes. patches: (..., K), g: (..., O).

  Written so that XLA's CPU backend transposes the narrower operand: patches-first
  when K < O (see ``_narrow_patches_matmul``), g-first (autodiff's order) otherwise,
  where patches-first made XLA transpose the K-column patches instead.
  """
  positions = tuple(range(g.ndim - 1))
  if patches.shape[-1] < g.shape[-1]:
    return jnp.tensordot(patches, g, axes=(positions, positions))
  return jnp.tensordot(g, patches, axes=(positions, positions)).T


def _narrow_patches_matmul_bwd(residuals, g):
  patches, weights = residuals
  return g @ weights.T, _patches_weight_gradient(patches, g)


_narrow_patches_matmul.defvjp(_narrow_patches_matmul_fwd, _narrow_patches_matmul_bwd)


def _im2col_patches(x: jax.Array, kh: int, kw: int, stride: int) -> jax.Array:
  """'SAME' patches of x (B, H, W, C): (B, ceil(H/stride), ceil(W/stride), kh * kw * C)."""
  xp, ho, wo = _pad_same(x, kh, kw, stride)
  # Patch channel order (di, dj, c) matches kernel.reshape(kh * kw * cin, cout).
  return jnp.concatenate([
      xp[:, di:di + (ho - 1) * stride + 1:stride, dj:dj + (wo - 1) * stride + 1:stride, :]
      for di in range(kh) for dj in range(kw)], axis=-1)


def _conv2d_im2col_at_once(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """``conv2d_im2col`` with all images' patches built at once."""
  kh, kw, cin, cout = kernel.shape
  patches = _im2col_patches(x, kh, kw, stride)
  weights = kernel.reshape(kh * kw * cin, cout)
  if kh * kw * cin < cout:
    return _narrow_patches_matmul(patches, weights)
  return patches @ weights


# A stride-1 layer whose im2col patches would exceed PATCH_CHUNK_THRESHOLD_BYTES
# per core of its device runs over chunks of images of about PATCH_CHUNK_BYTES
# of patches per core each, and its backward pass rebuilds each chunk's patches
# instead of keeping them all. Past some MB per core the patches, their
# cotangent and the matmuls' operands no longer stay in the caches: the Conv4's
# second layer on 75 query images (34 MB of patches) took 39.5 ms forward and
# backward at once, 27.2 ms in chunks (benchmarks/conv_variants.py --images=75).
# Per core, because a device with one core has half the cache of one with two:
# on two one-core devices chunking B1's 25 query images (11 MB) sped B1 up
# 6-12%, on one two-core device it slowed B1 down. Stride-2 layers stay whole:
# chunked, they were slower at every budget tried (docs/benchmark_notes.md,
# sections 17 and 18).
PATCH_CHUNK_THRESHOLD_BYTES = 8 * 2**20
PATCH_CHUNK_BYTES = 2 * 2**20


@dataclasses.dataclass(frozen=True)
class ChunkBudget:
  """When and how finely ``conv2d_im2col`` chunks a layer's images, for one device.

  Fixed when the model is built (``for_cores``), so the compiled program does not
  depend on anything read while tracing. Tests pass tiny budgets to force chunks.
  """
  threshold_bytes: int          # a layer with more patch bytes than this runs in chunks
  chunk_bytes: int              # of about this many patch bytes each
  strides: tuple[int, ...] = (1,)

  @classmethod
  def for_cores(cls, cores_per_device: int) -> "ChunkBudget":
    """The measured per-core budgets for a device with ``cores_per_device`` cores."""
    cores = max(1, cores_per_device)
    return cls(PATCH_CHUNK_THRESHOLD_BYTES * cores, PATCH_CHUNK_BYTES * cores)


def _image_chunks(num_images: int, patch_bytes_per_image: int, stride: int,
                  budget: ChunkBudget | None) -> tuple[int, int] | None:
  """(number of chunks, images per chunk) for a chunked im2col, or None for all at once.

  Takes the fewest chunks within the byte budget, or, where up to twice as many
  divide the images evenly, that count instead (no leftover images to handle apart).
  """
  if budget is None or stride not in budget.strides:
    return None
  total = num_images * patch_bytes_per_image
  if total <= budget.threshold_bytes:
    return None
  fewest = min(-(-total // budget.chunk_bytes), num_images)
  chunks = next((n for n in range(fewest, min(2 * fewest, num_images) + 1)
                 if num_images % n == 0), fewest)
  return chunks, num_images // chunks


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv2d_im2col_chunked(x: jax.Array, kernel: jax.Array, stride: int,
                           chunks: int) -> jax.Array:
  """``conv2d_im2col`` over ``chunks`` equal chunks of x's images (B divisible by chunks).

  Values and gradients equal the all-at-once form; the backward pass rebuilds
  each chunk's patches, so only x is kept for it.
  """
  b = x.shape[0]
  out = lax.map(lambda xc: _conv2d_im2col_at_once(xc, kernel, stride),
                x.reshape(chunks, b // chunks, *x.shape[1:]))
  return out.reshape(b, *out.shape[2:])


def _conv2d_im2col_chunked_fwd(x, kernel, stride, chunks):
  # symbolic_zeros: x and kernel arrive as CustomVJPPrimal. An attack's input
  # gradient does not perturb the kernel, so its backward skips the weight gradient.
  out = _conv2d_im2col_chunked(x.value, kernel.value, stride, chunks)
  return out, (x.value, kernel.value, x.perturbed, kernel.perturbed)


def _conv2d_im2col_chunked_bwd(stride, chunks, residuals, g):
  x, kernel, need_x, need_kernel = residuals
  if isinstance(g, jax.custom_derivatives.SymbolicZero):
    return None, None
  kh, kw, cin, cout = kernel.shape
  weights = kernel.reshape(kh * kw * cin, cout)
  per_chunk = lambda t: t.reshape(chunks, t.shape[0] // chunks, *t.shape[1:])

  def one_chunk(grad_kernel, chunk):  # xc: (b, H, W, C), gc: (b, H', W', O)
    xc, gc = chunk
    patches, patches_vjp = jax.vjp(lambda xc: _im2col_patches(xc, kh, kw, stride), xc)
    grad_xc = patches_vjp(gc @ weights.T)[0] if need_x else None  # col2im of dpatches
    if need_kernel:  # the order matters: the wrong one lost the chunks' gain
      grad_kernel = grad_kernel + _patches_weight_gradient(patches, gc).reshape(kernel.shape)
    return grad_kernel, grad_xc

  grad_kernel, grad_x = lax.scan(one_chunk, jnp.zeros_like(kernel) if need_kernel else None,
                                 (per_chunk(x), per_chunk(g)))
  return (grad_x.reshape(x.shape) if need_x else None), grad_kernel


_conv2d_im2col_chunked.defvjp(_conv2d_im2col_chunked_fwd, _conv2d_im2col_chunked_bwd,
                              symbolic_zeros=True)


def conv2d_im2col(x: jax.Array, kernel: jax.Array, stride: int,
                  budget: ChunkBudget | None = None) -> jax.Array:
  """Same result as ``reference.conv2d``, computed as patches @ kernel.

  x: (B, H, W, C), kernel: (kh, kw, C, O) -> (B, ceil(H/stride), ceil(W/stride), O).
  Layers larger than ``budget`` allows run over chunks of images (None: never).
  """
  kh, kw, cin, _ = kernel.shape
  b, h, w, _ = x.shape
  plan = _image_chunks(b, -(-h // stride) * -(-w // stride) * kh * kw * cin * x.dtype.itemsize,
                       stride, budget)
  if plan is None:
    return _conv2d_im2col_at_once(x, kernel, stride)
  chunks, size = plan
  head = chunks * size
  out = _conv2d_im2col_chunked(x[:head], kernel, stride, chunks)
  if head == b:
    return out
  # The few images left over (fewer than the number of chunks) go at once.
  return jnp.concatenate([out, _conv2d_im2col_at_once(x[head:], kernel, stride)])


def conv2d_taps(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """Same result as ``reference.conv2d``, as a sum of one matmul per kernel tap.

  Unlike im2col it never materialises the (kh * kw)-times larger patch tensor,
  which dominates memory traffic for stride-1 convolutions on large images.
  x: (B, H, W, C), kernel: (kh, kw, C, O) -> (B, ceil(H/stride), ceil(W/stride), O).
  """
  kh, kw, _, _ = kernel.shape
  xp, ho, wo = _pad_same(x, kh, kw, stride)
  out = None
  for di in range(kh):
    for dj in range(kw):
      tap = xp[:, di:di + (ho - 1) * stride + 1:stride, dj:dj + (wo - 1) * stride + 1:stride, :]
      term = tap @ kernel[di, dj]
      out = term if out is None else out + term
  return out


# Winograd F(2x2, 3x3) (Lavin & Gray 2016): output tile Y = A^T [(G g G^T) * (B^T d B)] A
# for a 4x4 input tile d and a 3x3 kernel g; 16 multiplies per output tile and
# channel pair instead of 36.
_WINO_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_WINO_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
_WINO_AT = ((1, 1, 1, 0), (0, 1, -1, -1))


def _signed_sum(terms, coeffs):
  """sum_i coeffs[i] * terms[i] for coefficients in {-1, 0, 1}, without multiplies."""
  out = None
  for t, c in zip(terms, coeffs):
    if c == 0:
      continue
    out = (t if c > 0 else -t) if out is None else (out + t if c > 0 else out - t)
  return out


def conv2d_winograd(x: jax.Array, kernel: jax.Array, stride: int,
                    budget: ChunkBudget | None = None) -> jax.Array:
  """Same result as ``reference.conv2d`` (to float32 rounding): Winograd F(2x2, 3x3).

  For stride-1 3x3 convolutions: 2.25x fewer multiplies than im2col, as 16
  batched (tiles x C) @ (C x O) matmuls, and a transformed input 16/9 the size
  of the activations per 4 outputs instead of im2col's 9x patches. Other
  strides or kernel sizes fall back to ``conv2d_im2col``.
  x: (B, H, W, C), kernel: (3, 3, C, O) -> (B, H, W, O).
  """
  kh, kw, cin, cout = kernel.shape
  if stride != 1 or (kh, kw) != (3, 3):
    return conv2d_im2col(x, kernel, stride, budget)
  b, h, w, _ = x.shape
  th, tw = -(-h // 2), -(-w // 2)
  # 'SAME' pads 1 on each side; pad the high side further to whole 2x2 output tiles.
  xp = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - w), (0, 0)))
  # d[u][v]: (B, th, tw, C), element (u, v) of every 4x4 input tile (stride-2 windows).
  d = [[xp[:, u:u + 2 * th - 1:2, v:v + 2 * tw - 1:2, :] for v in range(4)] for u in range(4)]
  rows = [[_signed_sum([d[u][v] for u in range(4)], _WINO_BT[a]) for v in range(4)] for a in range(4)]
  tiles = jnp.stack([_signed_sum(rows[a], _WINO_BT[c]) for a in range(4) for c in range(4)])
  g = jnp.asarray(_WINO_G, kernel.dtype)
  u_kernel = jnp.einsum("ai,ijco,bj->abco", g, kernel, g).reshape(16, cin, cout)
  m = jnp.einsum("kbhwc,kco->kbhwo", tiles, u_kernel).reshape(4, 4, b, th, tw, cout)
  out_rows = [[_signed_sum([m[a, c] for a in range(4)], _WINO_AT[p]) for c in range(4)] for p in range(2)]
  y = [[_signed_sum(out_rows[p], _WINO_AT[q]) for q in range(2)] for p in range(2)]
  # Interleave the four (B, th, tw, O) outputs into (B, 2 th, 2 tw, O), then crop.
  y = jnp.stack([jnp.stack(y[p], axis=3) for p in range(2)], axis=2)
  return y.reshape(b, 2 * th, 2 * tw, cout)[:, :h, :w, :]


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool, stride 2, 'VALID' (odd sizes are floored). (B, H, W, C) -> (B, H//2, W//2, C).

  The maximum of the four strided slices, elementwise, with the derivative
  of ``_max_pool_2x2_even``: XLA fuses both into the ops around them, where a
  max reduction and its derivative are separate passes over the activations.
  """
  _, h, w, _ = x.shape
  return _max_pool_2x2_even(x[:, :h // 2 * 2, :w // 2 * 2, :])


def _window_corners(x: jax.Array) -> tuple[jax.Array, ...]:
  """The four (B, H/2, W/2, C) strided slices of x (B, H, W, C), H and W even."""
  return tuple(x[:, i::2, j::2, :] for i in (0, 1) for j in (0, 1))


@jax.custom_jvp
def _max_pool_2x2_even(x: jax.Array) -> jax.Array:
  """``max_pool_2x2`` for even H and W; derivatives equal those of a max reduction.

  Tied maxima share the tangent (and so the gradient) evenly, as differentiating
  ``jnp.max`` over the window does (constant image regions tie exactly). A
  custom JVP, so forward mode works too; JAX's transpose of it, the backward
  pass, compiles to the same program as the custom VJP it replaced
  (docs/benchmark_notes.md, section 19).
  """
  a, b, c, d = _window_corners(x)
  return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


@_max_pool_2x2_even.defjvp
def _max_pool_2x2_even_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  corners = _window_corners(x)
  # Which corners are maxima, from comparisons among the corners alone: never
  # against y, which XLA may compute in another fusion, rounded differently,
  # so that no corner would equal it (the reference max-pool's old failure).
  at_max = [functools.reduce(jnp.logical_and, [c >= o for o in corners if o is not c])
            for c in corners]
  ties = sum(m.astype(x.dtype) for m in at_max)  # >= 1: the largest corner is >= the others
  picked = sum(jnp.where(m, tc, 0) for m, tc in zip(at_max, _window_corners(t)))
  return _max_pool_2x2_even(x), picked / ties


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_stat_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
  """(x - mean) / sqrt(var + epsilon) * scale + bias over all axes but the last.

  x: (..., C), scale and bias: (C,) -> (..., C). The backward pass is the
  closed form dx = scale / sqrt(var + eps) * (g - mean(g) - xhat * mean(g * xhat)),
  which needs only the two reductions the scale and bias gradients take anyway;
  differentiating the forward would add two more passes over x for the mean's
  and the variance's paths.
  """
  return _batch_stat_norm_fwd(x, scale, bias, epsilon)[0]


def _batch_stat_norm_fwd(x, scale, bias, epsilon):
  axes = tuple(range(x.ndim - 1))
  mean = x.mean(axes)
  centred = x - mean
  inv_std = lax.rsqrt(jnp.square(centred).mean(axes) + epsilon)
  normed = centred * inv_std
  return normed * scale + bias, (normed, inv_std, scale)


def _batch_stat_norm_bwd(epsilon, residuals, g):
  del epsilon
  normed, inv_std, scale = residuals
  axes = tuple(range(g.ndim - 1))
  count = math.prod(g.shape[:-1])
  grad_bias = g.sum(axes)
  grad_scale = (g * normed).sum(axes)
  grad_x = (scale * inv_std) * (g - (grad_bias + normed * grad_scale) / count)
  return grad_x, grad_scale, grad_bias


batch_stat_norm.defvjp(_batch_stat_norm_fwd, _batch_stat_norm_bwd)


@dataclasses.dataclass(frozen=True)
class CpuKernels:
  """The kernel set for XLA's CPU backend (hashable: a flax module attribute)."""
  conv_impl: str = "im2col"
  budget: ChunkBudget | None = None  # None: no layer is chunked

  def __post_init__(self):
    if self.conv_impl not in CONV_IMPLS:
      raise ValueError(f"unknown conv_impl {self.conv_impl!r}; choose one of {CONV_IMPLS}")

  def conv(self, x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """'SAME' convolution (3x3; ResNet-12's shortcuts 1x1). x: (B, H, W, C), kernel: (kh, kw, C, O) -> (B, H', W', O)."""
    if self.conv_impl == "im2col":
      return conv2d_im2col(x, kernel, stride, self.budget)
    if self.conv_impl == "winograd":
      return conv2d_winograd(x, kernel, stride, self.budget)
    if self.conv_impl == "taps":
      return conv2d_taps(x, kernel, stride)
    return reference.conv2d(x, kernel, stride)

  def batch_norm(self, x, scale, bias, epsilon):
    return batch_stat_norm(x, scale, bias, epsilon)

  def max_pool(self, x):
    return max_pool_2x2(x)
