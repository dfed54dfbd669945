"""Restricted unpickling of plain containers and numeric numpy arrays.

Shared by `advmaml.io.checkpoint` (checkpoints) and `advmaml.data.cache` (the
pickles data sets ship in).  Each caller describes what its files may hold
with a `Rules` and turns `Refused` into its own error type and message.

Design:

* `pickle.load` would call whatever global a file names.  The unpickler here
  resolves only a handful of numpy globals, each mapped to a checking
  stand-in defined in this module (nothing is imported by name), and refuses
  every other global before it can be called.
* Even numpy's own globals are unsafe when used naively: ``dtype.__setstate__``
  accepts a state that marks a float64 dtype as holding Python objects, after
  which numpy treats the array's raw bytes as object pointers.  So dtypes are
  rebuilt from a checked spec, taking only the byte order from the pickled
  state, and arrays are built from raw bytes with such a dtype.
* After loading, the tree is walked (`check_tree`) so that only allowed
  containers and leaves come back; the same walk checks trees before saving.
"""

from __future__ import annotations

import dataclasses
import io
import math
import pickle
import re
from typing import Any, Callable

import numpy as np

try:  # ml_dtypes ships with jax; it provides bfloat16 and the float8 types.
  import ml_dtypes
except ImportError:  # pragma: no cover - jax always installs it.
  ml_dtypes = None

__all__ = ["ML_DTYPE_TYPES", "Refused", "Rules", "check_tree", "dtype_problem",
           "loads"]

# ml_dtypes scalar types (bfloat16, float8_*, int4, ...); numpy gives them
# kind "V", so they are allowed by type, not kind.
_ML_DTYPES = {
    name: obj
    for name in (dir(ml_dtypes) if ml_dtypes is not None else ())
    if isinstance(obj := getattr(ml_dtypes, name), type)
    and issubclass(obj, np.generic)
}
ML_DTYPE_TYPES = frozenset(_ML_DTYPES.values())
# Only simple spellings reach np.dtype (no comma lists or subarrays); numpy
# writes numeric ones in lower case ("f8", "b1"), others ("O8", "U1") are
# parsed only to say what is wrong with them.
_DTYPE_SPEC_RE = re.compile(r"[<>|=]?[A-Za-z]+[0-9]*")
# Descriptor flags that mean "items are Python objects / need the C-API":
# NPY_ITEM_REFCOUNT, LIST_PICKLE, ITEM_IS_POINTER, NEEDS_INIT, NEEDS_PYAPI,
# USE_GETITEM.  No numeric dtype sets any of them.
_OBJECT_FLAGS = 0x3F
_KIND_NAMES = {"b": "bool", "i": "integer", "u": "integer", "f": "float",
               "c": "complex"}


class Refused(Exception):
  """The pickle names something the rules do not allow; nothing was run."""


@dataclasses.dataclass(frozen=True)
class Rules:
  """What one kind of pickle may hold.

  Attributes:
    refused_global: text after "refused global 'module.name'; ".
    refused_type: text after "<type> is not allowed; ".
    kinds: numpy dtype kinds allowed for arrays and scalars (subset of biufc).
    ml_dtypes: also allow the ml_dtypes types (bfloat16, float8_*, ...).
    encoding: `pickle.Unpickler` encoding; "bytes" keeps Python 2 str as
      bytes, so dtype specs and byte orders are then decoded here.
    bytes_ok: bytes may be values (and keys); also allows ``_codecs.encode``,
      which is how protocols < 3 write bytes.
    str_keys: dict keys must be str; otherwise any allowed value.
    protocol5: allow numpy's in-band protocol-5 ``_frombuffer``.
    writable: copy arrays out of the pickle's bytes, in native byte order
      (else views of them, read-only for protocols < 5).
  """

  refused_global: str
  refused_type: str
  kinds: str = "biuf"
  ml_dtypes: bool = False
  encoding: str = "ASCII"
  bytes_ok: bool = False
  str_keys: bool = True
  protocol5: bool = False
  writable: bool = False

  @property
  def dtype_names(self) -> str:
    """E.g. "bool, integer or float", for messages."""
    names = list(dict.fromkeys(_KIND_NAMES[k] for k in "biufc" if k in self.kinds))
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def dtype_problem(dtype: np.dtype, rules: Rules) -> str | None:
  """Returns why `dtype` is not allowed by `rules`, or None if it is."""
  if dtype.fields is not None or dtype.subdtype is not None or dtype.hasobject:
    return f"dtype {dtype} is structured or holds objects"
  if dtype.kind in rules.kinds or (rules.ml_dtypes and dtype.type in ML_DTYPE_TYPES):
    return None
  return f"dtype {dtype} is not {rules.dtype_names}"


# ---------------------------------------------------------------------------
# Stand-ins for the allowed globals.  Those defined here take the rules as
# first argument, bound by `_allowed_globals`.
# ---------------------------------------------------------------------------


def _text(value: Any, rules: Rules) -> Any:
  """Python 2 str arrives as bytes under encoding="bytes"; decodes those."""
  if rules.encoding == "bytes" and type(value) is bytes:
    try:
      return value.decode("ascii")
    except UnicodeDecodeError:
      return None  # refused by the caller's type check
  return value


def _checked_dtype(rules: Rules, spec: Any) -> np.dtype:
  """Builds a dtype from a pickled spec, refusing all `rules` do not allow."""
  spec = _text(spec, rules)
  is_ml = rules.ml_dtypes and isinstance(spec, type) and spec in ML_DTYPE_TYPES
  if not ((type(spec) is str and _DTYPE_SPEC_RE.fullmatch(spec)) or is_ml):
    raise Refused(f"refused dtype spec {spec!r}; only numeric dtypes are allowed")
  try:
    dtype = np.dtype(spec)
  except TypeError as e:
    raise Refused(f"refused dtype spec {spec!r}: {e}") from None
  problem = dtype_problem(dtype, rules)
  if problem and dtype.kind in "OV":  # object or structured: say why
    raise Refused(f"refused {problem}; object and structured arrays can run "
                  "code or read arbitrary memory when unpickled")
  if problem:
    raise Refused(f"refused {problem}")
  if not (is_ml or spec.islower()):
    raise Refused(f"refused dtype spec {spec!r}; numpy writes numeric dtypes "
                  "as kind and size, e.g. 'f4'")
  return dtype


class _Dtype:
  """Stands in for ``numpy.dtype(spec, align, copy)``.

  The pickled state is checked and only its byte order is used; the real
  ``dtype.__setstate__`` is never called (see module docstring).
  """

  __slots__ = ("dtype", "rules")

  def __init__(self, rules: Rules, spec: Any, align: Any = False, copy: Any = True):
    # Unused: numeric dtypes need no alignment, and we never mutate the
    # dtype, so sharing numpy's global instances is fine.
    del align, copy
    self.rules = rules
    self.dtype = _checked_dtype(rules, spec)

  def __setstate__(self, state: Any) -> None:
    # (version, byteorder, subarray, names, fields, elsize, alignment, flags
    #  [, metadata]) -- identical layout in numpy 1.x and 2.x.
    is_tuple = type(state) is tuple
    order = _text(state[1], self.rules) if is_tuple and len(state) > 1 else None
    if not (is_tuple and len(state) in (8, 9)
            and state[0] in (3, 4) and order in ("<", ">", "|", "=")
            and state[2] is None and state[3] is None and state[4] is None
            and type(state[7]) is int and not state[7] & _OBJECT_FLAGS
            and (len(state) == 8 or state[8] is None)):
      raise Refused(
          f"refused dtype state {state!r} for {self.dtype}; it would make "
          "a numeric dtype structured or object-like")
    if order in "<>":
      self.dtype = self.dtype.newbyteorder(order)


def _dtype_of(obj: Any) -> np.dtype:
  if type(obj) is not _Dtype:
    raise Refused(f"expected a numpy dtype, got {type(obj).__name__}")
  return obj.dtype


def _array(rules: Rules, data: Any, dtype: np.dtype, shape: Any,
           fortran: bool) -> np.ndarray:
  """Builds an array from raw bytes and an already checked dtype."""
  if type(data) not in (bytes, bytearray):
    raise Refused(f"refused array data of type {type(data).__name__}; only "
                  "raw bytes are allowed")
  if not (type(shape) is tuple and all(type(n) is int and n >= 0 for n in shape)):
    raise Refused(f"refused array shape {shape!r}")
  expected = math.prod(shape) * dtype.itemsize
  if len(data) != expected:
    raise ValueError(f"array data has {len(data)} bytes, expected {expected} "
                     f"for {shape} {dtype}")
  # Safe now: the dtype is numeric, so the bytes are only ever read as numbers.
  array = np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")
  if rules.writable:  # own, native-order copy, as numpy's unpickling gives
    return array.astype(dtype.newbyteorder("="), order="K")
  return array


class _NdarrayType:
  """Inert token for the global ``numpy.ndarray`` so it cannot be called."""

  __slots__ = ()


_NDARRAY = _NdarrayType()


class _ArrayProxy:
  """Stands in for numpy's ``_reconstruct(ndarray, (0,), b'b')``.

  The array is built when the pickled state arrives; `check_tree` then swaps
  the proxy for it.
  """

  __slots__ = ("array", "rules")

  def __init__(self, rules: Rules, subtype: Any, shape: Any = (0,), code: Any = b"b"):
    del shape, code  # Placeholders in numpy's protocol; see __setstate__.
    if subtype is not _NDARRAY:
      raise Refused("refused array subtype; only numpy.ndarray is allowed")
    self.rules = rules
    self.array = None

  def __setstate__(self, state: Any) -> None:
    if not (type(state) is tuple and len(state) == 5):
      raise Refused(f"refused ndarray state of type {type(state).__name__}")
    _, shape, dtype, fortran, data = state
    dtype = _dtype_of(dtype)
    # numpy writes bytes here at every protocol; bytearray only comes with
    # protocol 5's _frombuffer.
    if type(data) is not bytes:
      raise Refused(f"refused ndarray data of type {type(data).__name__}")
    self.array = _array(self.rules, data, dtype, shape, bool(fortran))


def _frombuffer(rules: Rules, buffer: Any, dtype: Any, shape: Any,
                order: Any) -> np.ndarray:
  """Stands in for ``numpy.core.numeric._frombuffer`` (pickle protocol 5)."""
  return _array(rules, buffer, _dtype_of(dtype), shape, _text(order, rules) == "F")


def _scalar(rules: Rules, dtype: Any, data: Any = None) -> np.generic:
  """Rebuilds a numpy scalar from its (checked) dtype and raw bytes."""
  del rules  # the dtype was checked against them
  dtype = _dtype_of(dtype)
  if type(data) is not bytes or len(data) != dtype.itemsize:
    raise Refused(f"refused {dtype} scalar data of type {type(data).__name__}")
  return np.frombuffer(data, dtype)[0]


def _latin1_encode(rules: Rules, text: Any, encoding: Any = "latin1") -> bytes:
  """Stands in for ``_codecs.encode``: how Python 3 pickles bytes at protocol < 3."""
  del rules  # only allowed where bytes are
  if type(text) is not str or encoding not in ("latin1", "latin-1"):
    raise Refused("refused _codecs.encode call other than str -> latin1 bytes")
  return text.encode("latin1")


_CORE = ("numpy._core", "numpy.core")  # numpy 2 and 1.x names; old files load
# Every global a pickle may name, mapped to its stand-in, by the `Rules` flag
# that allows it (None: always).  Nothing is imported by these names.
_GLOBALS = {
    None: {
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _Dtype,
        **{(m + ".multiarray", "_reconstruct"): _ArrayProxy for m in _CORE},
        **{(m + ".multiarray", "scalar"): _scalar for m in _CORE},
    },
    "protocol5": {(m + ".numeric", "_frombuffer"): _frombuffer for m in _CORE},
    "bytes_ok": {("_codecs", "encode"): _latin1_encode},
    "ml_dtypes": {("ml_dtypes", n): t for n, t in _ML_DTYPES.items()},
}


def _bind(stand_in: Callable[..., Any], rules: Rules) -> Callable[..., Any]:
  def call(*args):
    return stand_in(rules, *args)
  return call


def _allowed_globals(rules: Rules) -> dict[tuple[str, str], Any]:
  """The stand-ins `rules` allow, with the rules bound, made for one load.

  Fresh closures, not shared partials: BUILD can rewire a partial (or set
  attributes of what a pickle names), which must not outlive that load.
  """
  allowed = {}
  for flag, table in _GLOBALS.items():
    if flag is None or getattr(rules, flag):
      allowed.update({key: obj if obj is _NDARRAY or obj in ML_DTYPE_TYPES
                      else _bind(obj, rules) for key, obj in table.items()})
  return allowed


class _Unpickler(pickle.Unpickler):
  """Resolves only the globals `rules` allow; every other is refused unrun."""

  def __init__(self, file: Any, rules: Rules):
    super().__init__(file, encoding=rules.encoding)
    self._allowed = _allowed_globals(rules)
    self._rules = rules

  def find_class(self, module: str, name: str) -> Any:
    try:
      return self._allowed[(module, name)]
    except (KeyError, TypeError):
      raise Refused(f"refused global '{module}.{name}'; "
                    f"{self._rules.refused_global}") from None


# ---------------------------------------------------------------------------
# The allowed-types walk and loading.
# ---------------------------------------------------------------------------


def check_tree(tree: Any, rules: Rules, path: str,
               on_error: Callable[[str, str], Any],
               leaf_fn: Callable[[Any], Any] = lambda x: x) -> Any:
  """Rebuilds `tree` from the types `rules` allow, applying `leaf_fn` first.

  Allowed: dict, list, tuple, None, bool, int, float, str (bytes with
  `rules.bytes_ok`), numpy arrays and scalars whose dtype `rules` allow.
  `on_error(path, message)` must raise.  Reference cycles are reported, not
  recursed into.
  """
  return _walk(tree, rules, path, on_error, leaf_fn, set())


def _walk(tree: Any, rules: Rules, path: str, on_error, leaf_fn,
          active: set[int]) -> Any:
  tree = leaf_fn(tree)
  kind = type(tree)
  if kind in (dict, list, tuple):
    if id(tree) in active:
      on_error(path, "contains a reference cycle")
    active.add(id(tree))  # ids on the current path only; shared subtrees are fine
    try:
      if kind is dict:
        out = {}
        for key, value in tree.items():
          if rules.str_keys and type(key) is not str:
            on_error(path, f"dict key {key!r} ({type(key).__name__}) is not "
                     "allowed; use str keys")
          if not rules.str_keys:
            key = _walk(key, rules, f"{path} key", on_error, leaf_fn, active)
          out[key] = _walk(value, rules, f"{path}[{key!r}]", on_error, leaf_fn, active)
        return out
      items = [_walk(v, rules, f"{path}[{i}]", on_error, leaf_fn, active)
               for i, v in enumerate(tree)]
      return items if kind is list else tuple(items)
    finally:
      active.discard(id(tree))
  if (tree is None or kind in (bool, int, float, str)
      or (kind is bytes and rules.bytes_ok)):
    return tree
  if kind is np.ndarray or isinstance(tree, np.generic):
    if kind is not np.ndarray and kind is not tree.dtype.type:
      on_error(path, f"numpy scalar subclass {kind.__name__} is not allowed")
    problem = dtype_problem(tree.dtype, rules)
    if problem:
      what = "numpy array" if kind is np.ndarray else "numpy scalar"
      on_error(path, f"{what} with {problem} is not allowed; only "
               f"{rules.dtype_names} dtypes can be stored")
    return tree
  on_error(path, f"{kind.__name__} is not allowed; {rules.refused_type}")
  raise AssertionError("on_error must raise")  # pragma: no cover


def _unproxy(leaf: Any) -> Any:
  if type(leaf) is _ArrayProxy:
    if leaf.array is None:
      raise Refused("refused ndarray without data")
    return leaf.array
  return leaf


def _raise_refused(path: str, message: str):
  raise Refused(f"{path}: {message}")


def loads(file: Any, rules: Rules, path: str = "pickle") -> Any:
  """Unpickles one pickle under `rules` without running code from it.

  Args:
    file: bytes, or a binary file object holding one pickle.
    rules: what the pickle may hold.
    path: name of the root in messages, e.g. "state" -> "state['w'][0]".

  Returns:
    The checked tree (see `check_tree`).

  Raises:
    Refused: the pickle names a global, dtype or type `rules` do not allow.
    Any other exception: the stream is truncated or corrupt (EOFError,
      UnpicklingError, ValueError, ... wherever the damage is); callers
      translate both into their own error.
  """
  if isinstance(file, (bytes, bytearray)):
    file = io.BytesIO(file)
  raw = _Unpickler(file, rules).load()
  return check_tree(raw, rules, path, _raise_refused, _unproxy)
