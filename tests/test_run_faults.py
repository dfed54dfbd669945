"""Runs that never lie and never break: the cases of the reliability checklist, one test each.

1. NaN/inf settings refused; a diverging run stops naming the step and keeps finite checkpoints.
2. A torn metrics line is dropped; the log after a resume equals an uninterrupted run's.
3. One writer per workdir.
4. Every bad newest checkpoint is skipped with a reason and the previous good one used.
5. One-line messages, not tracebacks; nothing rewritten before validation passes.
6. An interrupted evaluation resumes after its finished batches, and only the same evaluation.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import shutil
import subprocess

import chex
import numpy as np
import pytest

from advmaml.io import checkpoint, workdir as workdir_lib
from advmaml.train import training
from advmaml.config import ConfigError, preset, validate
from advmaml.eval.trained_runs import evaluate_trained, load_checkpointed_run, load_trained
from advmaml.train.training import DivergedError, train
from advmaml.io.workdir import WorkdirError, WorkdirLock
from conftest import run_module

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny(fake_omniglot_dir, isolated_cache):
  return preset("tiny", data_dir=str(fake_omniglot_dir))


@pytest.fixture
def straight(tiny, tmp_path):
  """An uninterrupted 6-step run (checkpoints at 2, 4, 6) to compare against."""
  work = tmp_path / "straight"
  train(tiny.replace(num_steps=6), work)
  return work


def final_params(work: pathlib.Path):
  step, tree = checkpoint.restore_latest(work / "checkpoints")
  return step, tree["meta_params"]


def metric_lines(work: pathlib.Path) -> list[dict]:
  """metrics.jsonl without the wall-clock rate, the one value a resume may change."""
  return [{k: v for k, v in json.loads(line).items() if k != "steps_per_sec"}
          for line in (work / "metrics.jsonl").read_text().splitlines()]


def run_entry(module: str, *args: str, env_extra=None) -> subprocess.CompletedProcess:
  """``python -m module args`` on the CPU, with ``env_extra`` over this process's variables."""
  return run_module(module, *args, env={**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})})


def assert_one_line_error(out: subprocess.CompletedProcess, *needles: str) -> None:
  assert out.returncode != 0, out.stderr[-2000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1, out.stderr[-2000:]
  for needle in needles:
    assert needle in errors[0], errors[0]


# -- 1. NaN ---------------------------------------------------------------------


@pytest.mark.parametrize("changes, flag", [
    (dict(inner_lr=float("nan")), "--inner_lr=nan"),
    (dict(inner_lr=float("inf")), "--inner_lr=inf"),
    (dict(outer_lr=float("nan")), "--outer_lr=nan"),
    (dict(train_epsilon=float("nan")), "--train_epsilon=nan"),
    (dict(trades_beta=float("inf")), "--trades_beta=inf"),
    (dict(rmaml_beta=float("-inf")), "--rmaml_beta=-inf"),
    (dict(train_step_size=float("nan")), "--train_step_size=nan"),
    (dict(train_epsilon=2.0), "--train_epsilon=2.0 is larger than 1"),
])
def test_non_finite_and_out_of_range_floats_are_refused_by_name(changes, flag):
  with pytest.raises(ConfigError, match=flag.replace(".", r"\.")):
    validate(preset("tiny", **changes))


def test_an_l2_radius_above_one_is_allowed():
  validate(preset("tiny", train_norm="l2", train_epsilon=2.0))


def test_nan_flag_fails_before_anything_is_written(fake_omniglot_dir, tmp_path):
  work = tmp_path / "w"
  out = run_entry("experiments.train", "--preset=tiny", f"--workdir={work}",
                  f"--data_dir={fake_omniglot_dir}", "--inner_lr=nan")
  assert_one_line_error(out, "--inner_lr=nan must be a finite number")
  assert not (work / "config.json").exists()


def test_a_diverging_run_stops_naming_the_step_and_keeps_its_finite_checkpoint(tiny, tmp_path):
  work = tmp_path / "diverged"
  cfg = tiny.replace(outer_lr=1e30, num_steps=8, checkpoint_every=1, keep_checkpoints=1,
                     log_every=1)
  with pytest.raises(DivergedError, match=r"step (\d+): non-finite") as info:
    train(cfg, work)
  bad_step = int(info.value.args[0].split()[1].rstrip(":"))
  steps = [s for s, _ in checkpoint.list_checkpoints(work / "checkpoints")]
  assert steps == [bad_step - 1]           # the last finite one, never pruned for a NaN one
  _, tree = checkpoint.restore_latest(work / "checkpoints")
  assert all(np.isfinite(x).all() for x in
             [*jax_leaves(tree["meta_params"]), *jax_leaves(tree["opt_state"])])
  # Nothing non-finite was logged, and the log is standard JSON.
  for line in (work / "metrics.jsonl").read_text().splitlines():
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics"))["step"] < bad_step
  assert str(work / "checkpoints" / str(bad_step - 1)) in str(info.value)
  # That last finite checkpoint's parameters overflow the network: its evaluation
  # would read chance accuracy with a zero interval, so it is refused instead.
  run, splits = load_trained(work)
  with pytest.raises(checkpoint.CheckpointError, match="logits are NaN or inf"):
    evaluate_trained(run, splits, num_episodes=4)


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_evaluation_refuses_a_checkpoint_with_non_finite_parameters(tiny, tmp_path, caplog):
  work = tmp_path / "run"
  train(tiny.replace(num_steps=4), work)
  _, tree = checkpoint.restore_latest(work / "checkpoints")
  _replace_first_param(tree, lambda a: np.full_like(a, np.nan))
  checkpoint.save_checkpoint(work / "checkpoints", 4, tree, keep=None)
  run = load_checkpointed_run(work)              # falls back to step 2, saying why
  assert run.step == 2 and "NaN or inf" in caplog.text
  with pytest.raises(checkpoint.CheckpointError, match="NaN or inf"):
    load_checkpointed_run(work / "checkpoints" / "4")


# -- 2. metrics ----------------------------------------------------------------


class _Killed(Exception):
  """Stands for SIGKILL right after a checkpoint was written."""


def test_resume_after_a_crash_logs_the_lines_an_uninterrupted_run_logs(tiny, tmp_path, monkeypatch):
  # Logging every 4 steps, checkpoints every 3: the crash lands mid-window.
  cfg = tiny.replace(num_steps=8, log_every=4, checkpoint_every=3, keep_checkpoints=5)
  train(cfg, tmp_path / "straight")
  real_save = checkpoint.save_checkpoint

  def save_then_die(ckpt_dir, step, tree, keep):
    real_save(ckpt_dir, step, tree, keep)
    if step == 3:
      raise _Killed
  monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
  with pytest.raises(_Killed):
    train(cfg, tmp_path / "crashed")
  monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
  train(cfg, tmp_path / "crashed")
  assert metric_lines(tmp_path / "crashed") == metric_lines(tmp_path / "straight")
  chex.assert_trees_all_equal(final_params(tmp_path / "crashed"),
                              final_params(tmp_path / "straight"))


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tiny, straight, tmp_path, caplog):
  work = tmp_path / "torn"
  train(tiny.replace(num_steps=4), work)
  with open(work / "metrics.jsonl", "ab") as f:
    f.write(b'{"step": 5, "split": "tra')     # a full disk mid-line
  train(tiny.replace(num_steps=6), work)
  assert "torn" in caplog.text and "metrics.jsonl" in caplog.text
  assert metric_lines(work) == metric_lines(straight)


def test_unreadable_bytes_in_the_log_do_not_block_a_resume(tmp_path, caplog):
  path = tmp_path / "metrics.jsonl"
  path.write_bytes(b'{"step": 1}\n\xff\xfe\n{"step": 2}\n{"step": 3, "spl')
  workdir_lib.truncate_metrics(path, 2)
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2]
  assert "line 2, 4" in caplog.text


# -- 3. one writer ----------------------------------------------------------------


def test_a_second_writer_fails_at_once_naming_the_holder(tiny, tmp_path, fake_omniglot_dir):
  work = tmp_path / "shared"
  work.mkdir()
  with WorkdirLock(work):
    with pytest.raises(WorkdirError, match=f"pid {os.getpid()}"):
      train(tiny, work)
    out = run_entry("experiments.train", "--preset=tiny", f"--workdir={work}",
                    f"--data_dir={fake_omniglot_dir}")
    assert_one_line_error(out, f"pid {os.getpid()}", "another training")
  assert not (work / "config.json").exists() and not (work / "checkpoints").exists()
  train(tiny.replace(num_steps=2), work)         # the lock went with its holder


# -- 4. bad newest checkpoints ----------------------------------------------------


def _resave(step_dir: pathlib.Path, change) -> None:
  _, tree = checkpoint.load_checkpoint(step_dir)
  change(tree)
  checkpoint.save_checkpoint(step_dir.parent, int(step_dir.name), tree, keep=None)


def _replace_first_param(tree, fn) -> None:
  """Replaces the first array of tree["meta_params"] (nested dicts) by fn(array)."""
  node = tree["meta_params"]
  while True:
    name = sorted(node)[0]
    if not isinstance(node[name], dict):
      node[name] = fn(node[name])
      return
    node = node[name]


def _wrong_shape(step_dir):
  _resave(step_dir, lambda tree: _replace_first_param(
      tree, lambda a: np.zeros(np.shape(a)[:-1] + (7,), np.float32)))


def _sparse_tebibyte(step_dir):
  with open(step_dir / "state.pkl", "r+b") as f:
    f.truncate(1 << 40)


def _fifo(step_dir):
  (step_dir / "state.pkl").unlink()
  os.mkfifo(step_dir / "state.pkl")


def _link_to_dev_zero(step_dir):
  (step_dir / "state.pkl").unlink()
  (step_dir / "state.pkl").symlink_to("/dev/zero")


def _folder_is_a_link(step_dir):
  elsewhere = step_dir.parent.parent / "elsewhere-4"
  shutil.move(step_dir, elsewhere)
  step_dir.symlink_to(elsewhere, target_is_directory=True)


def _no_metadata(step_dir):
  (step_dir / "metadata.json").unlink()


def _other_number(step_dir):
  shutil.rmtree(step_dir)
  shutil.copytree(step_dir.parent / "2", step_dir)


def _other_number_in_the_tree(step_dir):
  _resave(step_dir, lambda tree: tree.update(step=2))


BAD_CHECKPOINTS = {
    "wrong_shapes": (_wrong_shape, "parameter shapes do not match"),
    "missing_opt_state": (lambda d: _resave(d, lambda t: t.pop("opt_state")), "opt_state"),
    "float_step": (lambda d: _resave(d, lambda t: t.update(step=4.5)), "holds step 4.5"),
    "string_step": (lambda d: _resave(d, lambda t: t.update(step="4")), "holds step '4'"),
    "sparse_1TiB_state": (_sparse_tebibyte, "metadata says"),
    "fifo_state": (_fifo, "a FIFO"),
    "state_links_to_dev_zero": (_link_to_dev_zero, "symbolic link"),
    "step_folder_is_a_link": (_folder_is_a_link, "not a real folder"),
    "no_metadata": (_no_metadata, "no metadata.json"),
    "stored_under_another_number": (_other_number, "does not match folder name"),
    "tree_step_differs": (_other_number_in_the_tree, "holds step 2 but is stored as step 4"),
    "inf_parameters": (lambda d: _resave(d, lambda t: _replace_first_param(
        t, lambda a: np.full_like(a, np.inf))), "NaN or inf"),
}


@pytest.mark.timeout(240)   # a FIFO that blocked the read would hang here
@pytest.mark.parametrize("kind", sorted(BAD_CHECKPOINTS))
def test_a_bad_newest_checkpoint_is_skipped_and_the_previous_one_resumed(
    tiny, tmp_path, caplog, kind):
  """(That a resume from step 2 ends bit for bit where an uninterrupted run does is
  test_training's and the fault-injection script's to show.)"""
  caplog.set_level(logging.INFO)
  corrupt, reason = BAD_CHECKPOINTS[kind]
  work = tmp_path / "run"
  train(tiny.replace(num_steps=4, keep_checkpoints=5), work)
  corrupt(work / "checkpoints" / "4")
  train(tiny.replace(num_steps=6, keep_checkpoints=5), work)
  assert f"Resumed from {work / 'checkpoints' / '2'} at step 2" in caplog.text
  skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipping")]
  assert len(skipped) == 1 and reason in skipped[0] and "/4" in skipped[0], skipped
  assert len(skipped[0].splitlines()) == 1
  assert final_params(work)[0] == 6
  assert not [p.name for p in (work / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_a_linked_step_folder_is_never_followed_nor_pruned(tiny, tmp_path):
  work = tmp_path / "run"
  train(tiny.replace(num_steps=2), work)
  target = tmp_path / "keep-me"
  shutil.copytree(work / "checkpoints" / "2", target)
  (work / "checkpoints" / "1").symlink_to(target, target_is_directory=True)
  train(tiny.replace(num_steps=8, keep_checkpoints=1), work)
  assert (target / "state.pkl").is_file()                        # not deleted through the link
  names = sorted(p.name for p in (work / "checkpoints").iterdir())
  assert names == ["1", "8"] and (work / "checkpoints" / "1").is_symlink()


# -- 5. messages, and nothing rewritten first ---------------------------------------


def test_bad_workdirs_get_one_line_messages(fake_omniglot_dir, tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  for workdir, needle in (("/proc/x", "--workdir=/proc/x: cannot create"),
                          (str(a_file), "is a file, not a folder")):
    out = run_entry("experiments.train", "--preset=tiny", f"--workdir={workdir}",
                    f"--data_dir={fake_omniglot_dir}")
    assert_one_line_error(out, needle)


def test_a_full_disk_while_checkpointing_stops_cleanly_and_the_rerun_resumes(
    tiny, straight, tmp_path, monkeypatch):
  work = tmp_path / "full"
  real_write = checkpoint._write_synced

  def write_until_full(path, data):
    if path.parent.name.startswith(".tmp-4-"):
      raise OSError(errno.ENOSPC, "No space left on device", str(path))
    real_write(path, data)
  monkeypatch.setattr(checkpoint, "_write_synced", write_until_full)
  with pytest.raises(OSError) as info:
    train(tiny.replace(num_steps=6), work)
  assert "cannot write" in workdir_lib.describe_os_error(info.value)
  assert "free disk space" in workdir_lib.describe_os_error(info.value)
  assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["2"]   # no temp left
  monkeypatch.setattr(checkpoint, "_write_synced", real_write)
  train(tiny.replace(num_steps=6), work)
  chex.assert_trees_all_equal(final_params(work)[1], final_params(straight)[1])


def test_a_full_disk_while_logging_tears_one_line_and_the_rerun_repairs_it(
    tiny, straight, tmp_path, monkeypatch, caplog):
  work = tmp_path / "full"
  real_append = workdir_lib.append_metrics

  def append_until_full(path, record):
    if record["step"] == 4:
      with open(path, "ab") as f:
        f.write(workdir_lib.dumps_record(record).encode()[:20])
      raise OSError(errno.ENOSPC, "No space left on device", str(path))
    real_append(path, record)
  monkeypatch.setattr(training, "append_metrics", append_until_full)
  with pytest.raises(OSError):
    train(tiny.replace(num_steps=6), work)
  monkeypatch.setattr(training, "append_metrics", real_append)
  train(tiny.replace(num_steps=6), work)
  assert "torn" in caplog.text
  assert metric_lines(work) == metric_lines(straight)


def test_cli_turns_a_full_disk_into_one_line(capsys):
  from experiments import cli
  with pytest.raises(SystemExit) as info:
    with cli.one_line_errors():
      raise OSError(errno.ENOSPC, "No space left on device", "runs/x/metrics.jsonl")
  assert info.value.code == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "runs/x/metrics.jsonl" in err and "free disk space" in err


def test_all_bad_checkpoints_and_bad_eval_flags_get_one_line_messages(tiny, tmp_path,
                                                                       fake_omniglot_dir):
  work = tmp_path / "run"
  train(tiny.replace(num_steps=2), work)
  out = run_entry("experiments.evaluate", f"--workdir={work}", "--inner_steps=-3")
  assert_one_line_error(out, "--inner_steps=-3")
  out = run_entry("experiments.evaluate", f"--workdir={work}", "--epsilons=2")
  assert_one_line_error(out, "--epsilons")
  (work / "checkpoints" / "2" / "state.pkl").write_bytes(b"garbage")
  out = run_entry("experiments.train", "--preset=tiny", f"--workdir={work}",
                  f"--data_dir={fake_omniglot_dir}", "--num_steps=4")
  assert_one_line_error(out, "none of the 1 checkpoints")


def test_resume_without_config_json_is_checked_against_the_checkpoint(tiny, tmp_path):
  work = tmp_path / "run"
  train(tiny.replace(num_steps=2), work)
  (work / "config.json").unlink()
  with pytest.raises(ConfigError, match="--filters: saved 8 vs now 16"):
    train(tiny.replace(num_steps=4, filters=16), work)
  assert not (work / "config.json").exists()     # the refused command rewrote nothing
  train(tiny.replace(num_steps=4), work)         # so the right one still resumes
  assert final_params(work)[0] == 4


def test_a_refused_resume_leaves_config_json_as_it_was(tiny, tmp_path):
  work = tmp_path / "run"
  train(tiny.replace(num_steps=2), work)
  before = (work / "config.json").read_bytes()
  with pytest.raises(ConfigError):
    train(tiny.replace(num_steps=4, inner_lr=0.01), work)
  assert (work / "config.json").read_bytes() == before


# -- 6. an interrupted evaluation resumes --------------------------------------


def _count_batches(monkeypatch) -> list[int]:
  """Records the first episode of every batch the evaluation computes."""
  from advmaml.eval import evaluation
  starts, real = [], evaluation._evaluate_batch

  def counted(meta_params, pool, key, start, **kwargs):
    starts.append(int(start))
    return real(meta_params, pool, key, start, **kwargs)
  monkeypatch.setattr(evaluation, "_evaluate_batch", counted)
  return starts


def test_an_interrupted_evaluation_resumes_after_its_finished_batches(tiny, tmp_path, monkeypatch,
                                                                      caplog):
  from advmaml.io import partial_results
  caplog.set_level(logging.INFO, logger="absl")
  train(tiny.replace(num_steps=2), tmp_path / "run")
  run, splits = load_trained(tmp_path / "run")
  metrics = lambda record: record["metrics"]
  straight = evaluate_trained(run, splits, num_episodes=10)     # batches of 4: 0, 4, 8
  partial = tmp_path / "eval.partial.npz"
  real_save = partial_results.save

  def save_then_die(path, identity, per_episode):
    real_save(path, identity, per_episode)
    if len(per_episode["accuracy"]) == 8:
      raise _Killed
  monkeypatch.setattr(partial_results, "save", save_then_die)
  with pytest.raises(_Killed):
    evaluate_trained(run, splits, num_episodes=10, partial_path=partial, settings="clean")
  monkeypatch.setattr(partial_results, "save", real_save)

  starts = _count_batches(monkeypatch)
  resumed = evaluate_trained(run, splits, num_episodes=10, partial_path=partial, settings="clean")
  assert starts == [8] and "8 episodes already evaluated" in caplog.text
  assert metrics(resumed) == metrics(straight)
  with np.load(partial) as kept:                 # all 10 now, for a longer evaluation to extend
    assert kept["accuracy"].shape == (10,)

  # The kept episodes are what it reports (doctored ones show in the mean, nothing recomputed)...
  with np.load(partial) as kept:
    identity = str(kept["__identity__"])
  real_save(partial, identity, {"accuracy": np.full(10, 0.5, np.float32)})
  starts.clear()
  doctored = evaluate_trained(run, splits, num_episodes=10, partial_path=partial, settings="clean")
  assert starts == [] and doctored["metrics"]["accuracy"]["mean"] == 0.5
  # ... but only by the same evaluation: other settings start over.
  caplog.clear()
  other = evaluate_trained(run, splits, num_episodes=10, partial_path=partial, settings="other")
  assert starts == [0, 4, 8] and "another evaluation's episodes" in caplog.text
  assert metrics(other) == metrics(straight)
  # Nor by other code: episodes of an older advmaml are not mixed with this one's.
  real_save(partial, identity, {"accuracy": np.full(10, 0.5, np.float32)})
  starts.clear()
  monkeypatch.setattr(partial_results, "source_digest", lambda package: "edited sources")
  edited = evaluate_trained(run, splits, num_episodes=10, partial_path=partial, settings="clean")
  assert starts == [0, 4, 8] and metrics(edited) == metrics(straight)


def test_the_evaluate_command_resumes_and_then_removes_its_partial_file(tiny_run, tmp_path):
  work, env = tiny_run
  output = tmp_path / "eval.json"
  output.mkdir()                                  # the JSON cannot be written: the run fails...
  args = ("experiments.evaluate", f"--workdir={work}", f"--output={output}", "--episodes=6",
          "--notensorboard")
  out = run_module(*args, env=env)
  assert_one_line_error(out, str(output))
  partial = tmp_path / "eval.partial.npz"
  assert partial.exists()                         # ... after keeping its 6 episodes
  output.rmdir()
  out = run_module(*args, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "6 episodes already evaluated" in out.stderr
  assert not partial.exists()
  run, splits = load_trained(work)
  assert json.loads(output.read_text())["metrics"] == evaluate_trained(
      run, splits, num_episodes=6)["metrics"]


def test_a_kept_evaluation_resumes_with_its_folders_spelled_another_way(tiny_run, tmp_path):
  """A partial file committed on one machine resumes on a fresh clone where the data
  and the transfer surrogate are given by other (relative) paths: the identity holds
  what the files are, not where they lie."""
  work, env = tiny_run
  surrogate = tmp_path / "surrogate"
  shutil.copytree(work / "checkpoints", surrogate / "checkpoints")
  data_dir = json.loads((work / "config.json").read_text())["data_dir"]
  output = tmp_path / "eval.json"

  def evaluate(data, transfer_from):
    return run_module("experiments.evaluate", f"--workdir={work}", f"--data_dir={data}",
                      f"--output={output}", "--episodes=4", "--notensorboard", "--noplot",
                      "--epsilons=0.1", "--attacks=pgd", "--attack_steps=2", "--noper_example",
                      f"--check_transfer_from={transfer_from}", env=env)
  output.mkdir()                                  # the first run keeps its episodes, then fails
  assert_one_line_error(evaluate(pathlib.Path(data_dir).resolve(), surrogate.resolve()),
                        str(output))
  assert output.with_suffix(".partial.npz").exists()
  output.rmdir()
  out = evaluate(os.path.relpath(data_dir, REPO), os.path.relpath(surrogate, REPO))
  assert out.returncode == 0, out.stderr[-3000:]
  assert "4 episodes already evaluated" in out.stderr
