"""experiments.compare: the table and both figures from two tiny trained and evaluated workdirs."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from PIL import Image

from advmaml.eval.compare import wall_seconds
from advmaml.config import preset
from conftest import run_script_recording_python
from advmaml.train.training import train

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(module: str, *args: str, env=None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def two_runs(fake_omniglot_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("compare")
  env = {**os.environ, "XDG_CACHE_HOME": str(root / "xdg"), "JAX_PLATFORMS": "cpu"}
  cfg = preset("tiny", data_dir=str(fake_omniglot_dir), eval_every=2)
  runs = {"natural": root / "natural", "aq": root / "aq"}
  train(cfg, runs["natural"], tensorboard=False)
  train(cfg.replace(objective="aq", train_attack="fgsm"), runs["aq"], tensorboard=False)
  for work in runs.values():
    out = _run("experiments.evaluate", f"--workdir={work}", "--episodes=4",
               "--epsilons=0.05,0.1", "--attacks=pgd", "--attack_steps=1", "--noper_example",
               "--noplot", f"--output={work / 'eval_test_robust.json'}", env=env)
    assert out.returncode == 0, out.stderr[-3000:]
  return runs, env


def test_compare_prints_the_table_from_the_json_files_and_writes_both_figures(two_runs, tmp_path):
  runs, env = two_runs
  out = _run("experiments.compare", str(runs["natural"]), str(runs["aq"]), "--markdown",
             f"--output_dir={tmp_path}", "--name=tiny", env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert lines[0] == ("| run | model | objective | meta-steps | wall time | clean | "
                      "linf eps 0.05 | linf eps 0.1 |")
  assert len(lines) == 4
  for line, (name, work) in zip(lines[2:], runs.items()):
    metrics = json.loads((work / "eval_test_robust.json").read_text())["metrics"]
    cells = [c.strip() for c in line.strip("|").split("|")]
    model = json.loads((work / "config.json").read_text())["model"]
    assert model == "conv4" and cells[:4] == [work.name, model, name, "4"]
    assert cells[5:] == [f"{100 * metrics[k]['mean']:.2f} +- {100 * metrics[k]['ci95']:.2f}%"
                         for k in ("clean_accuracy", "robust_accuracy@0.05",
                                   "robust_accuracy@0.1")]
  for figure in ("robust_tiny.png", "val_tiny.png"):
    with Image.open(tmp_path / figure) as image:
      image.verify()
      assert image.format == "PNG" and image.size[0] > 200


def test_compare_refuses_a_folder_that_is_not_a_workdir(tmp_path):
  out = _run("experiments.compare", str(tmp_path))
  assert out.returncode == 2 and "config.json is missing" in out.stderr
  assert "Traceback" not in out.stderr


def test_wall_time_sums_the_logged_windows_up_to_the_evaluated_step():
  records = [{"step": 100, "steps_per_sec": 2.0}, {"step": 300, "steps_per_sec": 4.0},
             {"step": 400, "steps_per_sec": 1.0}]
  assert wall_seconds(records, 300) == pytest.approx(50 + 50)
  assert wall_seconds(records, 400) == pytest.approx(50 + 50 + 100)


def test_extra_columns_read_their_files_metrics_and_masking_verdicts(two_runs, tmp_path):
  """--column=LABEL=FILE:METRIC: one column per epsilon of that file's METRIC@eps, a dash
  where a run lacks the file; masking_checks counts the passed checks."""
  runs, env = two_runs
  natural = tmp_path / "natural"
  subprocess.run(["cp", "-r", str(runs["natural"]), str(natural)], check=True)
  record = json.loads((natural / "eval_test_robust.json").read_text())
  record["metrics"] = {"clean_accuracy": record["metrics"]["clean_accuracy"],
                       "alone_robust_accuracy@0.1": {"mean": 0.25, "ci95": 0.125}}
  record["masking_checks"] = {"results": [{"passed": True}, {"passed": False}, {"passed": True}]}
  (natural / "eval_test_extra.json").write_text(json.dumps(record))
  out = _run("experiments.compare", str(natural), str(runs["aq"]), "--markdown",
             f"--output_dir={tmp_path}", "--column=alone=eval_test_extra.json:alone_robust_accuracy",
             "--column=masking=eval_test_extra.json:masking_checks",
             "--column=pgd=eval_test_robust.json:robust_accuracy", env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [[c.strip() for c in line.strip("|").split("|")] for line in out.stdout.strip().splitlines()]
  assert lines[0][5:] == ["clean", "alone 0.1", "masking", "pgd 0.05", "pgd 0.1"]
  pgd = json.loads((natural / "eval_test_robust.json").read_text())["metrics"]
  assert lines[2][6:8] == ["25.00 +- 12.50%", "2/3 pass"]
  assert lines[2][8] == f"{100 * pgd['robust_accuracy@0.05']['mean']:.2f} +- " \
                        f"{100 * pgd['robust_accuracy@0.05']['ci95']:.2f}%"
  assert lines[3][6:8] == ["-", "-"]     # the aq run has no eval_test_extra.json
  bad = _run("experiments.compare", str(natural), "--column=nolabel", env=env)
  assert bad.returncode == 2 and "LABEL=FILE:METRIC" in bad.stderr and "Traceback" not in bad.stderr


def _robust_table(tmp_path, env, *args: str, **variables: str) -> subprocess.CompletedProcess:
  """experiments/robust_table.sh run in tmp_path (its results/compare/ lands there)."""
  env = {**env, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), **variables}
  return subprocess.run(["bash", str(REPO / "experiments" / "robust_table.sh"), *args],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_robust_table_script_prints_the_learners_table_of_its_rows(two_runs, tmp_path):
  """STAGES=learners: clean, the per-example worst case and the masking verdicts of the
  named rows under $OUT, figures named after $OUT."""
  runs, env = two_runs
  out_dir = tmp_path / "omniglot_5w5s_3k"
  out_dir.mkdir()
  for name, run in (("natural", "natural"), ("protonet_aq", "aq")):
    subprocess.run(["cp", "-r", str(runs[run]), str(out_dir / name)], check=True)
  out = _robust_table(tmp_path, env, "natural", "protonet_aq", STAGES="learners",
                      SHOT="5", OUT=str(out_dir))
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [[c.strip() for c in line.strip("|").split("|")] for line in out.stdout.strip().splitlines()]
  assert lines[0][5:] == ["clean", "per-example 0.05", "per-example 0.1", "masking checks"]
  assert [line[0] for line in lines[2:]] == ["natural", "protonet_aq"]
  robust = json.loads((out_dir / "natural" / "eval_test_robust.json").read_text())["metrics"]
  assert lines[2][7] == f"{100 * robust['robust_accuracy@0.1']['mean']:.2f} +- " \
                        f"{100 * robust['robust_accuracy@0.1']['ci95']:.2f}%"
  for figure in ("robust_learners_omniglot_5w5s_3k.png", "val_learners_omniglot_5w5s_3k.png"):
    assert (tmp_path / "results" / "compare" / figure).is_file()


def _copy_as_five_shot(run: pathlib.Path, dest: pathlib.Path) -> dict:
  """A copy of a tiny run whose config says k_shot=5 (the same row at another shot);
  returns the original config."""
  dest.parent.mkdir(parents=True, exist_ok=True)
  subprocess.run(["cp", "-r", str(run), str(dest)], check=True)
  config = json.loads((dest / "config.json").read_text())
  (dest / "config.json").write_text(json.dumps({**config, "k_shot": 5}))
  return config


def test_robust_table_script_puts_both_shots_in_one_table_with_a_task_column(two_runs, tmp_path):
  """SHOT="1 5": each row once per shot whose folder exists (a note for the others), the
  task from each config, and figures named after both shots."""
  runs, env = two_runs
  one, five = tmp_path / "results" / "omniglot_5w1s_3k", tmp_path / "results" / "omniglot_5w5s_3k"
  one.mkdir(parents=True)
  for name, run in (("natural", "natural"), ("protonet_aq", "aq")):
    subprocess.run(["cp", "-r", str(runs[run]), str(one / name)], check=True)
  config = _copy_as_five_shot(runs["aq"], five / "natural")
  out = _robust_table(tmp_path, env, "natural", "protonet_aq", STAGES="learners", SHOT="1 5")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "no results/omniglot_5w5s_3k/protonet_aq yet" in out.stderr
  lines = [[c.strip() for c in line.strip("|").split("|")] for line in out.stdout.strip().splitlines()]
  assert lines[0][:3] == ["run", "task", "model"]
  n = config["n_way"]
  assert [line[:2] for line in lines[2:]] == [
      ["natural", f"{n}-way 1-shot"], ["natural", f"{n}-way 5-shot"], ["protonet_aq", f"{n}-way 1-shot"]]
  robust = json.loads((five / "natural" / "eval_test_robust.json").read_text())["metrics"]
  assert lines[3][8] == f"{100 * robust['robust_accuracy@0.1']['mean']:.2f} +- " \
                        f"{100 * robust['robust_accuracy@0.1']['ci95']:.2f}%"
  for figure in ("robust_learners_omniglot_5way_3k.png", "val_learners_omniglot_5way_3k.png"):
    assert (tmp_path / "results" / "compare" / figure).is_file()


def test_figures_keep_one_line_per_run_when_two_runs_share_a_name(two_runs, tmp_path, monkeypatch):
  """The same row at two shots: both lines drawn, each named with its task."""
  from advmaml.eval import compare
  runs, _ = two_runs
  five = tmp_path / "5shot" / "natural"
  config = _copy_as_five_shot(runs["natural"], five)
  drawn = {}
  monkeypatch.setattr(compare.plots, "plot_robustness_curve",
                      lambda curves, path, **kw: drawn.setdefault("robust", sorted(curves)) and path)
  monkeypatch.setattr(compare.plots, "plot_validation_curves",
                      lambda curves, path, **kw: drawn.setdefault("val", sorted(curves)) and path)
  summaries = [compare.summarize(runs["natural"]), compare.summarize(five)]
  compare.write_figures(summaries, tmp_path)
  n = config["n_way"]
  assert drawn["robust"] == drawn["val"] == [f"natural ({n}-way 1-shot)", f"natural ({n}-way 5-shot)"]
  drawn.clear()
  compare.write_figures(summaries[:1], tmp_path)   # one task: the plain name
  assert drawn["val"] == ["natural"]


@pytest.mark.parametrize("variables, alone", [
    ({"SHOT": "1"}, True), ({"SHOT": "5"}, False), ({"SHOT": "5", "ALONE": "1"}, True),
    ({"SHOT": "1", "ALONE": "0"}, False)])
def test_robust_table_script_attacks_each_query_alone_for_one_shot_rows_only(tmp_path, variables,
                                                                             alone):
  """STAGES=eval: the evaluation's flags as the script passes them (a stand-in PYTHON
  records them); --attack_alone by default at 1 shot, not at 5, ALONE overriding."""
  out, calls = run_script_recording_python("robust_table.sh", "aq", cwd=tmp_path, STAGES="eval",
                                           **variables)
  assert out.returncode == 0, out.stderr
  (call,) = calls
  assert call.startswith("-m experiments.evaluate")
  assert ("--attack_alone" in call.split()) == alone
  assert "--attacks=pgd,margin,apgd" in call and "--attack_steps=20" in call


def test_robust_table_script_probes_the_large_epsilon_residue_summed_and_per_example(tmp_path):
  """STAGES=large_eps: three evaluations of the first 100 episodes at 0.3, the summed
  attacks at 20 and 100 steps and the per-example worst case at 20, each its own file."""
  out, calls = run_script_recording_python("robust_table.sh", "aq", cwd=tmp_path, SHOT="5",
                                           STAGES="large_eps")
  assert out.returncode == 0, out.stderr
  assert len(calls) == 3
  for call in calls:
    words = call.split()
    assert words[:2] == ["-m", "experiments.evaluate"]
    assert {"--episodes=100", "--seed=0", "--epsilons=0.3", "--attacks=pgd,margin,apgd"} <= set(words)
  outputs = [next(w for w in c.split() if w.startswith("--output=")) for c in calls]
  assert [o.rsplit("/", 1)[1] for o in outputs] == [
      "eval_test_large_eps_pgd20.json", "eval_test_large_eps_pgd100.json",
      "eval_test_large_eps_per_example20.json"]
  assert all(o.startswith("--output=results/omniglot_5w5s_3k/aq/") for o in outputs)
  summed = ["--noper_example" in c.split() for c in calls]
  steps = [next(w for w in c.split() if w.startswith("--attack_steps=")) for c in calls]
  assert summed == [True, True, False]
  assert steps == ["--attack_steps=20", "--attack_steps=100", "--attack_steps=20"]


@pytest.mark.parametrize("variables, args, message", [
    ({"SHOT": "3"}, ("natural",), "SHOT=3; use SHOT=1, SHOT=5"),
    ({"SHOT": "1 5", "STAGES": "eval"}, ("natural",), "train and evaluate one SHOT at a time"),
    ({"STAGES": "eval"}, ("nosuchrow",), "unknown row nosuchrow"),
    ({"STAGES": "eval", "ALONE": "yes"}, ("natural",), "ALONE=yes; use ALONE=1"),
    ({}, (), "usage:")])
def test_robust_table_script_refuses_bad_input_in_one_line(tmp_path, variables, args, message):
  out = _robust_table(tmp_path, dict(os.environ), *args, **variables)
  assert out.returncode == 2 and message in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1


def test_robust_table_script_keeps_only_the_final_checkpoint_in_results(tmp_path):
  """STAGES=train (a stand-in PYTHON; the workdir as a training leaves it): config.json,
  metrics.jsonl and checkpoint $STEPS replace the results folder's, no temp names left."""
  work = tmp_path / "runs" / "omniglot_5w1s_aq"
  for step in (2750, 3000):
    (work / "checkpoints" / str(step)).mkdir(parents=True)
    (work / "checkpoints" / str(step) / "state.pkl").write_text(f"step {step}")
  (work / "config.json").write_text("new config")
  (work / "metrics.jsonl").write_text("new metrics")
  kept = tmp_path / "out" / "aq"
  (kept / "checkpoints" / "1000").mkdir(parents=True)       # an earlier, shorter run's
  (kept / "config.json").write_text("old config")
  out, calls = run_script_recording_python("robust_table.sh", "aq", cwd=tmp_path, STAGES="train",
                                           RUNS=str(tmp_path / "runs"), OUT=str(tmp_path / "out"))
  assert out.returncode == 0, out.stderr
  assert len(calls) == 1 and calls[0].startswith("-m experiments.train")
  assert sorted(p.name for p in kept.iterdir()) == ["checkpoints", "config.json", "metrics.jsonl",
                                                    "train.log"]
  assert [p.name for p in (kept / "checkpoints").iterdir()] == ["3000"]
  assert (kept / "checkpoints" / "3000" / "state.pkl").read_text() == "step 3000"
  assert (kept / "config.json").read_text() == "new config"
  # A copy that fails (no such step in the workdir) leaves the kept checkpoint as it was.
  out, _ = run_script_recording_python("robust_table.sh", "aq", cwd=tmp_path, STAGES="train",
                                       STEPS="4000", RUNS=str(tmp_path / "runs"),
                                       OUT=str(tmp_path / "out"))
  assert out.returncode != 0
  assert [p.name for p in (kept / "checkpoints").iterdir()] == ["3000"]
  # So does a workdir without its metrics log: the script stops there.
  (work / "metrics.jsonl").unlink()
  (work / "config.json").write_text("newer config")
  out, _ = run_script_recording_python("robust_table.sh", "aq", cwd=tmp_path, STAGES="train",
                                       RUNS=str(tmp_path / "runs"), OUT=str(tmp_path / "out"))
  assert out.returncode != 0
  assert (kept / "metrics.jsonl").read_text() == "new metrics"
  assert [p.name for p in (kept / "checkpoints").iterdir()] == ["3000"]


@pytest.mark.parametrize("shot", ["1", "5"])
def test_robust_table_script_trains_the_transfer_rows_on_one_shot_batches(
    tmp_path, shot):
  """The transfer classifier sees 1 support + 1 query image per class of each episode at
  both shots (one classifier for both, as Goldblum et al.); the shot is the evaluation's."""
  out, calls = run_script_recording_python("robust_table.sh", "transfer_at", cwd=tmp_path,
                                           STAGES="train", SHOT=shot, RUNS=str(tmp_path / "runs"),
                                           OUT=str(tmp_path / "out"))
  train_call = calls[0].split()
  assert f"--preset=omniglot_5w{shot}s" in train_call and "--objective=transfer_at" in train_call
  # At 5 shots by flags; at 1 the preset's own shape (so the 1-shot workdirs resume as they are).
  assert ("--train_k_shot=1" in train_call and "--q_query=1" in train_call) == (shot == "5")
  out, calls = run_script_recording_python("robust_table.sh", "metaoptnet_aq", cwd=tmp_path,
                                           STAGES="train", SHOT=shot, RUNS=str(tmp_path / "runs"),
                                           OUT=str(tmp_path / "out"))
  assert not any(a.startswith(("--train_k_shot", "--q_query")) for a in calls[-1].split())
