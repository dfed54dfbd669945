"""The meta-batch split over 4 (simulated CPU) devices gives the single-device parameters."""

from __future__ import annotations

import pytest
from simulated_devices import REPO, json_verdict_on_devices

from advmaml.runtime import host, sharding
from advmaml.kernels import ChunkBudget


def _verdict_on_4_devices(script: str) -> dict:
  """Runs tests/scripts/<script> on 4 simulated CPU devices; its last line's JSON."""
  verdict = json_verdict_on_devices([str(REPO / "tests" / "scripts" / script)], 4)
  assert verdict["devices"] == 4
  # The models were built knowing each device's share of the cores (the CPU kernels' chunks).
  for n in (1, 4):
    assert verdict[f"budget_{n}"] == ChunkBudget.for_cores(host.cores_per_device(n)).threshold_bytes
  return verdict


def test_sharded_meta_step_matches_single_device():
  verdict = _verdict_on_4_devices("sharded_step.py")
  assert verdict["all_reduce_4"] and not verdict["all_reduce_1"]   # really split, gradients reduced
  assert verdict["max_abs_diff"] <= 1e-5 * max(1.0, verdict["param_scale"])


def test_mesh_and_divisibility_errors_name_the_flags():
  with pytest.raises(ValueError, match="--num_devices"):
    sharding.make_mesh(10_000)
  mesh = sharding.make_mesh(1)
  sharding.check_divisible(5, mesh)  # one device divides anything


def test_sharded_evaluation_matches_single_device():
  """Evaluation calls split over 4 devices give the single-device per-episode metrics."""
  verdict = _verdict_on_4_devices("sharded_eval.py")
  assert verdict["devices_used_4"] == 4 and verdict["devices_used_1"] == 1  # really split
  assert verdict["metrics"] == ["clean_accuracy", "robust_accuracy@0.05"]
  assert verdict["n"] == 10   # 6 per call rounded up to 8; the extra episodes dropped
  assert verdict["per_episode_max_diff"] <= 1e-6
  assert verdict["summary_max_diff"] <= 1e-6
