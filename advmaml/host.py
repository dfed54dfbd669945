"""Facts about the host CPU, for benchmark records. Imports no JAX, so the
PyTorch baseline (``benchmarks/pytorch_maml.py``) records the same facts."""

from __future__ import annotations

import platform


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor().

  Recorded because the "same" 2-core machine kind has been different CPUs on
  different days (measured matmul peaks of 316, 205 and 119 GFLOP/s), and
  throughput numbers are only comparable on one CPU.
  """
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"
