r"""Hashes of the compiled programs of benchmark workloads, to show a change left them alone.

  python benchmarks/hlo_hash.py B1 B2 B1-strided B2-strided
  XLA_FLAGS=--xla_force_host_platform_device_count=2 \
    python benchmarks/hlo_hash.py --num_devices=2 B1 B2

Prints one JSON line per workload: the SHA-256 of the optimised HLO text of its
jitted step (``fn.lower(...).compile().as_text()``) with the ``metadata={...}``
attributes (source lines, op names) and the tables of source files and stack
frames they point into removed, so that only the program counts.
Equal hashes before and after a change: the same program runs, so its speed stands.
``hlo_sha256_renamed`` hashes the text with every instruction and computation name
renamed in order of first appearance: equal when two programs are the same up to
XLA's numbering of names (which shifts when, e.g., a custom VJP becomes a custom JVP).
"""

import argparse
import hashlib
import json
import pathlib
import re

import jax.numpy as jnp
import numpy as np

from advmaml.bench import benchmark

_METADATA = re.compile(r",?\s*metadata=\{[^{}]*\}")
# The tables of source files, functions and stack frames the metadata points into.
_STACK_TABLES = re.compile(r"^FileNames\n.*?^StackFrames\n.*?^\n", re.MULTILINE | re.DOTALL)


def program_text(fn, args) -> str:
  """fn's compiled HLO text for args, without metadata and source tables."""
  return _STACK_TABLES.sub("", _METADATA.sub("", fn.lower(*args).compile().as_text()))


_NAME = re.compile(r"%?[A-Za-z_][\w\-]*\.\d+(?:\.\d+)*")


def renamed(text: str) -> str:
  """text with each numbered name (%fusion.12, fused_computation.3, ...) replaced by
  its order of first appearance: the same program with other numbering reads the same."""
  names = {}
  return _NAME.sub(lambda m: names.setdefault(m.group(0), f"%n{len(names)}"), text)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("workloads", nargs="+", help="names of advmaml.bench.benchmark.WORKLOADS")
  parser.add_argument("--num_devices", type=int, default=1)
  parser.add_argument("--overrides", default="{}", help="JSON of config fields, e.g. kernels")
  parser.add_argument("--dump_dir", default=None, help="also write each program's text here")
  args = parser.parse_args()
  pool = jnp.asarray(np.random.default_rng(0).integers(0, 256, (64, 20, 28, 28), dtype=np.uint8))
  for name in args.workloads:
    work = benchmark.WORKLOADS[name]
    overrides = json.loads(args.overrides)
    if overrides:
      work = benchmark.with_overrides(work, overrides)
    fn, fn_args, _ = benchmark._build(work, pool, args.num_devices)
    text = program_text(fn, fn_args)
    if args.dump_dir:
      pathlib.Path(args.dump_dir, f"{work.name}-{args.num_devices}dev.hlo").write_text(text)
    sha = lambda t: hashlib.sha256(t.encode()).hexdigest()
    print(json.dumps({"workload": work.name, "num_devices": args.num_devices,
                      "hlo_sha256": sha(text), "hlo_sha256_renamed": sha(renamed(text))}),
          flush=True)


if __name__ == "__main__":
  main()
