r"""Two versions of the library, interleaved on the same machine: does a change regress speed?

  git worktree add --detach /tmp/before <commit>
  python benchmarks/before_after.py --before=/tmp/before --rounds=2 \
      --output=results/benchmarks/before-after-<what>.json

For each round and each workload (B1-B4, max-pool and strided by default) this
runs ``python -m experiments.benchmark`` in the ``--before`` checkout and then
in this one, each as its own process (one timed repeat of ``--min_seconds``,
compilation and warm-up excluded), and reports both throughputs and the ratio
after / before per round, with the median and min-max over rounds. Same host,
same flags, same device layout (``--cpu_devices`` simulated CPU devices, 2 by
default: one per core on the 2-core machine); a ratio within the rounds' spread
of 1 is no change.
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


def throughput(tree: pathlib.Path, config: str, min_seconds: float, min_steps: int,
               devices: int) -> tuple[float, dict]:
  """Meta-steps (or episodes) per second of one workload, run from the checkout ``tree``
  with its tasks split over ``devices`` simulated CPU devices (set explicitly, so that
  versions from before the all-cores default run the same layout)."""
  with tempfile.TemporaryDirectory() as folder:
    out = os.path.join(folder, "r.json")
    env = {**os.environ, "PYTHONPATH": str(tree),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    subprocess.run([sys.executable, "-m", "experiments.benchmark", f"--config={config}",
                    "--repeats=1", f"--min_steps={min_steps}", f"--min_seconds={min_seconds}",
                    f"--num_devices={devices}", f"--output={out}"], check=True, cwd=tree, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record = json.loads(pathlib.Path(out).read_text())
  (work,) = record["workloads"]
  return work["throughput_median"], record["machine"]


def pytorch_throughput(config: str, min_seconds: float, min_steps: int) -> tuple[float, dict]:
  """The PyTorch baseline (benchmarks/pytorch_maml.py) on the same workload, same timing."""
  name, _, variant = config.partition("-")
  with tempfile.TemporaryDirectory() as folder:
    out = os.path.join(folder, "r.json")
    subprocess.run([sys.executable, str(HERE / "pytorch_maml.py"), f"--config={name}",
                    f"--model={variant or 'maxpool'}", "--repeats=1", f"--min_steps={min_steps}",
                    f"--min_seconds={min_seconds}", f"--output={out}"], check=True,
                   cwd=HERE.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record = json.loads(pathlib.Path(out).read_text())
  (work,) = record["workloads"]
  return work["throughput_median"], record["machine"]


def git_head(tree: pathlib.Path) -> str:
  return subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True,
                        text=True, check=True).stdout.strip()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--before", required=True, help="a checkout of the earlier version")
  parser.add_argument("--configs", default="B1,B2,B3,B4,B1-strided,B2-strided,B3-strided,"
                                           "B4-strided")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--min_seconds", type=float, default=10.0)
  parser.add_argument("--cpu_devices", type=int, default=2, help="simulated CPU devices")
  parser.add_argument("--pytorch", action="store_true",
                      help="also run the PyTorch baseline in each round (ratio after / pytorch)")
  parser.add_argument("--min_steps", type=int, default=1000,
                      help="timed steps at least, as well as --min_seconds")
  parser.add_argument("--output", help="JSON output path (default: print only)")
  args = parser.parse_args()
  before, after = pathlib.Path(args.before).resolve(), HERE.parent
  if not (before / "experiments" / "benchmark.py").exists():
    parser.error(f"--before={args.before} is not an advmaml checkout (no experiments/benchmark.py)")
  names = [n for n in args.configs.split(",") if n]
  rates = {n: {"before": [], "after": [], "pytorch": []} for n in names}
  machine = {}
  for r in range(args.rounds):
    for name in names:
      for side, tree in (("before", before), ("after", after)):
        rate, machine[side] = throughput(tree, name, args.min_seconds, args.min_steps,
                                         args.cpu_devices)
        rates[name][side].append(rate)
      b, a = rates[name]["before"][-1], rates[name]["after"][-1]
      line = f"round {r + 1} {name:<11} before {b:8.3f}  after {a:8.3f}  ratio {a / b:5.3f}"
      if args.pytorch:
        rate, machine["pytorch"] = pytorch_throughput(name, args.min_seconds, args.min_steps)
        rates[name]["pytorch"].append(rate)
        line += f"  pytorch {rate:8.3f}  after/pytorch {a / rate:5.2f}"
      print(line, flush=True)
  summary = lambda v: {"median": statistics.median(v), "min": min(v), "max": max(v), "rounds": v}
  results = {}
  for name in names:
    ratios = [a / b for a, b in zip(rates[name]["after"], rates[name]["before"])]
    results[name] = {"before": summary(rates[name]["before"]),
                     "after": summary(rates[name]["after"]), "ratio": summary(ratios)}
    line = (f"{name:<11} ratio after/before median {statistics.median(ratios):.3f} "
            f"[{min(ratios):.3f}-{max(ratios):.3f}]")
    if args.pytorch:
      vs = [a / t for a, t in zip(rates[name]["after"], rates[name]["pytorch"])]
      vs_before = [b / t for b, t in zip(rates[name]["before"], rates[name]["pytorch"])]
      results[name].update(pytorch=summary(rates[name]["pytorch"]),
                           after_vs_pytorch=summary(vs), before_vs_pytorch=summary(vs_before))
      line += (f"  vs pytorch: after {statistics.median(vs):.2f} [{min(vs):.2f}-{max(vs):.2f}]"
               f", before {statistics.median(vs_before):.2f}")
    print(line)
  record = {"machine": machine, "workloads": results,
            "commits": {"before": git_head(before), "after": git_head(after)},
            "settings": {"rounds": args.rounds, "min_seconds": args.min_seconds,
                         "min_steps": args.min_steps,
                         "cpu_devices": args.cpu_devices, "pytorch": args.pytorch}}
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
