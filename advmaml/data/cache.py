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
import io
import math
import os
import pathlib
import pickle
import re
import shutil
import stat
import tempfile
import urllib.request
import zipfile
from typing import Any, Callable, Iterable

import numpy as np
from absl import logging
from PIL import Image

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
# names; this unpickler resolves only stand-ins for the few numpy globals an
# array needs, and builds arrays from raw bytes with a checked numeric dtype
# (numpy's own dtype.__setstate__ is never called: it can be told to treat
# raw bytes as object pointers). advmaml.checkpoint.safe_loads follows the
# same design but accepts neither bytes keys and values nor Python 2 pickles,
# which these files need (read with encoding="bytes").

_DTYPE_SPEC_RE = re.compile(r"[<>|=]?[a-z]+[0-9]*")
_PLAIN_KINDS = frozenset("biuf")
# Descriptor flags of object-like dtypes (refcounted items, needs Python API).
_OBJECT_FLAGS = 0x3F


class _Refused(Exception):
  """Raised inside the unpickler; `safe_unpickle` adds the file name."""


def _ascii(value: Any) -> Any:
  """Python 2 str values arrive as bytes under encoding="bytes"."""
  return value.decode("ascii") if type(value) is bytes else value


class _Dtype:
  """Stands in for ``numpy.dtype(spec, align, copy)``: numeric dtypes only."""

  __slots__ = ("dtype",)

  def __init__(self, spec: Any, align: Any = False, copy: Any = True):
    del align, copy  # irrelevant for the plain numeric dtypes allowed here
    try:
      spec = _ascii(spec)
    except UnicodeDecodeError:
      spec = None
    if type(spec) is not str or not _DTYPE_SPEC_RE.fullmatch(spec):
      raise _Refused(f"refused dtype {spec!r}; only numeric dtypes are allowed")
    try:
      dtype = np.dtype(spec)
    except TypeError as e:
      raise _Refused(f"refused dtype {spec!r} ({e})") from None
    if dtype.kind not in _PLAIN_KINDS or dtype.hasobject or dtype.fields is not None:
      raise _Refused(f"refused dtype {dtype}; only bool, integer and float arrays are allowed")
    self.dtype = dtype

  def __setstate__(self, state: Any) -> None:
    # (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
    if not (type(state) is tuple and len(state) in (8, 9) and state[0] in (3, 4)):
      raise _Refused(f"refused dtype state {state!r}")
    order = _ascii(state[1])
    if (order not in ("<", ">", "|", "=") or state[2:5] != (None, None, None)
        or type(state[7]) is not int or state[7] & _OBJECT_FLAGS
        or (len(state) == 9 and state[8] is not None)):
      raise _Refused(f"refused dtype state {state!r}; it would make {self.dtype} "
                     "structured or object-like")
    if order in "<>":
      self.dtype = self.dtype.newbyteorder(order)


def _dtype_of(obj: Any) -> np.dtype:
  if type(obj) is not _Dtype:
    raise _Refused(f"expected a numpy dtype, got {type(obj).__name__}")
  return obj.dtype


def _array_from_bytes(data: Any, dtype: np.dtype, shape: Any, fortran: bool) -> np.ndarray:
  if isinstance(data, (bytearray, memoryview, pickle.PickleBuffer)):
    data = bytes(data)
  if type(data) is not bytes:
    raise _Refused(f"refused array data of type {type(data).__name__}")
  if not (type(shape) is tuple and all(type(n) is int and n >= 0 for n in shape)):
    raise _Refused(f"refused array shape {shape!r}")
  if len(data) != math.prod(shape) * dtype.itemsize:
    raise ValueError(f"array data has {len(data)} bytes, expected "
                     f"{math.prod(shape) * dtype.itemsize} for {shape} {dtype}")
  # Zero-copy view of the pickle's bytes (read-only); loaders copy what they keep.
  return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")


class _NdarrayToken:
  """Inert stand-in for the global ``numpy.ndarray``."""

  __slots__ = ()


_NDARRAY = _NdarrayToken()


class _Array:
  """Stands in for ``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')``."""

  __slots__ = ("array",)

  def __init__(self, subtype: Any, shape: Any = (0,), code: Any = b"b"):
    del shape, code  # placeholders in numpy's protocol; the state has the real ones
    if subtype is not _NDARRAY:
      raise _Refused("refused array subtype; only numpy.ndarray is allowed")
    self.array = None

  def __setstate__(self, state: Any) -> None:
    if not (type(state) is tuple and len(state) == 5):
      raise _Refused(f"refused ndarray state of type {type(state).__name__}")
    _, shape, dtype, fortran, data = state
    self.array = _array_from_bytes(data, _dtype_of(dtype), shape, bool(fortran))


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
  """Stands in for ``numpy.core.numeric._frombuffer`` (pickle protocol 5)."""
  return _array_from_bytes(buffer, _dtype_of(dtype), shape, _ascii(order) == "F")


def _scalar(dtype: Any, data: Any = None) -> np.generic:
  dtype = _dtype_of(dtype)
  if type(data) is not bytes or len(data) != dtype.itemsize:
    raise _Refused(f"refused {dtype} scalar data")
  return np.frombuffer(data, dtype)[0]


def _latin1_encode(text: Any, encoding: Any = "latin1") -> bytes:
  """Stands in for ``_codecs.encode``: how Python 3 pickles bytes at protocol < 3."""
  if type(text) is not str or encoding not in ("latin1", "latin-1"):
    raise _Refused("refused _codecs.encode call other than str -> latin1 bytes")
  return text.encode("latin1")


# Both numpy 2 (`numpy._core`) and numpy 1.x (`numpy.core`) module names.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Dtype,
    ("_codecs", "encode"): _latin1_encode,
    **{(m + ".multiarray", "_reconstruct"): _Array for m in ("numpy.core", "numpy._core")},
    **{(m + ".multiarray", "scalar"): _scalar for m in ("numpy.core", "numpy._core")},
    **{(m + ".numeric", "_frombuffer"): _frombuffer for m in ("numpy.core", "numpy._core")},
}


class _Unpickler(pickle.Unpickler):
  """Resolves only `_ALLOWED_GLOBALS`; every other global is refused unrun."""

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except (KeyError, TypeError):
      raise _Refused(f"refused global '{module}.{name}'; data pickles may hold only "
                     "plain containers, strings, numbers and numeric numpy arrays") from None


def _plain(tree: Any, path: str) -> Any:
  """Swaps array stand-ins for arrays; refuses anything that is not plain data."""
  kind = type(tree)
  if kind is _Array:
    if tree.array is None:
      raise _Refused(f"{path}: ndarray without data")
    return tree.array
  if kind is dict:
    return {_plain(k, f"{path} key"): _plain(v, f"{path}[{k!r}]") for k, v in tree.items()}
  if kind in (list, tuple):
    items = [_plain(v, f"{path}[{i}]") for i, v in enumerate(tree)]
    return items if kind is list else tuple(items)
  if tree is None or kind in (bool, int, float, str, bytes, np.ndarray) or isinstance(
      tree, np.generic):
    return tree
  raise _Refused(f"{path}: {kind.__name__} is not plain data")


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
  if isinstance(file, (bytes, bytearray)):
    file = io.BytesIO(file)
  try:
    return _plain(_Unpickler(file, encoding="bytes").load(), "pickle")
  except _Refused as e:
    raise DataError(f"{source}: {e}. The file was not executed. {fix}") from None
  except MemoryError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Truncation surfaces as EOFError/UnpicklingError/ValueError/... anywhere.
    raise DataError(f"{source} is truncated or not a pickle ({type(e).__name__}: {e}). "
                    f"{fix}") from None
