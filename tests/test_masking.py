"""Gradient-masking checks: each passes on an honest model and fails on a masked one.

The honest model is a linear classifier adapted from zero on the support set
(a few SGD steps separate the synthetic classes well). The masked model is
the same classifier on inputs quantised to steps of 1/4 (``jnp.round``, whose
gradient is 0): white-box attacks see zero gradients and stand still, while
Square, a transfer attack from the honest model, or a large epsilon break it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advmaml.eval import masking, robust_eval
from advmaml.eval.evaluation import evaluate_episodes
from advmaml.learners import MAML as Learner, query_loss
from conftest import run_module as _run
from tests.test_robust_eval import evaluate, synthetic_pool, trained  # noqa: F401 (fixture)

N_WAY, K_SHOT, Q_QUERY, INNER, EPISODES = 5, 1, 3, 5, 8
EPS, LARGE = 0.3, 0.5


def linear(params, x):
  """(B, 8, 8, 1) -> (B, N)."""
  return x.reshape(x.shape[0], -1) @ params["head"]["w"] + params["head"]["b"]


def quantised_linear(params, x):
  """The same on inputs rounded to multiples of 1/4: zero input gradient everywhere."""
  return linear(params, jnp.round(x * 4) / 4)


def meta_params(scale=0.0, seed=0):
  rng = np.random.default_rng(seed)
  w = (scale * rng.normal(size=(64, N_WAY))).astype(np.float32)
  return {"model": {"head": {"w": jnp.asarray(w), "b": jnp.zeros(N_WAY)}}}


HONEST = Learner(linear, inner_steps=INNER, inner_lr=0.5)
MASKED = Learner(quantised_linear, inner_steps=INNER, inner_lr=0.5)


def run_checks(learner, surrogate=HONEST):
  checks = masking.MaskingChecks(
      epsilons=(EPS,), steps=10, n_way=N_WAY, surrogate=surrogate,
      black_box_queries=300, large_epsilon=LARGE, progress_steps=3)
  base = robust_eval.make_metric_fn(("pgd", "margin", "apgd"), (EPS,), n_way=N_WAY,
                                    steps=10)
  metric_fn = masking.with_masking_metrics(base, checks)
  params = (meta_params(), meta_params(scale=0.01, seed=1))
  metrics = evaluate_episodes(learner, params, synthetic_pool(), jax.random.key(0),
                              num_episodes=EPISODES, n_way=N_WAY, k_shot=K_SHOT, q_query=Q_QUERY,
                              batch_tasks=4, metric_fn=metric_fn)
  return metrics, {r.name: r for r in masking.verdicts(metrics, checks)}


@pytest.fixture(scope="module")
def honest():
  return run_checks(HONEST)


@pytest.fixture(scope="module")
def masked():
  return run_checks(MASKED)


def test_every_check_passes_on_the_honest_model(honest):
  metrics, verdicts = honest
  assert metrics["clean_accuracy"]["mean"] > 0.8
  assert set(verdicts) == {f"transfer@{EPS:g}", f"black_box@{EPS:g}", f"loss_progress@{EPS:g}",
                           "large_epsilon"}
  assert all(r.passed for r in verdicts.values()), [r.message for r in verdicts.values()]
  # The honest white-box attack breaks something, and the base metrics are untouched.
  assert metrics[robust_eval.metric_key(EPS)]["mean"] < metrics["clean_accuracy"]["mean"]
  base = robust_eval.make_metric_fn(("pgd", "margin", "apgd"), (EPS,), n_way=N_WAY,
                                    steps=10)
  alone = evaluate_episodes(HONEST, meta_params(), synthetic_pool(), jax.random.key(0),
                            num_episodes=EPISODES, n_way=N_WAY, k_shot=K_SHOT, q_query=Q_QUERY,
                            batch_tasks=4, metric_fn=base)
  for name, value in alone.items():
    assert metrics[name]["mean"] == pytest.approx(value["mean"], abs=1e-6), name


def test_every_check_fails_on_the_masked_model(masked):
  metrics, verdicts = masked
  assert metrics["clean_accuracy"]["mean"] > 0.8
  failed = {name for name, r in verdicts.items() if not r.passed}
  assert failed == set(verdicts), [r.message for r in verdicts.values()]
  assert all("FAILED" in r.message for r in verdicts.values())
  # Zero gradients: PGD never moves from its start, so no objective rises at all.
  assert metrics[masking.key_for("loss_progress", EPS, "fraction")]["mean"] == 0.0


def test_verdicts_follow_the_noise():
  """A gap inside its interval passes, one above it fails; the thresholds are inclusive."""
  assert masking.gap_check("t", {"mean": 0.02, "ci95": 0.03}, "x").passed
  assert not masking.gap_check("t", {"mean": 0.04, "ci95": 0.03}, "x").passed
  assert masking.gap_check("t", {"mean": -0.5, "ci95": 0.0}, "x").passed   # transfer weaker: fine
  assert not masking.gap_check("t", {"mean": 0.01, "ci95": float("nan")}, "x").passed
  assert masking.large_epsilon_check({"mean": 0.05}, 0.5).passed
  assert not masking.large_epsilon_check({"mean": 0.06}, 0.5).passed
  assert masking.loss_progress_check({"mean": 0.4}, {"mean": 0.8}, 0.1).passed       # share 0.5
  assert not masking.loss_progress_check({"mean": 0.3}, {"mean": 0.8}, 0.1).passed   # 0.375


def test_evaluate_entry_point_reports_the_checks(tiny_run, tmp_path):
  work, env = tiny_run
  # The surrogate only has to be another checkpoint for the plumbing; a copy keeps this short.
  surrogate = tmp_path / "surrogate"
  shutil.copytree(work / "checkpoints", surrogate / "checkpoints")
  common = (f"--workdir={work}", "--episodes=2", "--epsilons=0.05", "--attacks=pgd",
            "--attack_steps=3", "--noper_example", "--noplot")
  out = _run("experiments.evaluate", *common, f"--check_transfer_from={surrogate}",
             "--check_black_box", "--square_queries=20", "--check_large_epsilon=1.0",
             "--check_loss_progress", "--check_loss_progress_steps=2", env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  record = json.loads((work / "eval_test.json").read_text())
  report = record["masking_checks"]
  names = [r["name"] for r in report["results"]]
  assert names == ["transfer@0.05", "black_box@0.05", "loss_progress@0.05", "large_epsilon"]
  assert report["passed"] == all(r["passed"] for r in report["results"])
  assert report["settings"]["surrogate"].startswith(str(surrogate))
  assert report["settings"]["large_epsilon_per_example"] == []   # --noper_example: summed only
  large = report["results"][-1]
  assert large["passed"] and large["value"] == 0.0   # L-inf 1 covers the whole pixel range
  for r in report["results"]:
    assert (f"gradient-masking check failed: {r['name']}" in out.stderr) == (not r["passed"])
  m = record["metrics"]
  assert m["masking/transfer_robust_accuracy@0.05"]["n"] == 2
  assert m["masking/large_epsilon_robust_accuracy@1.0"]["mean"] == 0.0

  for flags in (("--check_large_epsilon=0",), ("--check_loss_progress", "--check_loss_progress_steps=9"),
                (f"--check_transfer_from={work}",), ("--check_black_box", "--epsilons="),
                ("--check_loss_progress_steps=2",)):
    out = _run("experiments.evaluate", *common, *flags, env=env)
    named = flags[0].split("=")[0]
    assert out.returncode == 2 and named in out.stderr, out.stderr[-2000:]
    errors = [l for l in out.stderr.splitlines() if l.startswith("error: ")]
    assert "Traceback" not in out.stderr and len(errors) == 1, out.stderr[-2000:]


def test_large_epsilon_check_takes_the_per_example_worst_case(trained):
  """On a batch-normalised MLP, whose queries are coupled: with aimed attacks the
  check's number is the per-example worst case at the large radius, below the summed
  attacks' alone (recorded beside it, and what a summed-only check reports)."""
  large = 0.1
  checks = masking.MaskingChecks(epsilons=(), steps=8, n_way=N_WAY, large_epsilon=large,
                                 large_epsilon_attacks=("pgd", "margin"),
                                 large_epsilon_per_example=("margin",))
  base = robust_eval.make_metric_fn((), (), n_way=N_WAY)
  aimed = evaluate(trained, masking.with_masking_metrics(base, checks))
  summed = evaluate(trained, masking.with_masking_metrics(
      base, dataclasses.replace(checks, large_epsilon_per_example=())))
  key = robust_eval.metric_key(large, "masking/large_epsilon_robust_accuracy")
  summed_key = robust_eval.metric_key(large, "masking/large_epsilon_summed_robust_accuracy")
  assert summed_key not in summed
  # The same summed attacks, the same keys: the summed number is the summed-only check's.
  assert aimed[summed_key]["mean"] == pytest.approx(summed[key]["mean"], abs=1e-6)
  assert aimed[key]["mean"] < aimed[summed_key]["mean"] < aimed["clean_accuracy"]["mean"]
  verdict, = masking.verdicts(aimed, checks, large_epsilon_tolerance=1.0)
  assert verdict.value == pytest.approx(aimed[key]["mean"])
