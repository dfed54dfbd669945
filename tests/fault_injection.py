r"""Kill a tiny training with SIGKILL at random points, rerun it, and check nothing was lost.

  python tests/fault_injection.py --trials=50 --output=results/reliability/fault_injection.json

Each trial trains the ``tiny`` preset on a small fake Omniglot (checkpoints
every step, a log line every 3 steps, validation every 10) in a fresh
workdir, kills it with SIGKILL at a random moment (once, or on odd trials
twice: the first rerun is killed too), then reruns the same command to the
end. After the final rerun it checks, against one uninterrupted run:

* the final meta-parameters and optimizer state are equal bit for bit;
* ``metrics.jsonl`` holds the same records (all values but the wall-clock
  ``steps_per_sec``);
* the workdir holds no temporary files or folders (``.tmp-*``).

Kill points: a fifth uniform over the start-up (before the lock, the config
write, the first step), two fifths at a random step of the loop plus a random
fraction of a step, and two fifths inside a checkpoint write (once checkpoint
n is on disk, as soon as the next one's temp folder appears). A later kill in
the same trial aims past the step the earlier one reached. For each kill the
script records whether a checkpoint temp folder was on disk after it. Exit
status 1 if any trial failed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from advmaml.io import checkpoint  # noqa: E402
from fake_omniglot import many_chars, write_zips  # noqa: E402

NUM_STEPS = 40
TRAIN_FLAGS = ("--preset=tiny", f"--num_steps={NUM_STEPS}", "--checkpoint_every=1", "--log_every=3",
               "--eval_every=10", "--keep_checkpoints=2")


def command(workdir: pathlib.Path, data_dir: pathlib.Path) -> list[str]:
  return [sys.executable, "-m", "experiments.train", *TRAIN_FLAGS, f"--workdir={workdir}",
          f"--data_dir={data_dir}"]


def final_state(workdir: pathlib.Path):
  step, tree = checkpoint.restore_latest(workdir / "checkpoints")
  return step, tree["meta_params"], tree["opt_state"]


def metric_records(workdir: pathlib.Path) -> list[dict]:
  return [{k: v for k, v in json.loads(line).items() if k != "steps_per_sec"}
          for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def leaves(tree) -> list[np.ndarray]:
  if isinstance(tree, dict):
    return [x for k in sorted(tree) for x in leaves(tree[k])]
  if isinstance(tree, (list, tuple)):
    return [x for v in tree for x in leaves(v)]
  return [np.asarray(tree)]


def bitwise_equal(a, b) -> bool:
  la, lb = leaves(a), leaves(b)
  return len(la) == len(lb) and all(
      x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
      for x, y in zip(la, lb))


def stray_temporaries(workdir: pathlib.Path) -> list[str]:
  return sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*") if ".tmp" in p.name)


def run_to_end(cmd, env) -> tuple[float, float]:
  """Runs cmd; returns (seconds to the first checkpoint folder, seconds in all)."""
  return _run(cmd, env, kill_at=None)


def _newest_step(ckpt_dir: pathlib.Path) -> int:
  try:
    return max((int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()), default=0)
  except OSError:   # a folder renamed away while listing
    return 0


def _writing(ckpt_dir: pathlib.Path) -> bool:
  try:
    return any(p.name.startswith(".tmp-") for p in ckpt_dir.iterdir())
  except OSError:
    return False


def _run(cmd, env, kill_at):
  """Starts cmd; kills it at ``kill_at = (mode, value)``, or (None) waits for it to end.

  modes: ("startup", seconds) counts from the start of the process;
  ("step", (n, seconds)) waits until checkpoint n is on disk, then that long;
  ("write", n) waits until checkpoint n is on disk, then kills as soon as the
  next checkpoint's temp folder appears (a kill inside a checkpoint write).
  """
  workdir = pathlib.Path(cmd[-2].split("=", 1)[1])
  ckpt_dir = workdir / "checkpoints"
  t0 = time.monotonic()
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  in_loop, lines = threading.Event(), []

  def read_stderr():
    for line in proc.stderr:
      lines.append(line)
      if "Meta-batch of" in line:
        in_loop.set()
  reader = threading.Thread(target=read_stderr, daemon=True)
  reader.start()
  if kill_at is None:
    loop_start = None
    while proc.poll() is None:
      if loop_start is None and in_loop.is_set():
        loop_start = time.monotonic() - t0
      time.sleep(0.005)
    reader.join()
    if proc.returncode != 0:
      raise RuntimeError(f"training failed (exit {proc.returncode}):\n{''.join(lines)[-3000:]}")
    return loop_start or 0.0, time.monotonic() - t0
  mode, value = kill_at
  if mode == "startup":
    deadline = t0 + value
    while proc.poll() is None and time.monotonic() < deadline:
      time.sleep(0.001)
  else:
    target = value[0] if mode == "step" else value
    while proc.poll() is None and not (in_loop.is_set() and _newest_step(ckpt_dir) >= target):
      time.sleep(0.0005)
    if mode == "step":
      deadline = time.monotonic() + value[1]
      while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0005)
    else:
      while proc.poll() is None and not _writing(ckpt_dir):
        pass   # spin: a checkpoint write lasts milliseconds
  if proc.poll() is not None:
    reader.join()
    return {"killed": False, "mode": mode, "exit": proc.returncode}
  os.kill(proc.pid, signal.SIGKILL)
  at = time.monotonic() - t0
  proc.wait()
  reader.join()
  steps = [s for s, _ in checkpoint.list_checkpoints(ckpt_dir)]
  return {"killed": True, "mode": mode, "at": value, "after_s": round(at, 3),
          "checkpoint_temp_on_disk": _writing(ckpt_dir) if ckpt_dir.exists() else False,
          "newest_step_on_disk": max(steps, default=None)}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--trials", type=int, default=50)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--output", default="results/reliability/fault_injection.json")
  args = parser.parse_args()
  rng = random.Random(args.seed)
  scratch = pathlib.Path(tempfile.mkdtemp(prefix="advmaml-faults-"))
  data_dir = scratch / "omniglot"
  data_dir.mkdir()
  write_zips(data_dir, chars=many_chars(10, 6))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XDG_CACHE_HOME": str(scratch / "cache"),
         "JAX_COMPILATION_CACHE_DIR": str(scratch / "xla-cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}

  reference = scratch / "reference"
  run_to_end(command(reference, data_dir), env)           # fills the compilation cache
  reference = scratch / "reference2"
  loop_start, total = run_to_end(command(reference, data_dir), env)
  loop = max(total - loop_start, 0.05)
  step_s = loop / NUM_STEPS
  ref_step, ref_params, ref_opt = final_state(reference)
  ref_metrics = metric_records(reference)
  print(f"uninterrupted run: {total:.2f} s, training loop {loop:.2f} s, step {ref_step}", flush=True)

  trials, failures = [], 0
  for t in range(args.trials):
    workdir = scratch / f"trial{t:03d}"
    kills, reached = [], 0
    for _ in range(1 + t % 2):
      u = rng.random()
      if u < 0.2:
        kill_at = ("startup", rng.uniform(0, loop_start))
      elif u < 0.6:
        kill_at = ("step", (rng.randint(reached, NUM_STEPS - 2), rng.uniform(0, step_s)))
      else:
        kill_at = ("write", rng.randint(reached, NUM_STEPS - 2))
      kills.append(_run(command(workdir, data_dir), env, kill_at))
      reached = kills[-1].get("newest_step_on_disk") or reached
    run_to_end(command(workdir, data_dir), env)
    step, params, opt = final_state(workdir)
    record = {
        "trial": t, "kills": kills, "final_step": step,
        "params_bitwise_equal": bitwise_equal(params, ref_params),
        "opt_state_bitwise_equal": bitwise_equal(opt, ref_opt),
        "metrics_equal": metric_records(workdir) == ref_metrics,
        "stray_temporaries": stray_temporaries(workdir),
    }
    record["ok"] = (step == ref_step and record["params_bitwise_equal"]
                    and record["opt_state_bitwise_equal"] and record["metrics_equal"]
                    and not record["stray_temporaries"])
    failures += not record["ok"]
    trials.append(record)
    print(json.dumps(record), flush=True)

  all_kills = [k for r in trials for k in r["kills"]]
  landed = [k for k in all_kills if k["killed"]]
  summary = {
      "command": " ".join(["python -m experiments.train", *TRAIN_FLAGS]),
      "trials": len(trials), "failed_trials": failures,
      "kills_sent": len(landed),
      "kills_while_a_checkpoint_temp_folder_was_on_disk":
          sum(k["checkpoint_temp_on_disk"] for k in landed),
      "kills_before_the_first_checkpoint": sum(k["newest_step_on_disk"] is None for k in landed),
      "kills_by_mode": {m: sum(k["mode"] == m for k in landed) for m in ("startup", "step", "write")},
      "processes_that_finished_before_the_kill": len(all_kills) - len(landed),
      "uninterrupted_seconds": round(total, 2), "training_loop_seconds": round(loop, 2),
      "seed": args.seed,
  }
  print(json.dumps(summary, indent=2), flush=True)
  output = REPO / args.output
  output.parent.mkdir(parents=True, exist_ok=True)
  tmp = output.with_name(f".{output.name}.tmp")
  tmp.write_text(json.dumps({"summary": summary, "trials": trials}, indent=1) + "\n")
  os.replace(tmp, output)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
