"""--keep_freed_memory, shared by the entry points that run jitted steps.

XLA's CPU runtime allocates each step's temporaries afresh; with glibc's
default settings those come from new pages every step, each page faulted in
and zero-filled by the kernel (see ``advmaml.runtime.host.keep_freed_memory``). The
benchmarks use it to compare against PyTorch under the same allocator
settings (``benchmarks/side_by_side.py --malloc=keep``); PyTorch, which
allocates per op, gains far more from it than our jitted step does.
"""

from __future__ import annotations

from absl import flags, logging

from advmaml.runtime import host

KEEP_FREED_MEMORY = flags.DEFINE_bool(
    "keep_freed_memory", False,
    "Tell glibc's malloc to keep and reuse freed memory (no mmap, no trimming), so that "
    "each step's temporaries do not page-fault afresh; the process keeps its peak heap "
    "until it exits. Off by default: it moved our steps by -4 to +8% on a 2-core Xeon, "
    "within the drift (docs/benchmark_notes.md section 14). No effect off Linux/glibc.")


def apply() -> bool:
  """Applies --keep_freed_memory; call first in main(). Returns whether it took effect."""
  if not KEEP_FREED_MEMORY.value:
    return False
  applied = host.keep_freed_memory()
  logging.info("keep_freed_memory: %s", "applied" if applied else "not glibc, left alone")
  return applied
