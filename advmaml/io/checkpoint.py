"""Crash-safe checkpoints of numpy pytrees whose loading never runs code.

Layout (orbax-like)::

    <ckpt_dir>/<step>/state.pkl      pickled tree of plain containers and arrays
    <ckpt_dir>/<step>/metadata.json  {"step", "format_version", "sha256",
                                      "nbytes", "time"}

Design notes:

* Everything is converted to numpy before pickling (``jax.device_get``)
  because pickles of ``jax.Array`` break across JAX versions.
* Loading goes through `advmaml.io.safe_pickle`, which resolves only checking
  stand-ins for a few numpy globals and refuses every other global before it
  can be called; the same allowed-types walk checks trees before saving.
* A step folder appears atomically: files are written and fsynced in a
  ``.tmp-*`` folder that is then renamed to ``<step>``.  Folders are deleted by
  first renaming them to ``.tmp-*`` as well, so a crash never leaves a
  half-deleted step folder.  One writer per checkpoint directory is assumed
  (training holds a lock on its workdir, `advmaml.io.workdir.WorkdirLock`).
* Reading trusts nothing on disk: a step folder must be a real folder (not a
  symbolic link), ``state.pkl`` and ``metadata.json`` regular files (no FIFO,
  device or link, opened without following links and without blocking), and
  ``state.pkl`` is read only up to the size its metadata gives.  A checkpoint
  without metadata is refused unless the caller opts in (``trust_unverified``).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import pickle
import re
import secrets
import shutil
import stat
import time
from typing import Any, Callable, TypeVar

from absl import logging
import jax
import numpy as np

from advmaml.io import safe_pickle

__all__ = [
    "CheckpointError",
    "FORMAT_VERSION",
    "list_checkpoints",
    "load_checkpoint",
    "restore_latest",
    "safe_loads",
    "save_checkpoint",
]

FORMAT_VERSION = 1
STATE_FILE = "state.pkl"
METADATA_FILE = "metadata.json"
_TMP_PREFIX = ".tmp-"
_STEP_RE = re.compile(r"[0-9]+")
# Metadata is a few hundred bytes; anything larger is not ours.
_MAX_METADATA_BYTES = 1 << 20
# Without metadata there is no size to check against: a bound that any real
# checkpoint of this library stays under (a ResNet-12 with Adam is ~150 MB).
MAX_UNVERIFIED_BYTES = 4 << 30
# Protocol 4 keeps array bytes in-band (protocol 5 may use out-of-band buffers).
_PICKLE_PROTOCOL = 4

# What a checkpoint may hold: plain containers with str keys, Python scalars
# and numeric (incl. complex and ml_dtypes) numpy arrays; never bytes.
_RULES = safe_pickle.Rules(
    refused_global=("checkpoints may only contain plain containers, Python "
                    "scalars and numeric numpy arrays"),
    refused_type=("convert to plain containers (dict with str keys, list, "
                  "tuple), Python scalars, None or numeric numpy arrays"),
    kinds="biufc", ml_dtypes=True, writable=True)


class CheckpointError(Exception):
  """A checkpoint cannot be used; the message names file, problem and fix."""


def _to_numpy(leaf: Any) -> Any:
  """Moves jax arrays to host numpy arrays; other values pass through."""
  if isinstance(leaf, jax.Array):
    return np.asarray(jax.device_get(leaf))
  return leaf


def _raise_type_error(path: str, message: str):
  raise TypeError(f"{path}: {message}")


def _plain_tree(tree: Any) -> Any:
  """Checks `tree` for save and returns a copy with jax arrays as numpy."""
  return safe_pickle.check_tree(tree, _RULES, "state", _raise_type_error,
                                _to_numpy)


def safe_loads(data: bytes, *, source: str = "<bytes>") -> Any:
  """Unpickles a checkpoint payload without running any code from it.

  Args:
    data: bytes written by `save_checkpoint` (or any pickle of the allowed
      types, including files from numpy 1.x).
    source: name used in error messages (normally the file path).

  Returns:
    The tree, made of dict/list/tuple, Python scalars, None, numeric numpy
    arrays and numpy scalars.

  Raises:
    CheckpointError: a refused global/dtype, or a truncated or corrupt pickle.
  """
  try:
    return safe_pickle.loads(data, _RULES, "state")
  except safe_pickle.Refused as e:
    raise CheckpointError(
        f"{source}: {e}. The file is not a valid advmaml checkpoint and was "
        "not executed; only load checkpoints you trust and re-create this "
        "one with save_checkpoint") from None
  except Exception as e:  # pylint: disable=broad-except
    # Truncation surfaces as EOFError/UnpicklingError/ValueError/... anywhere
    # in the stream (MemoryError included), so any other failure means the
    # bytes are damaged and restore_latest may fall back.
    raise CheckpointError(
        f"{source}: checkpoint is truncated or corrupt "
        f"({type(e).__name__}: {e}); delete it and restore an earlier "
        "step") from None


# ---------------------------------------------------------------------------
# Filesystem layout.
# ---------------------------------------------------------------------------


def _fsync_dir(path: pathlib.Path) -> None:
  """Persists directory entries (renames, new files) where supported."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:  # e.g. Windows cannot open directories.
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _write_synced(path: pathlib.Path, data: bytes) -> None:
  with open(path, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def _new_tmp_dir(ckpt_dir: pathlib.Path, label: str) -> pathlib.Path:
  # os.mkdir (unlike tempfile.mkdtemp) honours the umask, so a renamed step
  # folder gets normal permissions.
  path = ckpt_dir / f"{_TMP_PREFIX}{label}-{secrets.token_hex(6)}"
  os.mkdir(path)
  return path


def _remove_dir(ckpt_dir: pathlib.Path, path: pathlib.Path) -> None:
  """Deletes `path` via an atomic rename to a temp name first."""
  trash = ckpt_dir / f"{_TMP_PREFIX}del-{path.name}-{secrets.token_hex(6)}"
  os.rename(path, trash)
  if _is_real_dir(trash):
    shutil.rmtree(trash, ignore_errors=True)
  else:
    trash.unlink(missing_ok=True)   # a link (or file) in a step's place: never followed


def _remove_stale_tmp(ckpt_dir: pathlib.Path) -> None:
  for entry in ckpt_dir.iterdir():
    if not entry.name.startswith(_TMP_PREFIX):
      continue
    logging.info("Removing stale checkpoint temp entry %s", entry)
    if entry.is_symlink() or not entry.is_dir():
      entry.unlink(missing_ok=True)   # never follow a link out of the folder
    else:
      shutil.rmtree(entry, ignore_errors=True)


def _step_entries(ckpt_dir: pathlib.Path) -> list[tuple[int, pathlib.Path]]:
  """All digit-named entries (folders, links, files), ascending by step."""
  if not ckpt_dir.is_dir():
    return []
  found = [(int(p.name), p) for p in ckpt_dir.iterdir() if _STEP_RE.fullmatch(p.name)]
  return sorted(found, key=lambda item: (item[0], item[1].name))


def _is_real_dir(path: pathlib.Path) -> bool:
  """A folder that is not a symbolic link (is_dir alone follows links)."""
  try:
    return stat.S_ISDIR(os.lstat(path).st_mode)
  except OSError:
    return False


def _step_dirs(ckpt_dir: pathlib.Path) -> list[tuple[int, pathlib.Path]]:
  """Digit-named real folders (complete or not), ascending by step."""
  return [(step, p) for step, p in _step_entries(ckpt_dir) if _is_real_dir(p)]


def list_checkpoints(ckpt_dir) -> list[tuple[int, pathlib.Path]]:
  """Returns (step, folder) of complete checkpoints, ascending by step.

  Only digit-named folders holding a state file count; ``.tmp-*`` folders from
  an interrupted save and any other names are ignored.  A missing directory
  gives an empty list.
  """
  return [(step, path) for step, path in _step_dirs(pathlib.Path(ckpt_dir))
          if (path / STATE_FILE).is_file()]


def _prune(ckpt_dir: pathlib.Path, keep: int | None,
           just_saved: pathlib.Path) -> None:
  """Keeps the folder just written plus the newest others, `keep` in all."""
  if keep is None:
    return
  others = [path for _, path in _step_dirs(ckpt_dir) if path != just_saved]
  for path in others[:max(len(others) - (keep - 1), 0)]:
    logging.info("Pruning old checkpoint %s", path)
    _remove_dir(ckpt_dir, path)


def save_checkpoint(ckpt_dir, step: int, tree: Any,
                    keep: int | None = 3) -> pathlib.Path:
  """Atomically writes `tree` as ``<ckpt_dir>/<step>`` and prunes old steps.

  Args:
    ckpt_dir: checkpoint directory; created if missing.
    step: non-negative training step, used as the folder name.  An existing
      folder for the same step is replaced.
    tree: pytree of dict (str keys), list, tuple, int, float, bool, str, None,
      numeric/bool numpy arrays or scalars, and jax arrays (stored as numpy).
    keep: how many step folders to keep (the one just written always stays);
      None keeps all.

  Returns:
    The step folder.

  Raises:
    TypeError: `tree` holds a disallowed value; the message names its path,
      e.g. ``state['opt_state'][0]``.  Nothing is written in that case.
  """
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
    raise TypeError(f"step must be an int, got {type(step).__name__}")
  step = int(step)
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}")
  if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int)
                           or keep < 1):
    raise ValueError(f"keep must be a positive int or None, got {keep!r}")

  data = pickle.dumps(_plain_tree(tree), protocol=_PICKLE_PROTOCOL)
  metadata = {
      "step": step,
      "format_version": FORMAT_VERSION,
      "sha256": hashlib.sha256(data).hexdigest(),
      "nbytes": len(data),
      "time": time.time(),
  }

  ckpt_dir = pathlib.Path(ckpt_dir)
  ckpt_dir.mkdir(parents=True, exist_ok=True)
  # Single writer, so any temp folder here is a leftover from a crash.
  _remove_stale_tmp(ckpt_dir)
  tmp = _new_tmp_dir(ckpt_dir, str(step))
  final = ckpt_dir / str(step)
  try:
    _write_synced(tmp / STATE_FILE, data)
    _write_synced(tmp / METADATA_FILE,
                  json.dumps(metadata, indent=2).encode("utf-8"))
    _fsync_dir(tmp)
    if final.exists():
      # Directories cannot be renamed over non-empty ones; move the old one
      # aside first.  A crash in between loses only this step, and
      # restore_latest then falls back to the previous one.
      _remove_dir(ckpt_dir, final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  _prune(ckpt_dir, keep, final)
  return final


def _kind(mode: int) -> str:
  for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"),
                     (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                     (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
    if test(mode):
      return name
  return "not a regular file"


def _read_regular(path: pathlib.Path, max_bytes: int, *, exact: int | None = None) -> bytes:
  """Reads a regular file that is no link, refusing more than ``max_bytes``.

  Opened with O_NOFOLLOW (a link, e.g. to /dev/zero, is refused) and
  O_NONBLOCK (a FIFO cannot hang the open); the type and size come from
  fstat of the open file, so they describe what is read.  ``exact``: the
  size the metadata promises; any other size is refused before reading.

  Raises:
    CheckpointError: naming the file and what is wrong with it.
  """
  flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
  try:
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
  except OSError as e:
    try:
      kind = _kind(os.lstat(path).st_mode)
    except OSError:
      kind = None
    if kind == "a symbolic link":
      raise CheckpointError(f"{path}: is a symbolic link; checkpoints are read only from "
                            "regular files, copy the file in its place") from None
    raise CheckpointError(f"{path}: cannot read checkpoint ({e.strerror or e}); check the "
                          "path, or restore an earlier step") from None
  try:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
      raise CheckpointError(f"{path}: is {_kind(st.st_mode)}, not a regular file; "
                            "replace it with the checkpoint file or delete the step folder")
    if exact is not None and st.st_size != exact:
      raise CheckpointError(
          f"{path}: checkpoint is truncated or corrupt (size {st.st_size} bytes, metadata "
          f"says {exact}); delete the step folder and restore an earlier step")
    if st.st_size > max_bytes:
      raise CheckpointError(f"{path}: {st.st_size} bytes is more than the {max_bytes} a "
                            "checkpoint may have; it is not an advmaml checkpoint")
    os.set_blocking(fd, True)
    with os.fdopen(fd, "rb", closefd=True) as f:
      fd = None
      data = f.read(max_bytes + 1)
  except OSError as e:
    raise CheckpointError(f"{path}: cannot read checkpoint ({e.strerror or e}); check the "
                          "path, or restore an earlier step") from None
  finally:
    if fd is not None:
      os.close(fd)
  if len(data) > max_bytes or (exact is not None and len(data) != exact):
    raise CheckpointError(f"{path}: changed size while being read; it is being written by "
                          "another process, or is not a checkpoint")
  return data


def _read_metadata(meta_file: pathlib.Path) -> dict[str, Any]:
  raw = _read_regular(meta_file, _MAX_METADATA_BYTES)
  try:
    meta = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(
        f"{meta_file}: metadata is truncated or corrupt ({e}); delete the "
        "step folder and restore an earlier step") from None
  expected = {"step": int, "format_version": int, "sha256": str, "nbytes": int}
  if not isinstance(meta, dict) or any(
      type(meta.get(k)) is not t for k, t in expected.items()) or meta["nbytes"] < 0:
    raise CheckpointError(
        f"{meta_file}: metadata is truncated or corrupt (needs keys "
        f"{sorted(expected)}); delete the step folder and restore an earlier "
        "step")
  if meta["format_version"] > FORMAT_VERSION:
    raise CheckpointError(
        f"{meta_file}: format_version {meta['format_version']} is newer than "
        f"this advmaml supports ({FORMAT_VERSION}); upgrade advmaml")
  return meta


def load_checkpoint(path, *, trust_unverified: bool = False) -> tuple[int, Any]:
  """Loads one checkpoint.

  Args:
    path: a step folder, or a ``state.pkl`` file.
    trust_unverified: load a ``state.pkl`` that has no ``metadata.json``
      (no size or checksum to verify it against; it is still unpickled
      safely, and read only up to `MAX_UNVERIFIED_BYTES`).  Off: refused.

  Returns:
    (step, tree).  The step comes from metadata.json (it must agree with a
    digit-named folder and with the tree's own ``"step"`` entry, if any), or,
    unverified, from the digit name of the folder.

  Raises:
    CheckpointError: missing, truncated, corrupt, unverified or unsafe
      checkpoint; the message names the file and the fix.
  """
  path = pathlib.Path(path)
  state_file = path / STATE_FILE if _is_real_dir(path) else path
  if path.is_symlink() and path.is_dir():
    raise CheckpointError(f"{path}: the step folder is a symbolic link; checkpoints are read "
                          "only from real folders, copy it in its place")
  folder = state_file.parent
  meta_file = folder / METADATA_FILE
  if os.path.lexists(meta_file):
    meta = _read_metadata(meta_file)
    step = meta["step"]
    if _STEP_RE.fullmatch(folder.name) and int(folder.name) != step:
      raise CheckpointError(
          f"{meta_file}: metadata step {step} does not match folder name "
          f"{folder.name!r}; the folder was renamed or files were mixed up")
    data = _read_regular(state_file, meta["nbytes"], exact=meta["nbytes"])
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
      raise CheckpointError(
          f"{state_file}: checkpoint is truncated or corrupt (sha256 "
          "does not match metadata); delete the step folder and restore "
          "an earlier step")
  elif not trust_unverified:
    raise CheckpointError(
        f"{state_file}: no {METADATA_FILE} beside it, so its size and checksum cannot be "
        "verified; refused. Restore the metadata file, or pass --trust_unverified to load it "
        "anyway (still without running any code from it)")
  else:
    if not _STEP_RE.fullmatch(folder.name):
      raise CheckpointError(
          f"{state_file}: cannot tell the step (no {METADATA_FILE} and the "
          "folder name is not a number); put it in a folder named after its step")
    step = int(folder.name)
    data = _read_regular(state_file, MAX_UNVERIFIED_BYTES)
    logging.warning("%s: loading without %s (--trust_unverified): size and checksum unchecked",
                    state_file, METADATA_FILE)

  tree = safe_loads(data, source=str(state_file))
  if isinstance(tree, dict) and "step" in tree:
    saved = tree["step"]
    if isinstance(saved, (bool, np.bool_)) or not isinstance(saved, (int, np.integer)) \
        or int(saved) != step:
      raise CheckpointError(
          f"{state_file}: holds step {saved!r} but is stored as step {step}; the files were "
          "mixed up, delete the step folder and restore an earlier step")
  return step, tree


T = TypeVar("T")


def restore_latest(ckpt_dir, parse: Callable[[int, Any], T] | None = None, *,
                   trust_unverified: bool = False) -> tuple[int, T] | None:
  """Loads the newest checkpoint that loads (and parses), skipping bad ones.

  Each skipped checkpoint is reported with ``absl.logging.warning`` and a
  one-line reason; so is a digit-named entry that is not a real folder (a
  symbolic link, a file), which is never followed.

  Args:
    ckpt_dir: the checkpoint directory.
    parse: ``parse(step, tree)`` turns a loaded tree into what the caller
      needs, raising CheckpointError if it cannot (wrong shapes, missing
      entries, non-finite values); that checkpoint is then skipped too.
      None returns the tree itself.
    trust_unverified: see `load_checkpoint`.

  Returns:
    (step, parse(step, tree)), or None if `ckpt_dir` does not exist or has no
    step folders.

  Raises:
    CheckpointError: step folders exist but none of them loads.
  """
  ckpt_dir = pathlib.Path(ckpt_dir)
  entries = _step_entries(ckpt_dir)
  candidates = []
  for step, path in entries:
    if _is_real_dir(path):
      candidates.append((step, path))
    else:
      logging.warning("Skipping %s: not a real folder (a symbolic link or a file); step "
                      "folders are never followed out of %s", path, ckpt_dir)
  if not entries:
    return None
  for _, path in reversed(candidates):
    try:
      step, tree = load_checkpoint(path, trust_unverified=trust_unverified)
      return step, (tree if parse is None else parse(step, tree))
    except CheckpointError as e:
      logging.warning("Skipping bad checkpoint %s: %s", path, e)
  raise CheckpointError(
      f"{ckpt_dir}: none of the {len(entries)} checkpoints "
      f"(steps {[s for s, _ in entries]}) could be loaded; see the "
      "warnings above, then repair or delete them (or use a new directory to "
      "start from scratch)")
