"""TensorBoard scalars of training and of evaluations, read back from the event files."""

from __future__ import annotations

import json
import pathlib
import shutil
import struct

import pytest
from tensorboardX.proto import event_pb2

from advmaml.config import preset
from advmaml.io.tensorboard_scalars import EVAL_FOLDER, FOLDER
from advmaml.train.training import train
from conftest import run_module


def read_events(path: pathlib.Path) -> list:
  """The Event protos of one file: TFRecord framing (length, its CRC, data, its CRC)."""
  data, events, at = path.read_bytes(), [], 0
  while at < len(data):
    (length,) = struct.unpack_from("<Q", data, at)
    events.append(event_pb2.Event.FromString(data[at + 12:at + 12 + length]))
    at += 12 + length + 4
  return events


def scalars_as_tensorboard_shows(folder: pathlib.Path) -> tuple[dict, list]:
  """{tag: [(step, value)]} after TensorBoard's purge rule (a SessionLog START at
  step s drops the earlier files' points at steps >= s), and every point unpurged."""
  shown, raw = {}, []
  for path in sorted(folder.glob("events.out.tfevents.*")):   # TensorBoard's order: by name
    for event in read_events(path):
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        shown = {tag: [p for p in points if p[0] < event.step] for tag, points in shown.items()}
      for value in event.summary.value:
        shown.setdefault(value.tag, []).append((event.step, value.simple_value))
        raw.append((value.tag, event.step))
  return shown, raw


@pytest.fixture
def tiny(fake_omniglot_dir, isolated_cache):
  return preset("tiny", data_dir=str(fake_omniglot_dir), num_steps=4, log_every=1,
                eval_every=2, checkpoint_every=2)


def test_training_writes_its_metrics_as_scalars_and_a_resume_purges_the_repeated_steps(
    tiny, tmp_path):
  train(tiny, tmp_path)
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  # A kill after step 4 was logged but before its checkpoint: the rerun resumes at 2.
  shutil.rmtree(tmp_path / "checkpoints" / "4")
  train(tiny, tmp_path)
  shown, raw = scalars_as_tensorboard_shows(tmp_path / FOLDER)
  assert sorted(step for tag, step in raw if tag == "train/loss") == [1, 2, 3, 3, 4, 4]
  train_records = [r for r in records if r["split"] == "train"]
  val_records = [r for r in records if r["split"] == "val"]
  # After the purge: one point per step, in order, with metrics.jsonl's values.
  for name in ("loss", "accuracy", "steps_per_sec"):
    assert [s for s, _ in shown[f"train/{name}"]] == [1, 2, 3, 4]
  assert shown["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in train_records]
  assert shown["train/accuracy"] == [(r["step"], pytest.approx(r["accuracy"]))
                                     for r in train_records]
  assert shown["val/accuracy"] == [(r["step"], pytest.approx(r["accuracy"])) for r in val_records]
  assert [s for s, _ in shown["val/accuracy"]] == [2, 4]
  assert [v for _, v in shown["train/outer_lr"]] == [pytest.approx(tiny.outer_lr)] * 4
  assert [v for _, v in shown["train/inner_lr"]] == [pytest.approx(tiny.inner_lr)] * 4


def test_tensorboard_false_writes_no_events(tiny, tmp_path):
  train(tiny.replace(num_steps=1, eval_every=0), tmp_path, tensorboard=False)
  assert (tmp_path / "metrics.jsonl").exists() and not (tmp_path / FOLDER).exists()


def _event_files(folder: pathlib.Path) -> list[str]:
  return sorted(p.name for p in folder.glob("events.out.tfevents.*"))


def test_evaluations_write_their_scalars_in_their_own_folder(tiny_run, tmp_path):
  source, env = tiny_run
  work = tmp_path / "run"   # a copy: other tests evaluate the shared run too
  shutil.copytree(source, work, ignore=shutil.ignore_patterns("evaluation", "eval_*", "*.png"))
  training = scalars_as_tensorboard_shows(work / FOLDER)
  training_files = _event_files(work / FOLDER)
  assert "train/loss" in training[0]

  def evaluate(*args):
    out = run_module("experiments.evaluate", *args, "--episodes=4", env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out

  evaluate(f"--workdir={work}")
  clean = json.loads((work / "eval_test.json").read_text())
  evaluate(f"--workdir={work}", "--split=val", "--epsilons=0.05", "--attacks=fgsm",
           "--noper_example", "--noplot")
  robust = json.loads((work / "eval_val.json").read_text())
  shown, _ = scalars_as_tensorboard_shows(work / EVAL_FOLDER)
  step = clean["step"]
  assert step == 2 and len(_event_files(work / EVAL_FOLDER)) == 2   # a file per evaluation
  assert shown == {
      "test/accuracy": [(step, pytest.approx(clean["metrics"]["accuracy"]["mean"]))],
      **{f"eval_val/{name}": [(step, pytest.approx(m["mean"]))]
         for name, m in robust["metrics"].items()}}
  assert {"eval_val/clean_accuracy", "eval_val/robust_accuracy@0.05"} <= set(shown)
  # The training's events are untouched: no new file, no purge, the same points.
  assert _event_files(work / FOLDER) == training_files
  assert scalars_as_tensorboard_shows(work / FOLDER) == training

  # A bare checkpoint has no run to show them with; --notensorboard writes none.
  out = evaluate(f"--workdir={work / 'checkpoints'}")
  assert "No TensorBoard scalars" in out.stderr
  evaluate(f"--workdir={work}", "--notensorboard")
  assert len(_event_files(work / EVAL_FOLDER)) == 2
  # A folder that cannot be written (here a file in its way) leaves the result written.
  blocked = tmp_path / "blocked"
  shutil.copytree(work, blocked, ignore=shutil.ignore_patterns(FOLDER))
  (blocked / FOLDER).write_text("")
  (blocked / "eval_test.json").unlink()
  out = evaluate(f"--workdir={blocked}")
  assert "TensorBoard scalars not written: cannot write" in out.stderr
  assert (blocked / "eval_test.json").exists()
