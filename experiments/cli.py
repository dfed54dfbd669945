"""What the entry points share around main(): one-line errors and --trust_unverified.

A bad flag, file, checkpoint, data folder or workdir, a full disk or a
diverged run ends the command with one line on stderr, ``error: <what is
wrong and the fix>``, and a non-zero exit status (2: fix the command; 1: the
run or the machine failed), never a traceback.
"""

from __future__ import annotations

import contextlib
import sys

from absl import app, flags

from advmaml.checkpoint import CheckpointError
from advmaml.config import ConfigError
from advmaml.data.omniglot import DataError
from advmaml.training import DivergedError
from advmaml.workdir import WorkdirError, describe_os_error

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
