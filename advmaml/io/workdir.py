"""The files of a training workdir: one writer at a time, atomic text, a metrics log that survives crashes.

Layout::

    train.lock             held (fcntl) by the one training process writing here; holds its pid
    config.json            resolved config of the run (atomic rewrite)
    metrics.jsonl          one JSON object per logged step (appended)
    tensorboard/           the same metrics as TensorBoard scalars (advmaml.io.tensorboard_scalars)
    tensorboard/evaluation/  the scalars of experiments.evaluate and evaluate_lake, a file each
    checkpoints/<step>/    see advmaml.io.checkpoint

A crash (SIGKILL, a full disk) can leave at most the last line of
``metrics.jsonl`` half written; `read_metrics` drops such a line with a
warning, and a resumed run rewrites the log up to its checkpoint's step.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pathlib

from absl import logging

LOCK_FILE = "train.lock"
METRICS_FILE = "metrics.jsonl"


class WorkdirError(Exception):
  """The workdir cannot be used; the message names the path, the problem and the fix."""


def describe_os_error(e: OSError, action: str = "write") -> str:
  """One line for an OSError: the file, the reason, and what to do about it."""
  # A rename's destination (filename2) is the path the user named, not our temp file.
  where = e.filename2 or e.filename or "the workdir"
  if e.errno == errno.ENOSPC:
    fix = "free disk space (or use a --workdir on another disk), then rerun the same command"
  elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
    fix = "use a --workdir you can write to"
  else:
    fix = "check the path, or use another --workdir (or --output)"
  return f"cannot {action} {where}: {e.strerror or e}; {fix}"


def is_training_workdir(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a training's workdir (a folder holding ``checkpoints/``), not one
  of its checkpoints (a step folder, ``checkpoints/`` itself or a ``state.pkl``)."""
  path = pathlib.Path(path)
  return path.is_dir() and (path / "checkpoints").is_dir()


def prepare_workdir(path: str | os.PathLike) -> pathlib.Path:
  """Creates ``path`` (and its parents) if missing; refuses a path that cannot be a workdir."""
  path = pathlib.Path(path)
  if path.exists() and not path.is_dir():
    raise WorkdirError(f"--workdir={path} is a file, not a folder; pass a folder (new or an "
                       "earlier run's) as --workdir")
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"--workdir={path}: {describe_os_error(e, 'create')}") from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise WorkdirError(f"--workdir={path} is not writable; use a --workdir you can write to")
  return path


class WorkdirLock:
  """An exclusive ``fcntl`` lock on ``<workdir>/train.lock`` for the life of a training.

  A second writer fails at once, naming the holder's pid. The kernel drops
  the lock when the holder exits, however it exits (SIGKILL included), so a
  stale lock file never blocks a resume. Readers (evaluation) take no lock.
  """

  def __init__(self, workdir: pathlib.Path):
    self.path = pathlib.Path(workdir) / LOCK_FILE
    self._fd: int | None = None

  def __enter__(self) -> "WorkdirLock":
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as e:
      raise WorkdirError(describe_os_error(e, "create the lock file")) from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
      os.close(fd)
      raise WorkdirError(
          f"{self.path.parent} is being written by another training (pid {holder}); wait "
          "for it to finish (or stop it), or use another --workdir") from None
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:
      os.close(fd)
      raise WorkdirError(describe_os_error(e)) from None
    self._fd = fd
    _remove_stale_temp_files(self.path.parent)
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      os.close(self._fd)   # releases the lock; the file stays (removing it would race)
      self._fd = None


def _remove_stale_temp_files(workdir: pathlib.Path) -> None:
  """Deletes the temp files of an `atomic_write_text` a killed writer left (under the lock: ours)."""
  for entry in workdir.glob(".*.tmp-*"):
    if entry.is_file() or entry.is_symlink():
      logging.info("Removing stale temp file %s", entry)
      entry.unlink(missing_ok=True)


def atomic_write_text(path: pathlib.Path, text: str) -> None:
  """Writes ``text`` to a temp file beside ``path``, then renames it over ``path``."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def dumps_record(record: dict) -> str:
  """One metrics line; refuses NaN/inf, which standard JSON cannot hold."""
  return json.dumps(record, allow_nan=False)


def read_metrics(path: pathlib.Path) -> list[dict]:
  """The records of a metrics log, dropping (with a warning) lines a crash tore.

  A line that is not one JSON object (the half-written last line of a full
  disk or a kill, or bytes that are not UTF-8) is left out and named.
  """
  path = pathlib.Path(path)
  if not path.exists():
    return []
  records, torn = [], []
  for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
    if not raw.strip():
      continue
    try:
      record = json.loads(raw.decode("utf-8"))
      if not isinstance(record, dict) or not isinstance(record.get("step", 0), int):
        raise ValueError("not a record")
    except ValueError:
      torn.append(number)
      continue
    records.append(record)
  if torn:
    logging.warning("%s: dropping %d torn or unreadable line(s) (line %s), left by a crash "
                    "or a full disk", path, len(torn), ", ".join(map(str, torn)))
  return records


def truncate_metrics(path: pathlib.Path, last_step: int) -> None:
  """Keeps the records up to ``last_step``, so a resumed log reads like an uninterrupted one."""
  path = pathlib.Path(path)
  if not path.exists():
    return
  kept = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
  atomic_write_text(path, "".join(dumps_record(r) + "\n" for r in kept))


def append_metrics(path: pathlib.Path, record: dict) -> None:
  """Appends one record as one write, so a crash can tear at most this line."""
  with open(path, "ab") as f:
    f.write((dumps_record(record) + "\n").encode("utf-8"))
