r"""Where a benchmark workload's step spends its time: per-op totals from a JAX trace.

  python benchmarks/profile_step.py --config=B1 --steps=5 > results/benchmarks/profile-B1.txt
  python benchmarks/profile_step.py --config=B1 --overrides='{"conv_impl": "winograd"}'
  XLA_FLAGS=--xla_force_host_platform_device_count=2 \
      python benchmarks/profile_step.py --config=B1 --num_devices=2   # ms summed over devices

Builds the same jitted step as ``python -m experiments.benchmark`` (the
library's real train step), runs it twice off the clock, traces ``--steps``
steps with ``jax.profiler`` (perfetto JSON), and prints milliseconds per step
summed per op name and per op kind (the name without its numeric suffix, e.g.
all ``ynn_fusion.N`` together). Profiler and host-side wait events are listed
too; the device ops are the fusions, copies and concatenations.
"""

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from advmaml.bench import benchmark


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="B1", help=f"one of {sorted(benchmark.WORKLOADS)}")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--overrides", default="{}", help="JSON of config fields, e.g. conv_impl")
  parser.add_argument("--top", type=int, default=30)
  parser.add_argument("--num_devices", type=int, default=1,
                      help="split the step over this many devices, as the benchmark's --num_devices")
  args = parser.parse_args()
  if args.config not in benchmark.WORKLOADS:
    parser.error(f"--config={args.config!r}: choose from {sorted(benchmark.WORKLOADS)}")
  work = benchmark.WORKLOADS[args.config]
  overrides = json.loads(args.overrides)
  if overrides:
    work = benchmark.with_overrides(work, overrides)
  pool = jnp.asarray(np.random.default_rng(0).integers(0, 256, (64, 20, 28, 28), dtype=np.uint8))
  fn, fn_args, _ = benchmark._build(work, pool, args.num_devices)
  state, rest = fn_args[0], fn_args[1:]
  for _ in range(2):  # compile and warm up
    state, out = fn(state, *rest)
    jax.block_until_ready(out)
  with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder, create_perfetto_trace=True):
      for _ in range(args.steps):
        state, out = fn(state, *rest)
        jax.block_until_ready(out)
    (path,) = glob.glob(f"{folder}/**/*perfetto_trace.json.gz", recursive=True)
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  per_op, calls, per_kind = collections.Counter(), collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "dur" in e:
      name = e.get("name", "")
      per_op[name] += e["dur"]
      calls[name] += 1
      per_kind[re.sub(r"[._\d]+$", "", name.split(".")[0])] += e["dur"]
  print(f"{work.name}: {args.steps} traced steps; milliseconds per step")
  print("by op:")
  for name, us in per_op.most_common(args.top):
    print(f"{us / 1e3 / args.steps:9.2f}  x{calls[name] // args.steps:<4} {name[:100]}")
  print("by kind:")
  for name, us in per_kind.most_common(args.top):
    print(f"{us / 1e3 / args.steps:9.2f}  {name[:80]}")


if __name__ == "__main__":
  main()
