r"""Ways to write the max-pool Conv4's costliest convolution, timed one by one.

  python benchmarks/conv_variants.py > results/benchmarks/conv-variants-epyc.txt
  python benchmarks/conv_variants.py --images=75 > results/benchmarks/conv-variants-75-xeon.txt

The second layer of the max-pool Conv4 on one task's 25 query images
(x: 25 x 14 x 14 x 64, kernel 3 x 3 x 64 x 64, stride 1, 'SAME'), the op that
carries most of a B1/B3 step's matmul time (``--images=75``: B2's and B4's
query sets). The library's ``conv2d_im2col`` runs over chunks of images once
the patches pass ``kernels.cpu.PATCH_CHUNK_THRESHOLD_BYTES`` per core of the device
(8 MiB: on one device of two cores, as here, more than 37 images; on each
of two simulated one-core devices, in a split step, more than 18); the row "im2col at once" is the
same without chunks. For each formulation it prints
milliseconds (best of 3 runs of 50 calls) for building the patches alone, the
forward, the forward plus the input gradient (what one PGD step needs) and
the forward plus both gradients (what a training step needs), and checks the
forward against ``lax.conv``. Beside them: the bare matmul and an elementwise
pass over a patch-sized array (the memory-speed floor for writing patches).
"""

import argparse
import time

import jax
import jax.numpy as jnp
from jax import lax

from advmaml.kernels import cpu, make_kernels

B, H, C, O = 25, 14, 64, 64  # B: --images


def best_ms(fn, *args, calls=50):
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  runs = []
  for _ in range(3):
    t0 = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    runs.append((time.perf_counter() - t0) / calls * 1e3)
  return min(runs)


def pad_nhwc(x):
  return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))


def patches_concat(x):
  """The library's im2col: 9 shifted slices concatenated on the channel axis."""
  xp = pad_nhwc(x)
  return jnp.concatenate([xp[:, i:i + H, j:j + H, :] for i in range(3) for j in range(3)], -1)


def patches_two_stage(x):
  """The 3 column shifts first, then the 3 row shifts of that."""
  xp = pad_nhwc(x)
  cols = jnp.concatenate([xp[:, :, j:j + H, :] for j in range(3)], -1)
  return jnp.concatenate([cols[:, i:i + H] for i in range(3)], -1)


def conv_of(patches_fn):
  return lambda x, k: patches_fn(x) @ k.reshape(9 * C, O)


def conv_stack_taps(x, k):
  """Taps stacked on a leading axis, one einsum over (tap, channel)."""
  xp = pad_nhwc(x)
  taps = jnp.stack([xp[:, i:i + H, j:j + H, :] for i in range(3) for j in range(3)], 0)
  return jnp.einsum("tbhwc,tco->bhwo", taps, k.reshape(9, C, O))


def conv_output_side(x, k):
  """One matmul to all 9 taps' outputs, then a sum of 9 shifted slices of it."""
  xp = pad_nhwc(x)
  z = (xp @ k.transpose(2, 0, 1, 3).reshape(C, 9 * O)).reshape(B, H + 2, H + 2, 9, O)
  return sum(z[:, i:i + H, j:j + H, 3 * i + j, :] for i in range(3) for j in range(3))


def conv_channel_major(x, k):
  """im2col in a (C, B, H, W) layout: taps stacked on the leading axis, so the
  patch matrix (9C, B*H*W) needs no interleaving; the network would have to
  keep this layout throughout (x here arrives already transposed)."""
  xp = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
  taps = jnp.stack([xp[:, :, i:i + H, j:j + H] for i in range(3) for j in range(3)], 0)
  return (k.reshape(9 * C, O).T @ taps.reshape(9 * C, -1)).reshape(O, B, H, H)


def main():
  global B
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--images", type=int, default=B, help="images through the layer")
  B = parser.parse_args().images
  library = make_kernels("cpu")  # one device with every usable core, as before
  x = jax.random.normal(jax.random.key(0), (B, H, H, C))
  k = jax.random.normal(jax.random.key(1), (3, 3, C, O)) * 0.05
  ref = lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  x_cm = jnp.transpose(x, (3, 0, 1, 2))
  to_nhwc = {"channel-major": lambda y: jnp.transpose(y, (1, 2, 3, 0))}
  variants = [
      ("im2col concat", conv_of(patches_concat), patches_concat, x),
      ("im2col at once (library)", lambda x, k: cpu._conv2d_im2col_at_once(x, k, 1), None, x),
      ("conv2d_im2col (library)", lambda x, k: library.conv(x, k, 1), None, x),
      ("im2col two-stage concat", conv_of(patches_two_stage), patches_two_stage, x),
      ("stacked taps + einsum", conv_stack_taps, None, x),
      ("output-side taps", conv_output_side, None, x),
      ("channel-major", conv_channel_major, None, x_cm),
      ("lax.conv", lambda x, k: lax.conv_general_dilated(
          x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")), None, x),
  ]
  print(f"layer: x {B}x{H}x{H}x{C}, kernel 3x3x{C}x{O}; ms, best of 3 x 50 calls; "
        f"{jax.devices()[0].device_kind}")
  print(f"{'variant':<26} {'max|err|':>9} {'patches':>8} {'fwd':>7} {'fwd+dx':>7} {'fwd+dx+dw':>10}")
  for name, conv, patches_fn, xin in variants:
    out = jax.jit(conv)(xin, k)
    err = float(jnp.abs(to_nhwc.get(name.split(" ")[0], lambda y: y)(out) - ref).max())
    loss = lambda x, k, conv=conv: jnp.sum(conv(x, k) ** 2)
    patches = f"{best_ms(patches_fn, xin):8.2f}" if patches_fn else f"{'-':>8}"
    print(f"{name:<26} {err:9.1e} {patches} {best_ms(conv, xin, k):7.2f} "
          f"{best_ms(jax.grad(loss), xin, k):7.2f} {best_ms(jax.grad(loss, (0, 1)), xin, k):10.2f}")
  p = jax.random.normal(jax.random.key(2), (B * H * H, 9 * C))
  dy = jax.random.normal(jax.random.key(3), (B * H * H, O))
  kmat = k.reshape(9 * C, O)
  print(f"matmul only: forward P @ W {best_ms(lambda p, w: p @ w, p, kmat):.2f}, "
        f"weight gradient P^T @ dY {best_ms(lambda p, d: p.T @ d, p, dy):.2f}, "
        f"(dY^T @ P)^T {best_ms(lambda p, d: (d.T @ p).T, p, dy):.2f}, "
        f"input gradient dY @ W^T {best_ms(lambda d, w: d @ w.T, dy, kmat):.2f}")
  print(f"elementwise pass over a patch-sized array (read + write {p.size * 8 / 2**20:.0f} MiB): "
        f"{best_ms(lambda a: a * 2.0, p):.2f}")


if __name__ == "__main__":
  main()
