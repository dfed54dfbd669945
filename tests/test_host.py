"""advmaml.runtime.host.keep_freed_memory: freed blocks are reused instead of faulted in afresh."""

import subprocess
import sys
import textwrap

import pytest

from advmaml.runtime import host

# Allocates, touches and frees a 64 MiB block twice in a fresh process (so the
# setting does not leak into the test process) and prints the minor page
# faults of the second round, which is what every training step after the
# first pays for its temporaries.
_PROBE = textwrap.dedent("""
    import ctypes, resource, sys
    from advmaml.runtime import host
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


# -- one host device per usable core ------------------------------------------
# What an entry point sees: experiments.train sets XLA_FLAGS at import, then JAX starts.
_DEVICES_PROBE = textwrap.dedent("""
    import json, os, sys
    if len(sys.argv) > 1:   # as taskset would start it
      os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(",")})
    import experiments.train as entry
    import jax
    from advmaml.runtime import sharding
    print(json.dumps({"devices": jax.device_count(), "note": entry.HOST_DEVICES,
                      "xla_flags": os.environ.get("XLA_FLAGS", ""),
                      "dividing": [sharding.dividing_device_count(n) for n in (32, 9, 7)]}))
""")


def _probe_devices(env_changes: dict, cores: set | None = None) -> dict:
  import json, os  # pylint: disable=import-outside-toplevel,multiple-imports
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(env_changes)
  cpus = [",".join(map(str, sorted(cores)))] if cores else []
  out = subprocess.run([sys.executable, "-c", _DEVICES_PROBE, *cpus], capture_output=True,
                       text=True, env=env, cwd=host.__file__.rsplit("/advmaml/", 1)[0],
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity"), reason="Linux only")
def test_entry_points_default_to_one_host_device_per_usable_core():
  import os  # pylint: disable=import-outside-toplevel
  got = _probe_devices({"JAX_PLATFORMS": "cpu"})
  assert got["devices"] == len(os.sched_getaffinity(0)) == host.usable_cores()
  assert "one per usable core" in got["note"]
  # The count follows the affinity mask (taskset, a container's cpuset), not the machine.
  one_core = _probe_devices({}, cores={sorted(os.sched_getaffinity(0))[0]})
  assert one_core["devices"] == 1 and one_core["xla_flags"].endswith("device_count=1")


def test_the_users_xla_flags_win_and_other_platforms_are_left_alone(monkeypatch):
  got = _probe_devices({"JAX_PLATFORMS": "cpu",
                        "XLA_FLAGS": "--xla_force_host_platform_device_count=3"})
  assert got["devices"] == 3 and "as set by XLA_FLAGS" in got["note"]
  # 32 tasks split over 2 of the 3 devices, 9 over 3, 7 over 1.
  assert got["dividing"] == [2, 3, 1]
  # In this process as if JAX had not started (other tests may have imported it).
  monkeypatch.delitem(sys.modules, "jax", raising=False)
  env = {"JAX_PLATFORMS": "tpu"}
  assert host.use_all_cpu_cores(env) == "host devices: left alone (JAX_PLATFORMS=tpu)"
  assert env == {"JAX_PLATFORMS": "tpu"}
  env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_cpu_enable_fast_min_max=true"}
  host.use_all_cpu_cores(env)    # the user's other options are kept
  assert env["XLA_FLAGS"] == ("--xla_cpu_enable_fast_min_max=true "
                              f"--xla_force_host_platform_device_count={host.usable_cores()}")
  monkeypatch.setitem(sys.modules, "jax", sys)   # JAX already started: too late to set
  env = {"JAX_PLATFORMS": "cpu"}
  assert "left alone" in host.use_all_cpu_cores(env) and "XLA_FLAGS" not in env
