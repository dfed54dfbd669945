"""advmaml.bench.flops counts matmul/conv FLOPs with every loop trip, against closed forms and XLA."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from advmaml.bench import benchmark
from advmaml.config import preset
from advmaml.bench.flops import count_flops
from advmaml.models import make_model

M, K, N = 6, 5, 4


def test_matmul_and_its_gradient_closed_form():
  x, w = jnp.ones((M, K)), jnp.ones((K, N))
  assert count_flops(lambda x, w: x @ w, x, w) == 2 * M * K * N
  # d/dw sum(x @ w): the forward matmul and x^T @ g; no cotangent for x is built.
  assert count_flops(jax.grad(lambda w: (x @ w).sum()), w) == 2 * (2 * M * K * N)
  batched = jnp.ones((3, M, K))
  assert count_flops(jax.vmap(lambda a: a @ w), batched) == 3 * 2 * M * K * N


def test_every_loop_trip_is_counted_where_xla_counts_one():
  x, w = jnp.ones((K, K)), jnp.ones((K, K))
  one = 2 * K ** 3

  def scanned(x, w, n):
    return lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=n)[0]

  for n in (1, 3, 7):
    assert count_flops(lambda x, w: scanned(x, w, n), x, w) == n * one
    assert count_flops(lambda x, w: lax.fori_loop(0, n, lambda i, c: c @ w, x), x, w) == n * one
  # The reason this module exists: XLA's cost analysis counts the 7-trip body once.
  xla = jax.jit(lambda x, w: scanned(x, w, 7)).lower(x, w).compile().cost_analysis()
  xla = xla[0] if isinstance(xla, list) else xla
  assert xla["flops"] < 2 * one
  # Nested loops multiply; cond counts its dearest branch.
  nested = lambda x, w: lax.scan(lambda c, _: (scanned(c, w, 3), None), x, None, length=2)[0]
  assert count_flops(nested, x, w) == 6 * one
  branchy = lambda p, x, w: lax.cond(p, lambda: x @ w @ w, lambda: x @ w)
  assert count_flops(branchy, True, x, w) == 2 * one


def test_shard_map_body_counts_once_per_device():
  # An abstract 4-device mesh: tracing needs no devices. The body sees (2, K) blocks.
  mesh = jax.sharding.AbstractMesh((4,), ("tasks",))
  split = jax.sharding.PartitionSpec("tasks")
  mapped = jax.shard_map(lambda a, w: a @ w, mesh=mesh, in_specs=(split, jax.sharding.PartitionSpec()),
                         out_specs=split)
  x, w = jnp.ones((8, K)), jnp.ones((K, N))
  assert count_flops(mapped, x, w) == count_flops(lambda x, w: x @ w, x, w) == 2 * 8 * K * N


def test_while_loop_with_unknown_trips_is_refused():
  x = jnp.ones((K, K))
  with pytest.raises(ValueError, match="while_loop"):
    count_flops(lambda x: lax.while_loop(lambda c: c.sum() < 1e3, lambda c: c @ c, x), x)


def test_convolution_closed_form():
  x, k = jnp.ones((2, 9, 9, 3)), jnp.ones((3, 3, 3, 8))
  conv = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert count_flops(conv, x, k) == 2 * (2 * 9 * 9 * 8) * (3 * 3 * 3)


@pytest.mark.parametrize("variant", ["conv4", "conv4_maxpool"])
def test_im2col_forward_equals_the_analytic_count(variant):
  cfg = preset("omniglot_5w1s", model=variant, filters=16)
  model = make_model(5, (28, 28, 1), filters=16, model=variant, conv_impl="im2col")
  params = model.init(jax.random.key(0))
  # im2col multiplies every tap, padding included, which is what the analytic count assumes.
  assert count_flops(model.apply, params, jnp.zeros((8, 28, 28, 1))) == (
      benchmark.conv4_forward_flops(cfg) * 8)


def _step_flops(work, pool, **overrides):
  fn, args, _ = benchmark._build(benchmark.with_overrides(work, overrides) if overrides else work,
                                 pool)
  return count_flops(fn, *args)


@pytest.fixture(scope="module")
def pool():
  return jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 20, 28, 28), dtype=np.uint8))


def test_meta_step_agrees_with_xla_where_it_has_no_loops(pool):
  work = benchmark.Workload("tiny", "tiny", dict(model="conv4_maxpool", filters=32, meta_batch_size=2,
                                                 inner_steps=1, n_way=5, k_shot=1), q_query=2)
  ours = _step_flops(work, pool, task_chunk=0)
  xla = benchmark._xla_flops(work, pool)
  # XLA adds batch-norm, ReLU, pooling and optimizer arithmetic (about 1 FLOP per element
  # against 2 * 9 * filters per conv output), and skips nothing.
  assert 0.8 * xla <= ours <= xla
  # Chunking the tasks (a scan over chunks) does the same arithmetic.
  assert _step_flops(work, pool, task_chunk=1) == ours


def test_inner_and_attack_loops_scale_linearly(pool):
  tiny = dict(model="conv4", filters=8, meta_batch_size=2, n_way=5, k_shot=1)
  adapt = benchmark.Workload("a", "a", dict(tiny, eval_inner_steps=1), kind="adapt", q_query=2)
  f = [_step_flops(adapt, pool, inner_steps=s) for s in (1, 2, 3)]
  assert f[2] - f[1] == f[1] - f[0] > 0
  aq = benchmark.Workload("b", "b", dict(tiny, inner_steps=1, objective="aq", train_attack="pgd",
                                         train_epsilon=0.1, train_step_size=0.025), q_query=2)
  g = [_step_flops(aq, pool, train_attack_steps=s) for s in (1, 2, 3)]
  assert g[2] - g[1] == g[1] - g[0] > 0
  # One PGD step is a forward and an input-gradient pass over the queries: more than a
  # forward pass, less than a second-order meta-step.
  forward_queries = benchmark.conv4_forward_flops(preset("omniglot_5w1s", **tiny)) * 2 * 5 * 2
  assert forward_queries < g[1] - g[0] < _step_flops(dataclasses.replace(aq, overrides=dict(
      aq.overrides, objective="natural")), pool)
