"""The host: CPU facts for benchmark records and kernel budgets, glibc's allocator
setting, and one simulated JAX device per CPU core.

Imports no JAX, so the PyTorch baseline (``benchmarks/pytorch_maml.py``)
records the same facts and can take the same allocator setting, and so the
entry points can set ``XLA_FLAGS`` before JAX starts (``use_all_cpu_cores``)."""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import platform
import sys


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


def usable_cores() -> int:
  """The cores this process may run on (its affinity mask on Linux, else the CPU count)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def cores_per_device(num_devices: int) -> int:
  """Each device's share of the usable cores when a step is split over ``num_devices``
  CPU devices: simulated CPU devices share this process's cores (at least 1 each)."""
  return max(1, usable_cores() // max(1, num_devices))


DEVICE_COUNT_OPTION = "--xla_force_host_platform_device_count"
# Distributions that give JAX a GPU or TPU backend (JAX then prefers it to the CPU).
_ACCELERATOR_PLUGINS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")


def _accelerator_plugin() -> str | None:
  for dist in importlib.metadata.distributions():
    name = (dist.metadata["Name"] or "").lower()
    if name.startswith(_ACCELERATOR_PLUGINS):
      return name
  return None


def use_all_cpu_cores(environ=os.environ) -> str:
  """On CPU, gives JAX one simulated host device per usable core; returns what it decided.

  Each of the devices then runs its share of the tasks concurrently: 1.6x
  faster meta-steps on two cores for ``omniglot_5w1s`` (docs/benchmark_notes.md
  section 15). Must run before JAX is imported (the device count is fixed when
  JAX starts), so the entry points call it first. Leaves ``XLA_FLAGS`` alone
  when the user's own names the option, when JAX_PLATFORMS asks for another
  platform, or when a GPU/TPU plugin is installed (JAX would run there).
  The returned sentence is for the log (absl logging is not set up yet).
  """
  flags = environ.get("XLA_FLAGS", "")
  if DEVICE_COUNT_OPTION in flags:
    return f"host devices: as set by XLA_FLAGS={flags!r}"
  if "jax" in sys.modules:
    return "host devices: left alone (JAX was imported before the count could be set)"
  platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms and platforms != "cpu":
    return f"host devices: left alone (JAX_PLATFORMS={platforms})"
  plugin = None if platforms == "cpu" else _accelerator_plugin()
  if plugin:
    return f"host devices: left alone ({plugin} is installed: JAX runs on the accelerator)"
  cores = usable_cores()
  environ["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_OPTION}={cores}".strip()
  return (f"host devices: {cores}, one per usable core ({DEVICE_COUNT_OPTION}={cores}; "
          f"your own XLA_FLAGS with {DEVICE_COUNT_OPTION} wins)")


# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
  """Tells glibc's malloc to reuse freed memory instead of returning it to the OS.

  XLA's CPU runtime allocates each step's temporaries afresh (B1: one 56 MiB block,
  B2: 163 MiB). glibc serves such large blocks with mmap and unmaps them on
  free (or trims them off the heap top), so every step touches new pages: the
  kernel zero-fills them one 4 KiB page fault at a time (B1: 14k faults per
  step). With mmap off and trimming off, the second step onwards reuses the
  same pages. Same effect as ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:
  glibc.malloc.trim_threshold=...``; the process keeps its peak heap size
  until it exits. Call it once, early, before the first step. Returns
  whether it applied (False off Linux/glibc, e.g. macOS or musl).

  Measured on a 2-core Xeon (docs/benchmark_notes.md section 14): our
  jitted steps moved -4 to +8% (within the drift), PyTorch's +1 to +32%.
  """
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement  (glibc only)
  except (OSError, AttributeError):
    return False
  return (libc.mallopt(_M_MMAP_MAX, 0) == 1
          and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1)
