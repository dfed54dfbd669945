"""Per-episode results of an unfinished evaluation, kept so that it can resume.

An evaluation under per-example attacks takes an hour on a few CPU cores
(600 five-shot episodes); a stopped machine should cost the batch in flight,
not the hour. Episode ``i`` is drawn from ``fold_in(key, i)`` alone
(:mod:`advmaml.eval.evaluation`), so the first ``n`` episodes' results are
the same whether they were computed in this process or an earlier one, and an
evaluation can go on from them, provided it is the *same* evaluation: the
file stores an identity string (the caller's flags, digests of the parameters,
the data and the code) and a file with another identity is not used: episodes
computed by code since changed are not mixed with new ones.

The file is an ``.npz`` of plain arrays, read with ``allow_pickle=False`` (it
runs no code), and replaced atomically (temp file + rename) after each batch.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import zipfile

import jax
import numpy as np
from absl import logging

_IDENTITY = "__identity__"


def tree_digest(tree) -> str:
  """sha256 of a pytree's structure, leaf dtypes, shapes and bytes (hex)."""
  h = hashlib.sha256(str(jax.tree.structure(tree)).encode())
  for leaf in jax.tree.leaves(tree):
    a = np.asarray(jax.device_get(leaf))
    if a.dtype == object or jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      raise TypeError(f"tree_digest takes numeric arrays, got {a.dtype}")
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def source_digest(package) -> str:
  """sha256 of a package's Python sources (its .py files' paths and bytes, hex)."""
  root = pathlib.Path(package.__file__).parent
  h = hashlib.sha256()
  for path in sorted(root.rglob("*.py")):
    h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
  return h.hexdigest()


def load(path: str | os.PathLike, identity: str) -> dict[str, np.ndarray]:
  """The per-episode results kept at ``path``: {metric: (n,)}, or {} when there
  are none to use (no file, an unreadable one, or another evaluation's), logged."""
  path = pathlib.Path(path)
  if not path.exists():
    return {}
  try:
    with np.load(path, allow_pickle=False) as f:
      stored = {name: f[name] for name in f.files}
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    logging.warning("%s is not a readable partial evaluation (%s); starting over", path, e)
    return {}
  if str(stored.pop(_IDENTITY, "")) != identity:
    logging.warning("%s holds another evaluation's episodes (other flags, checkpoint or data); "
                    "starting over", path)
    return {}
  lengths = {v.shape for v in stored.values()}
  if not stored or len(lengths) != 1 or len(next(iter(lengths))) != 1:
    logging.warning("%s holds ragged or empty results; starting over", path)
    return {}
  logging.info("resuming from %s: %d episodes already evaluated", path, next(iter(lengths))[0])
  return stored


def save(path: str | os.PathLike, identity: str, per_episode: dict[str, np.ndarray]) -> None:
  """Writes {metric: (n,)} and ``identity`` to ``path`` atomically."""
  path = pathlib.Path(path)
  if _IDENTITY in per_episode:
    raise ValueError(f"{_IDENTITY!r} is reserved")
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      np.savez(f, **{_IDENTITY: np.asarray(identity)}, **per_episode)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def remove(path: str | os.PathLike) -> None:
  pathlib.Path(path).unlink(missing_ok=True)
