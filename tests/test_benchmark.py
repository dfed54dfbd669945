"""The benchmark measures the real step and counts FLOPs consistently (no timing asserted)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from simulated_devices import json_verdict_on_devices, run_on_devices

from advmaml.bench import benchmark
from advmaml.config import preset
from advmaml.models import make_model


@pytest.mark.parametrize("variant", ["conv4", "conv4_maxpool"])
def test_analytic_forward_flops_match_xla_cost_analysis(variant):
  cfg = preset("omniglot_5w1s", model=variant, filters=16)
  model = make_model(5, (28, 28, 1), filters=16, model=variant, conv_impl="xla")
  params = model.init(jax.random.key(0))
  batch = 8
  cost = jax.jit(model.apply).lower(params, jnp.zeros((batch, 28, 28, 1))).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  analytic = benchmark.conv4_forward_flops(cfg) * batch
  # XLA skips the taps that fall on 'SAME' zero padding (a few % fewer) and adds batch norm,
  # ReLU and pooling (a few % more); the two counts must agree to within that.
  assert 0.9 * analytic <= cost["flops"] <= 1.3 * analytic


def test_run_workload_reports_what_it_promises():
  work = benchmark.Workload("tiny", "tiny", dict(model="conv4", filters=8, meta_batch_size=2,
                                                 inner_steps=1), q_query=2)
  r = benchmark.run_workload(work, repeats=2, min_steps=2, min_seconds=0.1, peak_gflops=100.0)
  assert r["throughput_min"] <= r["throughput_median"] <= r["throughput_max"]
  assert r["throughput_min"] > 0 and r["compile_s"] > 0 and r["peak_bytes"] > 0
  # A second-order meta-step costs several forward passes over its images.
  assert r["forward_flops_per_image"] == r["forward_flops_per_image_analytic"]  # im2col: every tap
  forward = r["forward_flops_per_image_analytic"] * r["images_per_step"]
  assert 2 * forward < r["flops_per_step"] < 20 * forward
  # One inner step, no attack: the only loop is over task chunks, which XLA's count sees
  # as the all-at-once program, so the two counts differ by elementwise work only.
  assert 0.5 * r["flops_per_step_xla"] < r["flops_per_step"] <= r["flops_per_step_xla"]
  median_steps_per_s = r["throughput_median"]  # a "train" workload: one step is one unit
  assert r["gflops_achieved"] == pytest.approx(r["flops_per_step"] * median_steps_per_s / 1e9)
  assert r["fraction_of_matmul_peak"] == pytest.approx(r["gflops_achieved"] / 100.0)


def test_every_listed_workload_builds():
  assert {f"B{i}" for i in range(1, 5)} | {f"B{i}-strided" for i in range(1, 5)} | {"B5"} == set(
      benchmark.WORKLOADS)


def test_resnet12_workload_builds_its_step_on_84x84_images():
  """B5's meta-step traces (not compiled here) on an 84x84 RGB pool, with the full-width
  ResNet-12, and its counted forward pass is ResNet-12's: 2 * (conv MACs + head MACs)."""
  work = benchmark.WORKLOADS["B5"]
  pool = work.pool(classes=5, examples=6)
  assert pool.shape == (5, 6, 84, 84, 3)
  fn, args, cfg = benchmark._build(work, pool)
  assert (cfg.model, cfg.filters, cfg.meta_batch_size) == ("resnet12", 64, 2)
  assert sum(x.size for x in jax.tree.leaves(args[0].meta_params)) == 12_427_525
  assert jax.eval_shape(fn, *args)[1]["loss"].shape == ()
  macs, side, c_in = 0, 84, 3
  for c in (64, 160, 320, 640):
    macs += side * side * (9 * c_in * c + 2 * 9 * c * c + c_in * c)  # stride 1, then pooled
    side, c_in = side // 2, c
  exp = benchmark.build_experiment(cfg, work.image_shape)
  assert benchmark.forward_flops(exp, work.image_shape) == 2 * (macs + 640 * 5)
  assert benchmark.conv4_forward_flops(cfg, work.image_shape) is None


_TINY = dict(model="conv4", filters=8, meta_batch_size=2, inner_steps=1)

# Run under 2 simulated CPU devices: the benchmark's train step splits its tasks over
# both (the outputs live on both devices) and the record says so.
_TWO_DEVICE_PROBE = """
import json, jax, jax.numpy as jnp, numpy as np
from advmaml.bench import benchmark
work = benchmark.Workload("tiny", "tiny", %r, q_query=2)
pool = jnp.asarray(np.random.default_rng(0).integers(0, 256, (64, 20, 28, 28), dtype=np.uint8))
fn, args, _ = benchmark._build(work, pool, num_devices=2)
state, _ = fn(*args)
hlo = fn.lower(*args).compile().as_text()
r = benchmark.run_workload(work, repeats=1, min_steps=1, min_seconds=0.01, peak_gflops=100.0,
                           num_devices=2)
print(json.dumps({"state_devices": len(jax.tree.leaves(state)[0].sharding.device_set),
                  "all_reduce": "all-reduce" in hlo, "num_devices": r["num_devices"],
                  "fraction": r["fraction_of_matmul_peak"], "gflops": r["gflops_achieved"]}))
""" % (_TINY,)


def test_train_workload_splits_its_tasks_over_the_requested_devices():
  verdict = json_verdict_on_devices(["-c", _TWO_DEVICE_PROBE], 2)
  assert verdict["state_devices"] == 2 and verdict["all_reduce"]
  assert verdict["num_devices"] == 2
  # Simulated CPU devices share the cores the peak was measured on: not 2 x the peak.
  assert verdict["fraction"] == pytest.approx(verdict["gflops"] / 100.0)


# Test-time adaptation split over 2 devices: outputs on both, and the same per-episode
# accuracies and counted FLOPs as on one device.
_TWO_DEVICE_ADAPT_PROBE = """
import json, jax, jax.numpy as jnp, numpy as np
from advmaml.bench import benchmark
from advmaml.bench.flops import jaxpr_flops
work = benchmark.Workload("tiny-adapt", "tiny", dict(%r, eval_inner_steps=2), kind="adapt",
                          q_query=2)
pool = jnp.asarray(np.random.default_rng(0).integers(0, 256, (64, 20, 28, 28), dtype=np.uint8))
acc = {}
for n in (1, 2):
  fn, args, _ = benchmark._build(work, pool, num_devices=n)
  _, out = fn(*args)
  acc[n] = (len(out["accuracy"].sharding.device_set), np.asarray(out["accuracy"]).tolist(),
            jaxpr_flops(fn.trace(*args).jaxpr))
r = benchmark.run_workload(work, repeats=1, min_steps=1, min_seconds=0.01, num_devices=2)
print(json.dumps({"acc": acc, "num_devices": r["num_devices"], "unit": r["unit"]}))
""" % (_TINY,)


def test_adaptation_workload_splits_its_episodes_over_the_requested_devices():
  verdict = json_verdict_on_devices(["-c", _TWO_DEVICE_ADAPT_PROBE], 2)
  (devices_1, acc_1, flops_1), (devices_2, acc_2, flops_2) = verdict["acc"]["1"], verdict["acc"]["2"]
  assert (devices_1, devices_2) == (1, 2)
  assert flops_1 == flops_2 > 0  # the whole call's work, not one device's share
  assert len(acc_2) == 2 and acc_2 == pytest.approx(acc_1, abs=1e-6)
  assert verdict["num_devices"] == 2 and verdict["unit"] == "tasks/s"


@pytest.mark.parametrize("flag, message", [("--num_devices=1,3",
                                            "B1: --meta_batch_size=8 does not split over 3 devices"),
                                           ("--num_devices=5", "not in 0..3"),
                                           ("--num_devices=two", "give integers")])
def test_benchmark_command_rejects_bad_device_counts_before_timing(flag, message):
  # 3 devices: B1's 8 tasks do not split over 3.
  out = run_on_devices(["-m", "experiments.benchmark", "--config=B1", flag], 3)
  assert out.returncode != 0
  assert re.search(message, out.stderr), out.stderr[-2000:]
  assert "matmul peak:" not in out.stderr  # refused before measuring (or timing) anything
