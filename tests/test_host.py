"""advmaml.host.keep_freed_memory: freed blocks are reused instead of faulted in afresh."""

import subprocess
import sys
import textwrap

import pytest

from advmaml import host

# Allocates, touches and frees a 64 MiB block twice in a fresh process (so the
# setting does not leak into the test process) and prints the minor page
# faults of the second round, which is what every training step after the
# first pays for its temporaries.
_PROBE = textwrap.dedent("""
    import ctypes, resource, sys
    from advmaml import host
    applied = host.keep_freed_memory() if sys.argv[1] == "keep" else False
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
    def round_trip():
      block = libc.malloc(size)
      ctypes.memset(block, 1, size)
      libc.free(block)
    round_trip()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    round_trip()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _second_round_faults(mode: str) -> tuple[bool, int]:
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                       check=True).stdout.split()
  return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_keep_freed_memory_stops_refaulting_a_freed_block():
  _, system_faults = _second_round_faults("system")
  applied, kept_faults = _second_round_faults("keep")
  assert applied
  # 64 MiB is 16,384 pages of 4 KiB (fewer with transparent huge pages): glibc's
  # default serves the block by mmap and unmaps it on free, so it faults again.
  assert system_faults > 1000, system_faults
  assert kept_faults < 100, kept_faults


def test_keep_freed_memory_reports_whether_it_applied(monkeypatch):
  monkeypatch.setattr(sys, "platform", "darwin")
  assert host.keep_freed_memory() is False
