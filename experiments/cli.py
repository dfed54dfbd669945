"""What the entry points share around main(): one-line errors, --trust_unverified,
comma-list flags and the output path next to the workdir.

A bad flag, file, checkpoint, data folder or workdir, a full disk or a
diverged run ends the command with one line on stderr, ``error: <what is
wrong and the fix>``, and a non-zero exit status (2: fix the command; 1: the
run or the machine failed), never a traceback.
"""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
import sys

from absl import app, flags

from advmaml.io.checkpoint import CheckpointError
from advmaml.config import ConfigError
from advmaml.data.omniglot import DataError
from advmaml.train.training import DivergedError
from advmaml.io.workdir import WorkdirError, describe_os_error
from experiments import malloc_flag

TRUST_UNVERIFIED = flags.DEFINE_bool(
    "trust_unverified", False,
    "Load checkpoints that have no metadata.json (no size or checksum to verify; still "
    "unpickled without running code). Off: such checkpoints are refused.")

# Errors whose message already names the problem and the fix.
_USAGE_ERRORS = (app.UsageError, ConfigError, DataError, CheckpointError, WorkdirError)


def fail(message: str, status: int = 2):
  """Ends the command with ``error: message`` on one line of stderr."""
  sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
  sys.stderr.flush()
  raise SystemExit(status)


@contextlib.contextmanager
def one_line_errors():
  """Turns the library's user-facing errors, and OSErrors, into `fail`."""
  try:
    yield
  except _USAGE_ERRORS as e:
    fail(str(e), 2)
  except DivergedError as e:
    fail(str(e), 1)
  except OSError as e:
    if e.errno is None:   # raised by advmaml with its own message (a missing --workdir, say)
      fail(str(e), 2)
    fail(describe_os_error(e), 1)   # a full disk, a vanished folder: name the file


def entry_point(body):
  """``main(argv)`` for ``app.run``: refuses positional arguments, applies
  --keep_freed_memory, and runs ``body()`` with one-line errors."""
  def main(argv):
    with one_line_errors():
      if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
      malloc_flag.apply()
      body()
  return main


def parse_list(flag: str, value: str) -> list[str]:
  """The entries of a comma-list flag (--<flag>); an empty one is a UsageError."""
  items = [s.strip() for s in value.split(",")] if value.strip() else []
  if any(not s for s in items):
    raise app.UsageError(f"--{flag}={value!r} has an empty entry; give a comma list without blanks")
  return items


def parse_radii(flag: str, value: str) -> tuple[float, ...]:
  """A comma list of distinct finite numbers >= 0 (attack or certification radii)."""
  radii = []
  for s in parse_list(flag, value):
    try:
      r = float(s)
    except ValueError:
      raise app.UsageError(f"--{flag}: {s!r} is not a number") from None
    if not math.isfinite(r) or r < 0:
      raise app.UsageError(f"--{flag}: {s!r} must be a finite number >= 0")
    radii.append(r)
  if len(set(radii)) != len(radii):
    raise app.UsageError(f"--{flag}={value!r} repeats a value")
  return tuple(radii)


def run_folder(workdir: str | os.PathLike) -> pathlib.Path:
  """Where outputs go: the workdir, or the folder of the checkpoint file given as --workdir."""
  workdir = pathlib.Path(workdir)
  return workdir if workdir.is_dir() else workdir.parent


def output_path(workdir: str | os.PathLike, output: str | None, name: str) -> pathlib.Path:
  """--output, else ``name`` in :func:`run_folder`."""
  return pathlib.Path(output) if output else run_folder(workdir) / name
