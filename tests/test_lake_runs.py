"""Lake's one-shot runs: reading all_runs.zip, scoring a model, refusing the wrong model."""

from __future__ import annotations

import dataclasses

import json
import logging
import os
import pathlib
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from advmaml.io import checkpoint, progress
from advmaml.runtime import host
from advmaml.config import ConfigError, preset
from advmaml.data.lake_runs import load_lake_runs
from advmaml.data.omniglot import DataError
from advmaml.eval.lake_eval import PUBLISHED_ERRORS, evaluate_lake, lake_table, runs_per_call
from advmaml.io.tensorboard_scalars import EVAL_FOLDER
from advmaml.train.training import build_experiment, initial_state, state_to_tree
from fake_omniglot import ink_mask, png_bytes
from conftest import run_script_recording_python
from simulated_devices import run_on_devices
from test_tensorboard_scalars import scalars_as_tensorboard_shows

REPO = pathlib.Path(__file__).resolve().parents[1]


def true_class(run: int, item: int) -> int:
  """A fixed permutation: test item MM of run r belongs to training class (MM*7 + r) % 20."""
  return (item * 7 + run) % 20


def write_runs(path: pathlib.Path, top: str = "all_runs/") -> pathlib.Path:
  """all_runs.zip in the official layout; item MM is a copy of its class's training image."""
  with zipfile.ZipFile(path, "w") as zf:
    for r in range(1, 21):
      run = f"run{r:02d}"
      lines = []
      for k in range(20):
        zf.writestr(f"{top}{run}/training/class{k + 1:02d}.png", png_bytes(ink_mask(k + r, k % 5)))
      for m in range(20):
        k = true_class(r, m)
        zf.writestr(f"{top}{run}/test/item{m + 1:02d}.png", png_bytes(ink_mask(k + r, k % 5)))
        lines.append(f"{run}/test/item{m + 1:02d}.png {run}/training/class{k + 1:02d}.png")
      zf.writestr(f"{top}{run}/class_labels.txt", "\n".join(lines) + "\n")
  return path


def lake_cfg(**changes):
  return preset("tiny", n_way=20, split="lake", filters=8, inner_lr=0.5, eval_inner_steps=30,
                **changes)


def test_reads_the_official_layout(tmp_path):
  runs, names = load_lake_runs(write_runs(tmp_path / "all_runs.zip"))
  assert names[0] == "run01" and len(names) == 20
  assert runs.support_x.shape == (20, 20, 28, 28, 1) and runs.support_x.dtype == np.uint8
  np.testing.assert_array_equal(runs.query_y[2], [true_class(3, m) for m in range(20)])
  # Items are copies of their class's training image: decoding and labels line up.
  for r in (0, 7):
    np.testing.assert_array_equal(runs.query_x[r], runs.support_x[r][runs.query_y[r]])
  assert runs.support_x.max() == 255   # ink = 255 after inversion, as the training data


def test_folder_and_zip_without_top_folder_read_the_same(tmp_path):
  zipped = write_runs(tmp_path / "flat.zip", top="")
  folder = tmp_path / "extracted"
  zipfile.ZipFile(zipped).extractall(folder)
  a, _ = load_lake_runs(zipped)
  b, _ = load_lake_runs(folder)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def test_bad_runs_are_reported(tmp_path):
  with pytest.raises(DataError, match="all_runs.zip"):
    load_lake_runs(tmp_path / "missing.zip")
  bad = tmp_path / "bad.zip"
  with zipfile.ZipFile(write_runs(tmp_path / "ok.zip")) as src, zipfile.ZipFile(bad, "w") as dst:
    for name in src.namelist():
      if name != "all_runs/run05/test/item03.png":
        dst.writestr(name, src.read(name))
  with pytest.raises(DataError, match="run05/test/item03.png"):
    load_lake_runs(bad)


def _runs_with(tmp_path, replaced: dict) -> pathlib.Path:
  """A copy of the fake all_runs.zip with some members' bytes replaced."""
  out = tmp_path / "damaged.zip"
  with zipfile.ZipFile(write_runs(tmp_path / "ok.zip")) as src, zipfile.ZipFile(out, "w") as dst:
    for name in src.namelist():
      dst.writestr(name, replaced.get(name, src.read(name)))
  return out


@pytest.mark.parametrize("member, data, message", [
    ("all_runs/run02/training/class07.png", b"\x89PNG\r\n\x1a\nnot really",
     r"run02/training/class07.png is not a readable PNG"),
    ("all_runs/run03/class_labels.txt", b"run03/test/item01.png \xff\xfe",
     r"run03/class_labels.txt is not UTF-8 text"),
])
def test_damaged_files_name_the_member(tmp_path, member, data, message):
  with pytest.raises(DataError, match=message):
    load_lake_runs(_runs_with(tmp_path, {member: data}))


def test_entry_point_reports_a_corrupt_png_in_one_line(tmp_path):
  cfg = lake_cfg()
  exp = build_experiment(cfg, (28, 28, 1))
  checkpoint.save_checkpoint(tmp_path / "run" / "checkpoints", 0,
                             state_to_tree(initial_state(exp, 0), cfg))
  runs = _runs_with(tmp_path, {"all_runs/run01/test/item01.png": b"garbage"})
  out = subprocess.run([sys.executable, "-m", "experiments.evaluate_lake", f"--runs={runs}",
                        f"--workdir={tmp_path / 'run'}"], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert "error: " in out.stderr and "item01.png is not a readable PNG" in out.stderr


def test_scores_a_model_that_can_fit_the_runs(tmp_path):
  """Items equal their class's training image, so adapting to the support set solves every run."""
  cfg = lake_cfg()
  exp = build_experiment(cfg, (28, 28, 1))
  meta = initial_state(exp, 0).meta_params
  runs, names = load_lake_runs(write_runs(tmp_path / "all_runs.zip"))
  result = evaluate_lake(exp.test_learner, meta, cfg, runs, names, inner_steps=30)
  assert result["mean_error"]["accuracy"]["mean"] <= 0.05
  none = evaluate_lake(dataclasses.replace(exp.test_learner, inner_steps=0), meta, cfg, runs,
                       names, inner_steps=0)
  assert none["mean_error"]["accuracy"]["mean"] > 0.5          # no adaptation: near chance
  assert set(result["per_run"]) == set(names)


@pytest.mark.parametrize("changes,message", [(dict(split="vinyals"), "--split=lake"),
                                             (dict(n_way=5), "--n_way=20")])
def test_refuses_models_that_do_not_fit(tmp_path, changes, message):
  cfg = lake_cfg().replace(**changes)
  exp = build_experiment(cfg, (28, 28, 1))
  runs, names = load_lake_runs(write_runs(tmp_path / "all_runs.zip"))
  with pytest.raises(ConfigError, match=message):
    evaluate_lake(exp.learner, initial_state(exp, 0).meta_params, cfg, runs, names, inner_steps=1)


def test_progress_lines_after_each_call(tmp_path, caplog, monkeypatch):
  monkeypatch.setattr(progress, "EVERY_SECONDS", 0.0)   # a line per call
  cfg = lake_cfg()
  exp = build_experiment(cfg, (28, 28, 1))
  runs, names = load_lake_runs(write_runs(tmp_path / "all_runs.zip"))
  with caplog.at_level(logging.INFO):
    evaluate_lake(exp.learner, initial_state(exp, 0).meta_params, cfg, runs, names,
                  inner_steps=0)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Lake runs:")]
  per_call = runs_per_call(20, 1)   # on CPU one run per call and device
  assert [int(re.match(r"Lake runs: (\d+)/20 runs", l).group(1)) for l in lines] == \
      list(range(per_call, 21, per_call))
  assert "(100%)" in lines[-1] and all("runs/s" in l and "left" in l for l in lines)


def _save_initial_checkpoint(workdir: pathlib.Path) -> None:
  cfg = lake_cfg()
  exp = build_experiment(cfg, (28, 28, 1))
  checkpoint.save_checkpoint(workdir / "checkpoints", 0, state_to_tree(initial_state(exp, 0), cfg))


def test_entry_point_clean_and_under_attack(tmp_path):
  _save_initial_checkpoint(tmp_path / "work")
  runs = write_runs(tmp_path / "all_runs.zip")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-m", "experiments.evaluate_lake", f"--runs={runs}",
                        f"--workdir={tmp_path / 'work'}", "--epsilons=1.0", "--attacks=pgd",
                        "--attack_steps=5"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  # On CPU, one host device per usable core by default, the runs split over all of them.
  cores = host.usable_cores()
  assert f"host devices: {cores}, one per usable core" in out.stderr
  assert f"Lake's runs split over {cores} cpu device(s)" in out.stderr
  record = json.loads((tmp_path / "work" / "eval_lake_runs.json").read_text())
  clean = record["mean_error"]["clean_accuracy"]["mean"]
  robust = record["mean_error"]["robust_accuracy@1.0"]["mean"]
  assert clean <= 0.05 and robust == 1.0 and len(record["per_run"]) == 20
  # The mean errors as TensorBoard scalars at the checkpoint's step.
  shown, _ = scalars_as_tensorboard_shows(tmp_path / "work" / EVAL_FOLDER)
  assert shown == {f"lake/{name.replace('accuracy', 'error')}": [(0, pytest.approx(e["mean"]))]
                   for name, e in record["mean_error"].items()}
  assert set(shown) == {"lake/clean_error", "lake/robust_error@1.0", "lake/summed_robust_error@1.0"}
  # The README's table of that folder, once it holds a training's config and log.
  (tmp_path / "work" / "config.json").write_text(json.dumps(dataclasses.asdict(lake_cfg())))
  (tmp_path / "work" / "metrics.jsonl").write_text(
      '{"step": 50, "split": "train", "steps_per_sec": 0.5}\n'
      '{"step": 100, "split": "train", "steps_per_sec": 0.25}\n')
  lines = lake_table([tmp_path / "work"]).splitlines()
  cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
  assert cells[0] == ["run", "learner", "objective", "meta-steps", "wall time", "clean error",
                      "error at eps 1"]
  percent = lambda s: f"{100 * s['mean']:.2f} +- {100 * s['ci95']:.2f}%"
  assert cells[2] == ["work", "maml", "natural", "100", "5 min",
                      percent(record["mean_error"]["clean_accuracy"]), "100.00 +- 0.00%"]
  assert [row[0] for row in cells[3:]] == [name for name, _ in PUBLISHED_ERRORS]
  assert cells[3][5] == "4.5%" and cells[3][6] == "-"
  table = subprocess.run([sys.executable, "-m", "experiments.lake_table", str(tmp_path / "work")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert table.returncode == 0 and table.stdout.strip() == "\n".join(lines), table.stderr[-2000:]
  bad = subprocess.run([sys.executable, "-m", "experiments.lake_table", str(tmp_path / "none")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert len(bad.stderr.strip().splitlines()) == 1 and "config.json is missing" in bad.stderr


def test_runs_split_over_devices_give_the_single_device_errors(tmp_path):
  """3 simulated devices (the 20 runs padded to 21) and 1 score every run the same,
  under an attack whose random start is keyed by the run."""
  _save_initial_checkpoint(tmp_path / "work")
  runs = write_runs(tmp_path / "all_runs.zip")
  records = {}
  for n in (1, 0):   # 0: all 3
    out = run_on_devices(["-m", "experiments.evaluate_lake", f"--runs={runs}",
                          f"--workdir={tmp_path / 'work'}", f"--num_devices={n}",
                          f"--output={tmp_path / f'{n}.json'}", "--epsilons=0.1",
                          "--attacks=pgd", "--attack_steps=2", "--inner_steps=5"], devices=3)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"Lake's runs split over {n or 3} cpu device(s)" in out.stderr
    records[n] = json.loads((tmp_path / f"{n}.json").read_text())
  assert records[0]["per_run"] == records[1]["per_run"]
  robust = [r["robust_accuracy@0.1"] for r in records[0]["per_run"].values()]
  assert len(set(robust)) > 1, robust   # not all 0 or 1: the runs differ


@pytest.mark.parametrize("variables, args, message", [
    ({}, ("nosuch",), "unknown row nosuch"),
    ({"STAGES": "eval", "RUNS_ZIP": "missing.zip"}, ("metaoptnet",), "missing.zip not found"),
    ({}, (), "usage:")])
def test_lake_runs_script_refuses_bad_input_in_one_line(tmp_path, variables, args, message):
  out = subprocess.run(["bash", str(REPO / "experiments" / "lake_runs.sh"), *args], cwd=tmp_path,
                       env={**os.environ, "PYTHON": "false", **variables}, capture_output=True,
                       text=True, timeout=60)
  assert out.returncode == 2 and message in out.stderr, out.stderr
  assert len(out.stderr.strip().splitlines()) == 1


def test_lake_runs_script_passes_the_attacks_and_the_masking_radius(tmp_path):
  """STAGES=eval: the scoring's flags as the script passes them (a stand-in PYTHON records them)."""
  runs = write_runs(tmp_path / "all_runs.zip")
  out, calls = run_script_recording_python("lake_runs.sh", "metaoptnet_aq", cwd=tmp_path,
                                           STAGES="eval", RUNS_ZIP=str(runs))
  assert out.returncode == 0, out.stderr
  (call,) = calls
  args = call.split()
  assert args[:2] == ["-m", "experiments.evaluate_lake"] and f"--runs={runs}" in args
  assert "--epsilons=0.05,0.1,0.3" in args and "--attacks=pgd,margin,apgd" in args
  assert "--workdir=results/omniglot_20w1s_lake/metaoptnet_aq" in args
