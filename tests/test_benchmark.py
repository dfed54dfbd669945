"""The benchmark measures the real step and counts FLOPs consistently (no timing asserted)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from advmaml import benchmark
from advmaml.config import preset
from advmaml.models import make_model


@pytest.mark.parametrize("variant", ["strided", "maxpool"])
def test_analytic_forward_flops_match_xla_cost_analysis(variant):
  cfg = preset("omniglot_5w1s", model=variant, filters=16)
  model = make_model(5, (28, 28, 1), filters=16, variant=variant, conv_impl="xla")
  params = model.init(jax.random.key(0))
  batch = 8
  cost = jax.jit(model.apply).lower(params, jnp.zeros((batch, 28, 28, 1))).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  analytic = benchmark.conv4_forward_flops(cfg) * batch
  # XLA skips the taps that fall on 'SAME' zero padding (a few % fewer) and adds batch norm,
  # ReLU and pooling (a few % more); the two counts must agree to within that.
  assert 0.9 * analytic <= cost["flops"] <= 1.3 * analytic


def test_run_workload_reports_what_it_promises():
  work = benchmark.Workload("tiny", "tiny", dict(model="strided", filters=8, meta_batch_size=2,
                                                 inner_steps=1), q_query=2)
  r = benchmark.run_workload(work, repeats=2, min_steps=2, min_seconds=0.1, peak_gflops=100.0)
  assert r["throughput_min"] <= r["throughput_median"] <= r["throughput_max"]
  assert r["throughput_min"] > 0 and r["compile_s"] > 0 and r["peak_bytes"] > 0
  # A second-order meta-step costs several forward passes over its images.
  forward = r["forward_flops_per_image_analytic"] * r["images_per_step"]
  assert 2 * forward < r["flops_per_step"] < 20 * forward
  # One inner step, no attack: the only loop is over task chunks, which XLA's count sees
  # as the all-at-once program, so the two counts differ by elementwise work only.
  assert 0.5 * r["flops_per_step_xla"] < r["flops_per_step"] <= r["flops_per_step_xla"]
  median_steps_per_s = r["throughput_median"]  # a "train" workload: one step is one unit
  assert r["gflops_achieved"] == pytest.approx(r["flops_per_step"] * median_steps_per_s / 1e9)
  assert r["fraction_of_matmul_peak"] == pytest.approx(r["gflops_achieved"] / 100.0)


def test_every_listed_workload_builds():
  assert {f"B{i}" for i in range(1, 5)} | {f"B{i}-strided" for i in range(1, 5)} == set(benchmark.WORKLOADS)
