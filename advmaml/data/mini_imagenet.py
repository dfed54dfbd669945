"""Mini-ImageNet (Vinyals et al. 2016) in the class split of Ravi & Larochelle (2017).

100 ImageNet classes of 600 images each, split 64 / 16 / 20 into train,
validation and test classes; images 84x84 RGB. ImageNet's licence forbids
redistribution, so there is no official download. Two common forms are read:

* ``pickle``: the widely shared caches ``mini-imagenet-cache-train.pkl``,
  ``-val.pkl`` and ``-test.pkl``, each a dict with ``"image_data"``
  (N, 84, 84, 3) uint8 and ``"class_dict"`` {wnid: [indices into
  image_data]}. They are read with `cache.safe_unpickle`, which runs no code.
* ``csv``: Ravi & Larochelle's split files ``train.csv``, ``val.csv`` and
  ``test.csv`` (header ``filename,label``, label = the ImageNet wnid) from
  github.com/twitter/meta-learning-lstm (``data/miniImagenet``), with the
  images in ``images/<filename>`` (from ImageNet, any size). Images are
  resized to 84x84 with PIL's Lanczos filter (antialiased), decoded once and
  cached as one ``.npz`` keyed by the sizes and modification times of the
  files.

The split is the one the files define; a count other than 64 / 16 / 20 only
logs a warning, so subsets can be used. Files are looked for in
``--data_dir``, else ``$ADVMAML_MINI_IMAGENET_DIR``, else
``~/.cache/advmaml/mini_imagenet``.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import os
import pathlib
import re
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from advmaml.data import cache, splits
from advmaml.data.cache import DataError

DATA_DIR_ENV = "ADVMAML_MINI_IMAGENET_DIR"
PICKLE_NAMES = {s: f"mini-imagenet-cache-{s}.pkl" for s in splits.SPLITS}
CSV_NAMES = {s: f"{s}.csv" for s in splits.SPLITS}
IMAGE_FOLDER = "images"
CSV_URL = "https://github.com/twitter/meta-learning-lstm/tree/master/data/miniImagenet"
NATIVE_SIZE = 84
STANDARD_COUNTS = {"train": 64, "val": 16, "test": 20}
SOURCES = ("auto", "pickle", "csv")
# Bump when the cached arrays change meaning, so old caches are rebuilt.
FORMAT_VERSION = 1

_WNID_RE = re.compile(r"n\d{8}")
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class MiniImageNetSplit:
  """The classes of one split.

  Attributes:
    images: (num_classes, N, S, S, 3) uint8 RGB, N images per class (600 in
      the full set), in the source's order (CSV rows / class_dict lists).
    wnids: the ImageNet wnid of each class, ascending.
  """

  images: np.ndarray
  wnids: tuple[str, ...]

  def __post_init__(self):
    if (self.images.ndim != 5 or self.images.shape[4] != 3 or self.images.dtype != np.uint8
        or len(self.wnids) != self.images.shape[0]):
      raise ValueError(f"images must be (len(wnids), N, S, S, 3) uint8, got "
                       f"{self.images.shape} {self.images.dtype} for {len(self.wnids)} wnids")

  @property
  def class_ids(self) -> np.ndarray:
    """(num_classes,) int32: each wnid's number (n01532829 -> 1532829)."""
    return np.array([int(w[1:]) for w in self.wnids], np.int32)

  def to_class_split(self) -> splits.ClassSplit:
    return splits.ClassSplit(images=self.images, character_ids=self.class_ids,
                             rotations=np.zeros(len(self.wnids), np.int32))


def resolve_data_dir(data_dir: str | os.PathLike | None) -> pathlib.Path:
  """The flag value, else $ADVMAML_MINI_IMAGENET_DIR, else the user cache."""
  return cache.resolve_dir(data_dir, DATA_DIR_ENV, "mini_imagenet")[0]


def _how_to_get(folder: pathlib.Path) -> str:
  return (f"Put either {', '.join(PICKLE_NAMES.values())} (the shared Mini-ImageNet pickle "
          f"caches), or {', '.join(CSV_NAMES.values())} (Ravi & Larochelle's split, "
          f"{CSV_URL}) with the ImageNet images in {folder / IMAGE_FOLDER}/, in {folder}; "
          f"select another folder with --data_dir or ${DATA_DIR_ENV}. ImageNet's licence "
          "forbids redistribution, so nothing is downloaded.")


def _check_wnid(wnid: Any, source: str, fix: str) -> str:
  if type(wnid) is bytes:
    wnid = wnid.decode("ascii", "replace")
  if type(wnid) is not str or not _WNID_RE.fullmatch(wnid):
    raise DataError(f"{source}: class {wnid!r} is not an ImageNet wnid (n + 8 digits). {fix}")
  return wnid


def _equal_counts(counts: dict[str, int], source: str, fix: str) -> int:
  """The common number of images per class; DataError if classes differ."""
  values = list(counts.values())
  common = max(set(values), key=values.count)
  odd = [f"{w} ({n})" for w, n in counts.items() if n != common]
  if odd or common == 0:
    raise DataError(
        f"{source}: classes must all have the same, non-zero number of images (600 in "
        f"Mini-ImageNet); most have {common}"
        + (f" but {', '.join(odd[:5])}{' ...' if len(odd) > 5 else ''} differ" if odd else "")
        + f". {fix}")
  return common


# ---------------------------------------------------------------------------
# The pickle caches.
# ---------------------------------------------------------------------------


def read_pickle(path: pathlib.Path, fix: str = "") -> MiniImageNetSplit:
  """One ``mini-imagenet-cache-<split>.pkl`` -> its classes at the stored size."""
  try:
    with open(path, "rb") as f:
      obj = cache.safe_unpickle(f, source=str(path), fix=fix)
  except OSError as e:
    raise DataError(f"cannot read {path} ({e}). {fix}") from e
  if type(obj) is not dict:
    raise DataError(f"{path} holds a {type(obj).__name__}, not a dict. {fix}")
  obj = {k.decode("ascii", "replace") if type(k) is bytes else k: v for k, v in obj.items()}
  data, class_dict = obj.get("image_data"), obj.get("class_dict")
  if (type(data) is not np.ndarray or data.dtype != np.uint8 or data.ndim != 4
      or data.shape[3] != 3 or data.shape[1] != data.shape[2]):
    raise DataError(f"{path}: 'image_data' must be an (N, S, S, 3) uint8 array, got "
                    f"{getattr(data, 'shape', type(data).__name__)}. {fix}")
  if type(class_dict) is not dict or not class_dict:
    raise DataError(f"{path}: 'class_dict' must be a non-empty dict {{wnid: [indices]}}. {fix}")
  indices: dict[str, np.ndarray] = {}
  for wnid, idx in class_dict.items():
    wnid = _check_wnid(wnid, str(path), fix)
    try:
      idx = np.asarray(idx)
    except (TypeError, ValueError):
      idx = np.zeros((0, 0))
    if idx.ndim != 1 or (idx.size and (idx.dtype.kind not in "iu" or idx.min() < 0
                                       or idx.max() >= len(data))):
      raise DataError(f"{path}: class {wnid} must list image indices in 0..{len(data) - 1}. "
                      f"{fix}")
    indices[wnid] = idx
  _equal_counts({w: len(i) for w, i in indices.items()}, str(path), fix)
  wnids = tuple(sorted(indices))
  # One fancy index copies the kept images out of the pickle's buffer.
  images = data[np.stack([indices[w] for w in wnids])]
  return MiniImageNetSplit(images, wnids)


# ---------------------------------------------------------------------------
# The split CSVs and an image folder.
# ---------------------------------------------------------------------------


def read_csv(path: pathlib.Path, fix: str = "") -> dict[str, list[str]]:
  """A split file -> {wnid: [filenames]} in file order, wnids ascending."""
  try:
    with open(path, newline="", encoding="utf-8") as f:
      rows = list(csv.reader(f))
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise DataError(f"cannot read {path} ({e}). {fix}") from e
  if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
    raise DataError(f"{path}: the first line must be the header 'filename,label'. {fix}")
  classes: dict[str, list[str]] = {}
  for line, row in enumerate(rows[1:], start=2):
    if not row:
      continue
    if len(row) != 2:
      raise DataError(f"{path}, line {line}: expected 'filename,label', got {row!r}. {fix}")
    name, wnid = row[0].strip(), row[1].strip()
    # A plain file name inside images/, never a path that leaves it.
    if not name or name != os.path.basename(name) or name.startswith(".") or "\\" in name:
      raise DataError(f"{path}, line {line}: {name!r} is not a plain file name. {fix}")
    classes.setdefault(_check_wnid(wnid, f"{path}, line {line}", fix), []).append(name)
  if not classes:
    raise DataError(f"{path} lists no images. {fix}")
  _equal_counts({w: len(n) for w, n in classes.items()}, str(path), fix)
  return dict(sorted(classes.items()))


def _decode(path: pathlib.Path, image_size: int) -> np.ndarray:
  """One image file -> (image_size, image_size, 3) uint8 RGB, Lanczos-resized."""
  with Image.open(path) as img:
    rgb = img.convert("RGB")
  if rgb.size != (image_size, image_size):
    rgb = rgb.resize((image_size, image_size), Image.Resampling.LANCZOS)
  return np.asarray(rgb, dtype=np.uint8)


def _decode_split(folder: pathlib.Path, classes: dict[str, list[str]], image_size: int,
                  pool: concurrent.futures.Executor, fix: str) -> MiniImageNetSplit:
  paths = [folder / IMAGE_FOLDER / name for names in classes.values() for name in names]

  def decode(path: pathlib.Path) -> np.ndarray:
    try:
      return _decode(path, image_size)
    except _DECODE_ERRORS as e:
      raise DataError(f"{path} is not a decodable image ({e}). {fix}") from e

  images = np.stack(list(pool.map(decode, paths)))
  per_class = len(next(iter(classes.values())))
  return MiniImageNetSplit(images.reshape(len(classes), per_class, *images.shape[1:]),
                           tuple(classes))


# ---------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------


def _choose_source(folder: pathlib.Path, source: str) -> str:
  has_pickles = all((folder / n).is_file() for n in PICKLE_NAMES.values())
  has_csvs = all((folder / n).is_file() for n in CSV_NAMES.values())
  if source == "auto":
    source = "pickle" if has_pickles else "csv" if has_csvs else ""
  if (source == "pickle" and has_pickles) or (source == "csv" and has_csvs):
    return source
  if not folder.is_dir():
    raise DataError(f"Mini-ImageNet data folder {folder} does not exist. " + _how_to_get(folder))
  wanted = {"pickle": PICKLE_NAMES, "csv": CSV_NAMES}.get(source)
  groups = [wanted] if wanted else [PICKLE_NAMES, CSV_NAMES]
  missing = " / ".join(", ".join(n for n in g.values() if not (folder / n).is_file())
                       for g in groups)
  raise DataError(f"Mini-ImageNet files not found in {folder}: missing {missing}. "
                  + _how_to_get(folder))


def _check_disjoint(wnids: dict[str, tuple[str, ...]], files: dict[str, str], fix: str) -> None:
  """DataError if two splits share a class; a warning if the counts are not 64/16/20."""
  seen: dict[str, str] = {}
  for split, names in wnids.items():
    for wnid in names:
      if wnid in seen:
        raise DataError(f"class {wnid} is in both {files[seen[wnid]]} and {files[split]}; "
                        f"splits must not share classes. {fix}")
      seen[wnid] = split
  counts = {s: len(names) for s, names in wnids.items()}
  if counts != STANDARD_COUNTS:
    logging.warning("Mini-ImageNet splits have %s classes, not the standard %s of Ravi & "
                    "Larochelle (2017).", counts, STANDARD_COUNTS)


def _cache_arrays(data: dict[str, MiniImageNetSplit]) -> dict[str, np.ndarray]:
  out = {}
  for split, part in data.items():
    out[f"{split}_images"] = part.images
    out[f"{split}_wnids"] = np.array(part.wnids, dtype=np.str_)
  return out


def _from_cache(f: dict[str, np.ndarray]) -> dict[str, MiniImageNetSplit]:
  return {s: MiniImageNetSplit(f[f"{s}_images"], tuple(str(w) for w in f[f"{s}_wnids"]))
          for s in splits.SPLITS}


def load_mini_imagenet(data_dir: str | os.PathLike | None = None,
                       image_size: int = NATIVE_SIZE, source: str = "auto",
                       cache_dir: str | os.PathLike | None = None
                       ) -> dict[str, MiniImageNetSplit]:
  """Loads the three splits of Mini-ImageNet.

  Args:
    data_dir: folder with the pickles or the CSVs and ``images/``; None ->
      $ADVMAML_MINI_IMAGENET_DIR, else default_cache_dir()/mini_imagenet.
    image_size: side S of the images returned (84 = the standard size).
    source: "pickle", "csv", or "auto" (the pickles when all three are
      there, else the CSVs).
    cache_dir: where the decoded cache goes when the data folder is not
      writable; None -> default_cache_dir().

  Returns:
    {"train", "val", "test"} -> MiniImageNetSplit, images (C, N, S, S, 3)
    uint8. The pickles at their stored size are not cached (they already
    are the decoded arrays); everything else is, once.

  Raises:
    DataError: files missing, damaged, unsafe to unpickle, classes shared by
      two splits, or classes with unequal numbers of images.
  """
  if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
    raise ValueError(f"image_size must be a positive int, got {image_size!r}")
  if source not in SOURCES:
    raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
  folder = resolve_data_dir(data_dir)
  cache_root = pathlib.Path(cache_dir).expanduser() if cache_dir else cache.default_cache_dir()
  source = _choose_source(folder, source)
  fix = f"Replace the file(s) in {folder}. " + _how_to_get(folder)
  cache_path = (cache.cache_folder(folder, cache_root)
                / f"mini_imagenet_{source}_{image_size}px_v{FORMAT_VERSION}.npz")

  if source == "pickle":
    paths = {s: folder / n for s, n in PICKLE_NAMES.items()}
    fingerprint = f"v{FORMAT_VERSION};size={image_size};" + cache.stat_fingerprint(
        paths.values())
    data = cache.read_npz(cache_path, fingerprint, "Mini-ImageNet", _from_cache)
    if data is not None:
      return data
    data = {s: read_pickle(p, fix) for s, p in paths.items()}
    _check_disjoint({s: d.wnids for s, d in data.items()}, {s: str(p) for s, p in paths.items()},
                    fix)
    if all(d.images.shape[2] == image_size for d in data.values()):
      return data  # the pickles are the decoded arrays already
    data = {s: MiniImageNetSplit(_resize(d.images, image_size), d.wnids) for s, d in data.items()}
  else:
    csvs = {s: folder / n for s, n in CSV_NAMES.items()}
    classes = {s: read_csv(p, fix) for s, p in csvs.items()}
    _check_disjoint({s: tuple(c) for s, c in classes.items()},
                    {s: str(p) for s, p in csvs.items()}, fix)
    images = [folder / IMAGE_FOLDER / n for c in classes.values() for ns in c.values() for n in ns]
    missing = [p.name for p in images if not p.is_file()]
    if missing:
      raise DataError(
          f"{len(missing)} image(s) listed in the split CSVs are missing from "
          f"{folder / IMAGE_FOLDER}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. "
          + _how_to_get(folder))
    fingerprint = f"v{FORMAT_VERSION};size={image_size};" + cache.stat_fingerprint(
        list(csvs.values()) + images)
    data = cache.read_npz(cache_path, fingerprint, "Mini-ImageNet", _from_cache)
    if data is not None:
      return data
    logging.info("Decoding Mini-ImageNet from %s at %dx%d", folder, image_size, image_size)
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
      data = {s: _decode_split(folder, c, image_size, pool, fix) for s, c in classes.items()}
  cache.write_npz(cache_path, _cache_arrays(data), fingerprint, "Mini-ImageNet", compress=False)
  return data


def _resize(images: np.ndarray, image_size: int) -> np.ndarray:
  """(C, N, H, W, 3) -> (C, N, S, S, 3), Lanczos."""
  c, n = images.shape[:2]
  flat = cache.resize_rgb(images.reshape(c * n, *images.shape[2:]), image_size)
  return flat.reshape(c, n, image_size, image_size, 3)


def make_splits(data: dict[str, MiniImageNetSplit]) -> dict[str, splits.ClassSplit]:
  """{"train", "val", "test"} -> ClassSplit (character_ids = wnid numbers, rotations 0)."""
  return {s: data[s].to_class_split() for s in splits.SPLITS}
