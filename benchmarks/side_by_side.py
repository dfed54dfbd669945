r"""Ours against the PyTorch reference, interleaved, so that drift cancels in the ratios.

  python benchmarks/side_by_side.py --rounds=3 --output=results/benchmarks/side-by-side-epyc.json

On a shared CPU the two frameworks' throughputs drift by 15-20% between runs a
few minutes apart, more than the effects being compared. This runs, for each
round and each workload, ``python -m experiments.benchmark`` and then
``benchmarks/pytorch_maml.py`` for the same workload, each as its own process
(one timed repeat of ``--min_seconds``; compilation and warm-up excluded), and
reports per workload both throughputs and the ratio ours / PyTorch of each
round, with the median and min-max over rounds. ``--malloc=keep`` runs both
sides with glibc's malloc reusing freed memory (``advmaml.runtime.host.
keep_freed_memory``), which PyTorch gains up to 32% from (notes section 14).
``--cpu_devices=N`` runs our workloads with their tasks split over N
simulated CPU devices (``--num_devices``). Needs PyTorch
(``pip install torch==2.13.0``).
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent


def _throughput(cmd: list[str], env: dict | None = None) -> tuple[float, dict]:
  with tempfile.TemporaryDirectory() as folder:
    out = os.path.join(folder, "r.json")
    subprocess.run(cmd + [f"--output={out}"], check=True, cwd=HERE.parent, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out) as f:
      record = json.load(f)
  (work,) = record["workloads"]
  return work["throughput_median"], record["machine"]


def _summary(values: list[float]) -> dict:
  return {"median": statistics.median(values), "min": min(values), "max": max(values),
          "rounds": values}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="B1,B2,B3,B4")
  parser.add_argument("--model", choices=("maxpool", "strided"), default="maxpool")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--min_seconds", type=float, default=20.0)
  parser.add_argument("--malloc", choices=("system", "keep"), default="system",
                      help="glibc malloc settings for both processes: system (glibc's defaults, "
                      "as each framework runs out of the box) or keep (reuse freed memory "
                      "instead of page-faulting it afresh; --keep_freed_memory on both sides)")
  parser.add_argument("--cpu_devices", type=int, default=1,
                      help="ours only: split each workload's tasks over this many "
                      "simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count, "
                      "--num_devices); the devices run their tasks concurrently")
  parser.add_argument("--output", help="JSON output path (default: print only)")
  args = parser.parse_args()
  names = [n for n in args.configs.split(",") if n]
  if args.rounds < 1 or args.min_seconds <= 0 or not names or args.cpu_devices < 1:
    parser.error("--rounds, --min_seconds and --cpu_devices must be positive and --configs "
                 "non-empty")
  suffix = "-strided" if args.model == "strided" else ""
  timing = ["--repeats=1", "--min_steps=1000", f"--min_seconds={args.min_seconds}"]
  keep = args.malloc == "keep"  # the same allocator setting on both sides
  ours_malloc = ["--keep_freed_memory" if keep else "--nokeep_freed_memory"]
  torch_malloc = ["--keep_freed_memory"] if keep else []
  ours_env, ours_devices = None, []
  if args.cpu_devices > 1:
    ours_env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") +
                f" --xla_force_host_platform_device_count={args.cpu_devices}"}
    ours_devices = [f"--num_devices={args.cpu_devices}"]
  ours, theirs, machine = {n: [] for n in names}, {n: [] for n in names}, {}
  for r in range(args.rounds):
    for name in names:
      ours_rate, machine["ours"] = _throughput(
          [sys.executable, "-m", "experiments.benchmark", f"--config={name}{suffix}", *timing,
           *ours_malloc, *ours_devices], ours_env)
      torch_rate, machine["pytorch"] = _throughput(
          [sys.executable, str(HERE / "pytorch_maml.py"), f"--config={name}",
           f"--model={args.model}", *timing, *torch_malloc])
      ours[name].append(ours_rate)
      theirs[name].append(torch_rate)
      print(f"round {r + 1} {name}{suffix:<9} ours {ours_rate:8.3f}  pytorch {torch_rate:8.3f}  "
            f"ratio {ours_rate / torch_rate:5.2f}", flush=True)
  results = {}
  for name in names:
    ratios = [a / b for a, b in zip(ours[name], theirs[name])]
    results[name + suffix] = {"ours": _summary(ours[name]), "pytorch": _summary(theirs[name]),
                              "ratio": _summary(ratios)}
    print(f"{name}{suffix:<9} ours {statistics.median(ours[name]):8.3f}  "
          f"pytorch {statistics.median(theirs[name]):8.3f}  ratio median "
          f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]")
  record = {"machine": machine, "workloads": results,
            "settings": {"rounds": args.rounds, "min_seconds": args.min_seconds,
                         "model": args.model, "malloc": args.malloc,
                         "cpu_devices": args.cpu_devices}}
  if args.output:
    path = pathlib.Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
  else:
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
  main()
