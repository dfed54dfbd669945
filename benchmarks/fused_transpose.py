r"""What a transpose costs on XLA's CPU backend, alone and fused with elementwise work.

  python benchmarks/fused_transpose.py > results/benchmarks/fused-transpose-xeon.txt

The weight gradient of an im2col convolution, patches^T @ g, needs one of its
operands transposed. XLA's layout assignment folds that transpose into the
loop fusion that produces g (batch norm's backward, in a Conv4), which then
writes g column by column: every read is a stride of O floats apart. This
times, for g of P x 64 floats (P = 58,800 is the first layer's positions on one
task's 75 query images, 14,700 the second layer's): the elementwise op alone,
a plain transpose of a ready array, and the two fused (what XLA builds).
Milliseconds, best of 3 runs of 50 calls.
"""

import jax

from conv_variants import best_ms  # benchmarks/ is on sys.path when run as a script


def main() -> None:
  print(f"g: P x 64 float32; ms, best of 3 x 50 calls; {jax.devices()[0].device_kind}")
  print(f"{'P':>6} {'elementwise':>12} {'transpose':>10} {'fused':>8}")
  for positions in (14_700, 58_800):
    a = jax.random.normal(jax.random.key(0), (positions, 64))
    b = jax.random.normal(jax.random.key(1), (positions, 64))
    s = jax.random.normal(jax.random.key(2), (64,))
    elementwise = best_ms(lambda a, b, s: a * s + b * s - s, a, b, s)
    plain = best_ms(lambda a: a.T, a)
    fused = best_ms(lambda a, b, s: (a * s + b * s - s).T, a, b, s)
    print(f"{positions:>6} {elementwise:>12.2f} {plain:>10.2f} {fused:>8.2f}")


if __name__ == "__main__":
  main()
