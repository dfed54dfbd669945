"""Shared fixtures: a small fake Omniglot in the official layout, isolated caches, float64.

Also a persistent XLA compilation cache for the whole test session: many
tests (and the entry points they start as subprocesses) compile the same
tiny programs, and on a 2-core CPU the suite is dominated by compile time.
It is set through the environment, before JAX is imported, so subprocesses
share it, and it lives in a fresh temporary folder, so no run reuses another's.

For the same reason the suite compiles without LLVM's optimisation passes
(``--xla_backend_optimization_level=0``, unless XLA_FLAGS already sets a level):
on the tests' tiny programs that cut the three slowest test groups from 340-370 s
to 207 s on 2 cores (2026-12-02), the programs' run time being small beside their
compile time. It also turns off the CPU backend's fusion emitters
(``--xla_cpu_use_fusion_emitters=false``; XLA's older loop emitter, same HLO): the
two second-order finite-difference groups (``test_maml`` and ``test_kernels``) took
54-60 s with it against 82-96 s without (2026-12-03, alternated), and the
run-heavy Lake evaluation command 41.8 s against 43.5 s, so no run time is lost.
Numerics are XLA's own either way (HLO is unchanged); every comparison of two
paths compiles both under the same flags.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

# Only the process that creates the folder removes it: xdist workers inherit
# the controller's, and a cache folder the user chose is left alone.
_JAX_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _JAX_CACHE = tempfile.mkdtemp(prefix="advmaml-test-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _JAX_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
for _flag, _value in (("--xla_backend_optimization_level", "0"),
                      ("--xla_cpu_use_fusion_emitters", "false")):
  if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(
        filter(None, (os.environ.get("XLA_FLAGS"), f"{_flag}={_value}")))

import pytest  # noqa: E402

from fake_omniglot import many_chars, write_zips

REPO = pathlib.Path(__file__).resolve().parents[1]

# 16 characters: enough for 3-way episodes in every split (rotations give 4 classes each).
NUM_BACKGROUND, NUM_EVALUATION = 10, 6


@pytest.fixture(scope="session")
def fake_omniglot_dir(tmp_path_factory) -> pathlib.Path:
  """A folder holding both zips of a 16-character Omniglot; read only by tests."""
  folder = tmp_path_factory.mktemp("fake_omniglot")
  write_zips(folder, chars=many_chars(NUM_BACKGROUND, NUM_EVALUATION))
  return folder


def run_module(module: str, *args: str, env: dict) -> subprocess.CompletedProcess:
  """``python -m module args`` from the repository root, output captured."""
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def assert_leaves_close_to_scale(got, want, rel: float, err_msg: str = "") -> None:
  """Each leaf of ``got`` within ``rel`` times the largest entry of ``want``'s leaf.

  For gradients whose small entries float32 summation order moves in proportion to
  the largest ones (the order depends on the CPU and the kernel): an entrywise
  rtol would fail there, while a wrong gradient is off by O(1) of the scale."""
  import jax  # here: JAX is configured from the environment above before its import
  import numpy as np
  got, want = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got) == len(want), err_msg
  for g, w in zip(got, want):
    g, w = np.asarray(g), np.asarray(w)
    assert g.shape == w.shape, err_msg
    assert np.abs(g - w).max() <= rel * np.abs(w).max(), err_msg


def run_script_recording_python(script: str, *args: str, cwd: pathlib.Path,
                                **variables: str) -> tuple[subprocess.CompletedProcess, list[str]]:
  """``bash experiments/<script> args`` in ``cwd`` with a stand-in PYTHON that only
  records its arguments: (the script's outcome, one line per python call)."""
  log, fake = cwd / "python_calls.txt", cwd / "python"
  fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
  fake.chmod(0o755)
  out = subprocess.run(["bash", str(REPO / "experiments" / script), *args], cwd=cwd,
                       env={**os.environ, "PYTHON": str(fake), **variables},
                       capture_output=True, text=True, timeout=60)
  return out, log.read_text().splitlines() if log.exists() else []


@pytest.fixture(scope="session")
def tiny_run(fake_omniglot_dir, tmp_path_factory) -> tuple[pathlib.Path, dict]:
  """(workdir, env): a 2-step ``--preset=tiny`` training on the fake Omniglot, and the
  environment entry-point tests run in. Tests may write their outputs into the workdir."""
  tmp = tmp_path_factory.mktemp("tiny_run")
  env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "xdg"), "JAX_PLATFORMS": "cpu"}
  work = tmp / "run"
  out = run_module("experiments.train", "--preset=tiny", f"--workdir={work}",
                   f"--data_dir={fake_omniglot_dir}", "--num_steps=2", env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  return work, env


DATA_DIR_VARIABLES = ("ADVMAML_DATA_DIR", "ADVMAML_CIFAR_DIR", "ADVMAML_MINI_IMAGENET_DIR",
                      "TFDS_DATA_DIR")


@pytest.fixture
def x64():
  """float64 arithmetic for one test (finite differences need it)."""
  import jax  # here: JAX is configured from the environment above before its import
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> pathlib.Path:
  """Keeps a test off the user's cache and data folders: a temp cache, no data-dir variables."""
  for name in DATA_DIR_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  return tmp_path / "xdg"


def pytest_unconfigure(config):
  del config
  if _JAX_CACHE is not None:
    shutil.rmtree(_JAX_CACHE, ignore_errors=True)
