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

Kill times: a third are uniform over the whole process (start-up included:
before the lock, during the config write), the rest uniform over the
training loop (from the trainer's last log line before it), where each step
writes a checkpoint, so many kills land in a checkpoint write; the script records, for each kill, whether a checkpoint
temp folder was on disk at that moment. Exit status 1 if any trial failed.
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

from advmaml import checkpoint  # noqa: E402
from fake_omniglot import many_chars, write_zips  # noqa: E402

TRAIN_FLAGS = ("--preset=tiny", "--num_steps=40", "--checkpoint_every=1", "--log_every=3",
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
  return _run(cmd, env, kill_after=None)


def _run(cmd, env, kill_after):
  """Starts cmd; kills it after ``kill_after = (mode, seconds)``, or (None) waits for it.

  mode "process" counts from the start of the process, "loop" from the log
  line the trainer writes just before its loop ("Meta-batch of ...").
  """
  workdir = pathlib.Path(cmd[-2].split("=", 1)[1])
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
  if kill_after is None:
    loop_start = None
    while proc.poll() is None:
      if loop_start is None and in_loop.is_set():
        loop_start = time.monotonic() - t0
      time.sleep(0.005)
    reader.join()
    if proc.returncode != 0:
      raise RuntimeError(f"training failed (exit {proc.returncode}):\n{''.join(lines)[-3000:]}")
    return loop_start or 0.0, time.monotonic() - t0
  mode, delay = kill_after
  if mode == "loop":
    while proc.poll() is None and not in_loop.is_set():
      time.sleep(0.001)
  deadline = time.monotonic() + delay
  while proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.001)
  if proc.poll() is not None:
    reader.join()
    return {"killed": False, "mode": mode, "exit": proc.returncode}
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  reader.join()
  ckpt_dir = workdir / "checkpoints"
  in_write = ckpt_dir.exists() and any(p.name.startswith(".tmp-") for p in ckpt_dir.iterdir())
  steps = [s for s, _ in checkpoint.list_checkpoints(ckpt_dir)]
  return {"killed": True, "mode": mode, "after_s": round(delay, 4),
          "checkpoint_temp_on_disk": in_write, "newest_step_on_disk": max(steps, default=None)}


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
  ref_step, ref_params, ref_opt = final_state(reference)
  ref_metrics = metric_records(reference)
  print(f"uninterrupted run: {total:.2f} s, training loop {loop:.2f} s, step {ref_step}", flush=True)

  trials, failures = [], 0
  for t in range(args.trials):
    workdir = scratch / f"trial{t:03d}"
    kills = []
    for _ in range(1 + t % 2):
      if rng.random() < 1 / 3:
        kill_after = ("process", rng.uniform(0, total))
      else:
        kill_after = ("loop", rng.uniform(0, loop))
      kills.append(_run(command(workdir, data_dir), env, kill_after))
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
