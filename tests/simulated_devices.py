"""Running a Python command in a subprocess on N simulated CPU devices.

The device count of a JAX process is fixed when JAX starts, so multi-device
tests run their probe in a fresh interpreter with XLA_FLAGS set.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def simulated_devices_env(devices: int) -> dict:
  """This process's environment with JAX on ``devices`` simulated CPU devices."""
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
          + f" --xla_force_host_platform_device_count={devices}"}


def run_on_devices(args: list[str], devices: int) -> subprocess.CompletedProcess:
  """``python *args`` from the repository root on ``devices`` simulated CPU devices."""
  return subprocess.run([sys.executable, *args], cwd=REPO, env=simulated_devices_env(devices),
                        capture_output=True, text=True, timeout=300)


def json_verdict_on_devices(args: list[str], devices: int) -> dict:
  """The JSON on the last stdout line of ``python *args``, which must succeed."""
  out = run_on_devices(args, devices)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])
