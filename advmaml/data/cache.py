"""Helpers shared by the data loaders: folders, decoded-array caches, safe pickles.

* `DataError`: the one exception every loader raises for missing, damaged or
  misplaced files; its message names the files, the folder and the fix.
* Folders: `default_cache_dir`, `resolve_dir` (flag, else environment
  variable, else the user cache), `is_writable` (also catches read-only
  mounts), `cache_folder` (data folder if writable, else the user cache).
* `read_npz` / `write_npz`: a decoded-array cache in one ``.npz`` file that
  records a fingerprint of its sources; written to a temporary file and
  renamed, so a crash never leaves a half-written cache.
* `safe_unpickle`: reads the pickles that data sets ship in (CIFAR-100,
  Mini-ImageNet caches) without running code from them.
* `resize_rgb`: PIL Lanczos resizing of a stack of colour images.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import stat
import tempfile
import urllib.request
import zipfile
from typing import Any, Callable, Iterable

import numpy as np
from absl import logging
from PIL import Image

from advmaml.io import safe_pickle

# mkstemp creates 0o600 files; others sharing the folder should read them too.
FILE_MODE = 0o644
CACHE_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)
DOWNLOAD_TIMEOUT_S = 30.0


class DataError(ValueError):
  """The data set files are missing, damaged or not laid out as expected."""


# ---------------------------------------------------------------------------
# Folders.
# ---------------------------------------------------------------------------


def default_cache_dir() -> pathlib.Path:
  """$XDG_CACHE_HOME/advmaml, or ~/.cache/advmaml when that is unset."""
  xdg = os.environ.get("XDG_CACHE_HOME", "")
  # The XDG spec says to ignore relative paths.
  base = pathlib.Path(xdg) if os.path.isabs(xdg) else pathlib.Path.home() / ".cache"
  return base / "advmaml"


def resolve_dir(value: str | os.PathLike | None, env_var: str,
                default_name: str) -> tuple[pathlib.Path, bool]:
  """The flag value, else $env_var, else default_cache_dir()/default_name.

  Returns:
    (folder, is_default): is_default is True when neither flag nor variable
    was set, i.e. the folder is ours to download into.
  """
  for candidate in (value, os.environ.get(env_var)):
    if candidate is not None and os.fspath(candidate) != "":
      return pathlib.Path(os.fspath(candidate)).expanduser(), False
  return default_cache_dir() / default_name, True


def is_writable(folder: pathlib.Path) -> bool:
  """Whether we may and can create a file in `folder`.

  Root ignores permission bits, so a folder made read-only (chmod a-w) is
  checked by its mode; a read-only mount is found by trying to create a file
  (os.access says yes there for root).
  """
  try:
    if not folder.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
      return False
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".advmaml_probe_")
  except OSError:
    return False
  os.close(fd)
  os.unlink(tmp)
  return True


def cache_folder(data_folder: pathlib.Path, fallback: pathlib.Path) -> pathlib.Path:
  """Where a decoded cache goes: beside the data if writable, else `fallback`."""
  return data_folder if is_writable(data_folder) else fallback


# ---------------------------------------------------------------------------
# Fingerprints and the .npz cache.
# ---------------------------------------------------------------------------


def sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def stat_fingerprint(paths: Iterable[pathlib.Path]) -> str:
  """SHA-256 over (file name, size, mtime) of each file; cheap for many big files.

  File names, not paths, so that a moved folder keeps its cache (names are
  unique within what a loader fingerprints). A file replaced by another of the
  same size and modification time would go unnoticed; for data set files that
  is not a practical concern.
  """
  digest = hashlib.sha256()
  for path in paths:
    st = os.stat(path)
    digest.update(f"{pathlib.Path(path).name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return digest.hexdigest()


def read_npz(path: pathlib.Path, fingerprint: str, what: str,
             build: Callable[[dict[str, np.ndarray]], Any] | None = None) -> Any:
  """The arrays of a cache (passed through `build`), or None to rebuild it.

  None (with a warning naming the cache) when the file is missing, corrupt,
  built from other data (fingerprint differs), or `build` rejects it.
  """
  if not path.exists():
    return None
  try:
    with np.load(path, allow_pickle=False) as f:
      if str(f["fingerprint"]) != fingerprint:
        logging.warning("%s cache %s is stale (built from other data); "
                        "rebuilding it.", what, path)
        return None
      arrays = {k: f[k] for k in f.files if k != "fingerprint"}
    return build(arrays) if build is not None else arrays
  except CACHE_ERRORS as e:
    logging.warning("%s cache %s cannot be read (%s); rebuilding it.", what, path, e)
    return None


def write_npz(path: pathlib.Path, arrays: dict[str, np.ndarray], fingerprint: str,
              what: str, compress: bool = True) -> None:
  """Writes the cache atomically; a failure only costs a later rebuild.

  `compress=False` suits natural colour images: zlib gains little on them
  and would slow every load.
  """
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
      with os.fdopen(fd, "wb") as f:
        save = np.savez_compressed if compress else np.savez
        save(f, fingerprint=np.array(fingerprint), **arrays)
      os.chmod(tmp, FILE_MODE)
      os.replace(tmp, path)
    except BaseException:
      os.unlink(tmp)
      raise
  except OSError as e:
    logging.warning("Could not write the %s cache %s (%s).", what, path, e)


def download_file(url: str, dest: pathlib.Path, is_valid: Callable[[str], bool],
                  kind: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
  """Fetches `url` into `dest` atomically; raises OSError on any failure.

  `is_valid(tmp_path)` checks the payload: a proxy or captive portal may
  answer with an HTML page. `kind` names the expected payload ("a zip file").
  """
  dest.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
  try:
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
      shutil.copyfileobj(response, out)
    if not is_valid(tmp):
      raise OSError(f"{url} did not return {kind}")
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, dest)
  except BaseException:
    os.unlink(tmp)
    raise


# ---------------------------------------------------------------------------
# Images.
# ---------------------------------------------------------------------------


def resize_rgb(images: np.ndarray, size: int) -> np.ndarray:
  """(N, H, W, 3) uint8 -> (N, size, size, 3) uint8, PIL Lanczos (antialiased).

  Returns `images` itself when it already has that size.
  """
  if images.shape[1:3] == (size, size):
    return images
  out = np.empty((len(images), size, size, 3), np.uint8)
  for i, image in enumerate(images):
    out[i] = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS))
  return out


# ---------------------------------------------------------------------------
# Safe unpickling of data files.
# ---------------------------------------------------------------------------
#
# Data sets ship pickles of plain containers and numpy arrays, some written
# by Python 2 (CIFAR-100). pickle.load would run whatever callable a file
# names; advmaml.io.safe_pickle (shared with checkpoints) resolves only checking
# stand-ins for the few numpy globals an array needs. Unlike checkpoints,
# these files need encoding="bytes" (Python 2 str), bytes keys and values,
# protocols 2 to 5; arrays stay read-only views of the pickle's bytes, as the
# Mini-ImageNet pickles are large.
_ALLOWED = ("data pickles may hold only plain containers, strings, numbers and "
            "numeric numpy arrays")
_RULES = safe_pickle.Rules(
    refused_global=_ALLOWED, refused_type=_ALLOWED,
    kinds="biuf", encoding="bytes", bytes_ok=True, str_keys=False,
    protocol5=True)


def safe_unpickle(file: Any, *, source: str, fix: str) -> Any:
  """Unpickles a data file without running any code from it.

  Python 2 strings come back as bytes (encoding="bytes"), as in the official
  CIFAR-100 loading recipe.

  Args:
    file: a binary file object (or bytes) holding one pickle.
    source: the file's name for error messages.
    fix: what the user should do about a bad file, appended to messages.

  Returns:
    Nested dict/list/tuple of str, bytes, numbers, None and numpy arrays
    (arrays may be read-only views of the pickle's bytes).

  Raises:
    DataError: the pickle names a refused global or type, or is truncated or
      corrupt.
  """
  try:
    return safe_pickle.loads(file, _RULES)
  except safe_pickle.Refused as e:
    raise DataError(f"{source}: {e}. The file was not executed. {fix}") from None
  except MemoryError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Truncation surfaces as EOFError/UnpicklingError/ValueError/... anywhere.
    raise DataError(f"{source} is truncated or not a pickle ({type(e).__name__}: {e}). "
                    f"{fix}") from None
