"""Training loop: exact resume, checkpoint fallback, bad settings, entry points end to end."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from advmaml.io import checkpoint
from advmaml.config import ConfigError, preset
from advmaml.data.omniglot import DataError
from advmaml.train.meta_step import init_train_state, make_train_step
from advmaml.objectives import natural
from advmaml.eval.trained_runs import load_checkpointed_run
from advmaml.train.training import (build_experiment, check_saved_config, initial_state,
                              state_to_tree, train)

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny(fake_omniglot_dir, isolated_cache):
  return preset("tiny", data_dir=str(fake_omniglot_dir))


def final_params(workdir: pathlib.Path):
  step, tree = checkpoint.restore_latest(workdir / "checkpoints")
  return step, tree["meta_params"], tree["opt_state"]


def test_resume_continues_exactly_like_an_uninterrupted_run(tiny, tmp_path):
  train(tiny.replace(num_steps=6), tmp_path / "straight")
  train(tiny.replace(num_steps=2), tmp_path / "resumed")        # "interrupted" at step 2
  train(tiny.replace(num_steps=6), tmp_path / "resumed")        # picks up from the checkpoint
  step_a, params_a, opt_a = final_params(tmp_path / "straight")
  step_b, params_b, opt_b = final_params(tmp_path / "resumed")
  assert step_a == step_b == 6
  chex.assert_trees_all_equal(params_a, params_b)               # bit for bit on CPU
  chex.assert_trees_all_equal(opt_a, opt_b)
  # The resumed log reads like the uninterrupted one: one line per logged step.
  steps = [json.loads(l)["step"] for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
  assert steps == [2, 4, 6]


def test_resume_falls_back_past_a_corrupt_checkpoint(tiny, tmp_path, caplog):
  train(tiny.replace(num_steps=6), tmp_path / "straight")
  work = tmp_path / "crashed"
  train(tiny.replace(num_steps=4), work)
  state_file = work / "checkpoints" / "4" / "state.pkl"
  state_file.write_bytes(state_file.read_bytes()[:100])         # a crash mid-copy, say
  train(tiny.replace(num_steps=6), work)                        # resumes from step 2
  assert "4" in caplog.text and ("corrupt" in caplog.text or "truncated" in caplog.text)
  chex.assert_trees_all_equal(final_params(work)[1], final_params(tmp_path / "straight")[1])


def test_resume_with_other_settings_is_refused(tiny, tmp_path):
  train(tiny.replace(num_steps=2), tmp_path)
  with pytest.raises(ConfigError, match="inner_lr"):
    train(tiny.replace(num_steps=4, inner_lr=0.01), tmp_path)


@pytest.mark.parametrize("changes,flag", [
    (dict(n_way=1000), "--n_way"),
    (dict(k_shot=15, q_query=6), "--k_shot"),
    (dict(k_shot=1, eval_q_query=20), "--eval_q_query"),
    (dict(n_way=1), "--n_way"),
    (dict(meta_batch_size=0), "--meta_batch_size"),
    (dict(model="resnet"), "--model"),
    (dict(model="strided"), "--model='strided' .now called 'conv4'"),  # set past preset()'s mapping
    (dict(kernels="gpu"), "--kernels"),
    (dict(batch_norm="query"), "--batch_norm"),
    (dict(kernels="reference", conv_impl="taps"), "--conv_impl=.taps. chooses the cpu kernels"),
])
def test_bad_settings_fail_before_training_naming_the_flag(tiny, tmp_path, changes, flag):
  with pytest.raises(ConfigError, match=flag):
    train(tiny.replace(**changes), tmp_path)
  assert not (tmp_path / "checkpoints").exists()


def test_resume_may_change_the_kernels_but_not_the_batch_norm_rule(tmp_path):
  """Kernels compute the same math (to float32 rounding); support statistics do not.
  A config.json written before either field existed resumes under the defaults."""
  cfg = preset("tiny")
  old = json.loads(cfg.to_json())
  del old["kernels"], old["batch_norm"]
  old["model"] = "strided"                                      # conv4's name before the registry
  (tmp_path / "config.json").write_text(json.dumps(old))
  check_saved_config(tmp_path, cfg)                          # kernels: saved cpu, now auto
  check_saved_config(tmp_path, cfg.replace(kernels="reference"))
  with pytest.raises(ConfigError, match="--batch_norm: saved 'batch' vs now 'support'"):
    check_saved_config(tmp_path, cfg.replace(batch_norm="support"))


# Logits of preset("tiny", image_size=16)'s initial params on jax.random.uniform(key(7),
# (4, 16, 16, 1)), computed at commit 24d9eca, before --kernels and --batch_norm existed.
_LOGITS_BEFORE_KERNELS = {
    "strided": [[0.42603, -0.27976, 0.06723], [-0.40752, 1.04164, 0.15774],
                [0.85419, 1.07389, 1.98404], [-0.05491, -0.91874, 0.07757]],
    "maxpool": [[-0.0473, 0.4757, 0.80408], [0.23793, 0.53134, 1.53998],
                [0.73915, 1.46884, 2.05898], [0.39571, 0.34827, 1.45233]],
}


@pytest.mark.parametrize("model, now", [("strided", "conv4"), ("maxpool", "conv4_maxpool")])
def test_checkpoint_from_before_kernels_loads_and_gives_the_same_logits(tmp_path, model, now):
  """A checkpoint saved under the pre-registry model names, without --kernels and
  --batch_norm: the same parameter tree, the logits of 24d9eca."""
  cfg = preset("tiny", image_size=16, model=model)  # the old name, mapped with a note
  assert cfg.model == now
  tree = state_to_tree(initial_state(build_experiment(cfg, (16, 16, 1)), cfg.seed), cfg)
  del tree["config"]["kernels"], tree["config"]["batch_norm"]
  tree["config"]["model"] = model
  tree["step"] = 3  # the step folder's number: a checkpoint that disagrees is refused
  checkpoint.save_checkpoint(tmp_path / "checkpoints", 3, tree)
  run = load_checkpointed_run(tmp_path)
  assert (run.step, run.cfg.kernels, run.cfg.batch_norm, run.cfg.model) == (3, "cpu", "batch", now)
  x = jax.random.uniform(jax.random.key(7), (4, 16, 16, 1))
  np.testing.assert_allclose(run.exp.learner.apply_fn(run.meta_params["model"], x),
                             _LOGITS_BEFORE_KERNELS[model], atol=2e-5)


def test_missing_data_folder_says_where_to_put_the_files(tmp_path, isolated_cache):
  with pytest.raises(DataError, match="images_background.zip"):
    train(preset("tiny", data_dir=str(tmp_path / "nowhere")), tmp_path / "work")


@pytest.mark.parametrize("batch_norm", ["batch", "support"])
def test_train_step_compiles_once_and_learns(batch_norm):
  cfg = preset("tiny", n_way=3, k_shot=2, q_query=2, filters=8, meta_batch_size=4, outer_lr=3e-3,
               batch_norm=batch_norm)
  exp = build_experiment(cfg, (8, 8, 1))
  rng = np.random.default_rng(0)
  patterns = rng.integers(0, 256, (6, 1, 8, 8))
  pool = np.clip(patterns + rng.integers(-30, 30, (6, 20, 8, 8)), 0, 255).astype(np.uint8)
  state = init_train_state(exp.learner.init_meta_params(exp.model.init(jax.random.key(0))),
                           exp.optimizer)
  step = make_train_step(exp.learner, natural, exp.optimizer, meta_batch_size=4, n_way=3, k_shot=2,
                         q_query=2, jit=False)
  chex.clear_trace_counter()  # the other parametrisation's step has the same name
  step = jax.jit(chex.assert_max_traces(step, n=1), donate_argnums=0)
  key, pool = jax.random.key(1), jax.numpy.asarray(pool)
  losses = []
  for _ in range(30):
    state, metrics = step(state, pool, key)
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 30
  assert np.mean(losses[-5:]) < np.mean(losses[:5])


def _run(module: str, *args: str, cwd=REPO, env=None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_train_and_evaluate_entry_points_end_to_end(fake_omniglot_dir, tmp_path):
  env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg"), "JAX_PLATFORMS": "cpu"}
  work = tmp_path / "run"
  out = _run("experiments.train", "--preset=tiny", f"--workdir={work}",
             f"--data_dir={fake_omniglot_dir}", "--num_steps=4", "--eval_every=2", env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "steps/s" in out.stderr and "left" in out.stderr           # progress lines
  # On CPU, one host device per usable core by default, the layout logged at start.
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  devices = 2 if cores >= 2 else 1      # the tiny preset's meta-batch of 2 splits over 2 at most
  assert f"host devices: {cores}, one per usable core" in out.stderr
  assert f"Meta-batch of 2 tasks split over {devices} cpu device(s)" in out.stderr
  config = json.loads((work / "config.json").read_text())
  assert config["n_way"] == 3 and config["num_steps"] == 4
  records = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
  assert {r["split"] for r in records} == {"train", "val"}
  assert [s for s, _ in checkpoint.list_checkpoints(work / "checkpoints")] == [2, 4]

  out = _run("experiments.evaluate", f"--workdir={work}", "--episodes=10", env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads((work / "eval_test.json").read_text())
  acc = result["metrics"]["accuracy"]
  assert result["step"] == 4 and acc["n"] == 10 and 0 <= acc["mean"] <= 1 and acc["ci95"] > 0
  # Deterministic given the seed.
  out = _run("experiments.evaluate", f"--workdir={work}", "--episodes=10",
             f"--output={tmp_path / 'again.json'}", env=env)
  assert json.loads((tmp_path / "again.json").read_text())["metrics"] == result["metrics"]
  # More devices than there are: refused with the flag named, no traceback.
  out = _run("experiments.evaluate", f"--workdir={work}", "--episodes=10", "--num_devices=999",
             env=env)
  assert out.returncode != 0
  assert f"--num_devices=999 not in 0..{cores}" in out.stderr and "Traceback" not in out.stderr


def test_train_entry_point_rejects_bad_flags_with_a_clear_message(fake_omniglot_dir, tmp_path):
  env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg"), "JAX_PLATFORMS": "cpu"}
  out = _run("experiments.train", "--preset=tiny", f"--workdir={tmp_path / 'w'}",
             f"--data_dir={fake_omniglot_dir}", "--n_way=999", env=env)
  assert out.returncode != 0
  assert "--n_way=999" in out.stderr and "Traceback" not in out.stderr
  out = _run("experiments.train", "--preset=nope", f"--workdir={tmp_path / 'w'}", env=env)
  assert out.returncode != 0 and "--preset" in out.stderr


def test_evaluate_refuses_a_malicious_checkpoint(tmp_path):
  """A state.pkl carrying a __reduce__ payload is refused and never executed."""
  marker = tmp_path / "pwned"
  payload = (b"\x80\x04cposix\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR.")
  step_dir = tmp_path / "checkpoints" / "7"
  step_dir.mkdir(parents=True)
  (step_dir / "state.pkl").write_bytes(payload)
  out = _run("experiments.evaluate", f"--workdir={tmp_path}")
  assert out.returncode != 0 and "refused" in out.stderr
  assert not marker.exists()
