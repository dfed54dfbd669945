"""CIFAR-FS and FC100: few-shot class splits of CIFAR-100.

Both use all 600 images of each CIFAR-100 class (its 500 train and 100 test
images, merged) and split the 100 fine classes into disjoint sets:

* CIFAR-FS (Bertinetto et al. 2019, "Meta-learning with differentiable
  closed-form solvers"): 64 / 16 / 20 classes, by the class lists of the
  release (github.com/bertinetto/r2d2, ``cifar-fs-splits``). Classes of one
  superclass may fall in different splits.
* FC100 (Oreshkin et al. 2018, "TADAM"): by superclass, 12 / 4 / 4
  superclasses = 60 / 20 / 20 classes, so no superclass is shared.

Sources: the official ``cifar-100-python.tar.gz``
(https://www.cs.toronto.edu/~kriz/cifar.html) or its extracted folder
``cifar-100-python/`` (files ``train``, ``test``, ``meta``), found in
``--data_dir``, else ``$ADVMAML_CIFAR_DIR``, else
``~/.cache/advmaml/cifar100`` (downloaded there when missing). The same
images come from TFDS ``cifar100`` through `advmaml.data.tfds_source`.

The files are Python 2 pickles; they are read with `cache.safe_unpickle`,
which runs no code from them. Images are decoded once (the rows of
``data`` are 3x32x32 channel-major, turned into 32x32x3) and cached as one
``.npz`` keyed by the files' sizes and modification times.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import tarfile
import zlib
from typing import Any

import numpy as np
from absl import logging

from advmaml.data import cache, splits
from advmaml.data.cache import DataError

DATA_DIR_ENV = "ADVMAML_CIFAR_DIR"
ARCHIVE_NAME = "cifar-100-python.tar.gz"
FOLDER_NAME = "cifar-100-python"
MEMBER_NAMES = ("train", "test", "meta")
URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
NATIVE_SIZE = 32
NUM_CLASSES = 100
NUM_SUPERCLASSES = 20
# Bump when the cached arrays change meaning, so old caches are rebuilt.
FORMAT_VERSION = 1

# The CIFAR-100 taxonomy (cs.toronto.edu/~kriz/cifar.html), with the names as
# spelled in the release's ``meta`` file.
SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
# Label ids: the release's meta lists both name sets in alphabetical order.
COARSE_NAMES = tuple(sorted(SUPERCLASSES))
FINE_NAMES = tuple(sorted(name for names in SUPERCLASSES.values() for name in names))

# CIFAR-FS class lists of Bertinetto et al. (2019), r2d2 release, alphabetical.
# Cross-checked against two independent re-implementations (torchmeta's
# assets and another project's lists), which agree with each other and with
# these; the release's own split files were not available offline.
CIFAR_FS_CLASSES: dict[str, tuple[str, ...]] = {
    "train": (
        "apple", "aquarium_fish", "bear", "bee", "bottle", "bowl", "boy", "bridge", "bus",
        "can", "castle", "caterpillar", "chair", "clock", "cloud", "cockroach", "couch", "cup",
        "dinosaur", "dolphin", "elephant", "forest", "girl", "hamster", "house", "kangaroo",
        "keyboard", "lawn_mower", "lion", "lizard", "lobster", "mountain", "mouse", "mushroom",
        "oak_tree", "orange", "orchid", "palm_tree", "pear", "pine_tree", "plate", "porcupine",
        "possum", "rabbit", "raccoon", "ray", "road", "seal", "shrew", "skunk", "skyscraper",
        "snake", "spider", "squirrel", "streetcar", "sunflower", "tank", "tiger", "train",
        "trout", "tulip", "turtle", "willow_tree", "wolf"),
    "val": (
        "beaver", "beetle", "butterfly", "camel", "cattle", "crab", "crocodile", "flatfish",
        "lamp", "maple_tree", "motorcycle", "otter", "sea", "shark", "television", "tractor"),
    "test": (
        "baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck",
        "plain", "poppy", "rocket", "rose", "snail", "sweet_pepper", "table", "telephone",
        "wardrobe", "whale", "woman", "worm"),
}

# FC100 superclass split of Oreshkin et al. (2018) (TADAM code: coarse ids
# train 1,2,3,4,5,6,9,10,15,17,18,19; val 8,11,13,16; test 0,7,12,14).
# Cross-checked against several independent re-implementations.
FC100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "train": (
        "fish", "flowers", "food_containers", "fruit_and_vegetables",
        "household_electrical_devices", "household_furniture", "large_man-made_outdoor_things",
        "large_natural_outdoor_scenes", "reptiles", "trees", "vehicles_1", "vehicles_2"),
    "val": ("large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates",
            "small_mammals"),
    "test": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}

# Dataset name -> its one split protocol (the value of --split).
PROTOCOLS = {"cifar_fs": "bertinetto", "fc100": "oreshkin"}


def _check_partition(lists: dict[str, tuple[str, ...]], universe: tuple[str, ...],
                     what: str) -> None:
  """Guards the hand-written lists above against typos and overlaps."""
  names = [n for split in splits.SPLITS for n in lists[split]]
  if sorted(names) != sorted(universe):
    raise AssertionError(f"{what} lists do not partition the {len(universe)} names")


_check_partition(CIFAR_FS_CLASSES, FINE_NAMES, "CIFAR-FS")
_check_partition(FC100_SUPERCLASSES, COARSE_NAMES, "FC100")
# Official superclass of each fine label id.
COARSE_OF_FINE = np.array(
    [COARSE_NAMES.index(next(c for c, f in SUPERCLASSES.items() if n in f)) for n in FINE_NAMES],
    np.int32)


@dataclasses.dataclass(frozen=True)
class Cifar100:
  """Every CIFAR-100 image, grouped by fine class.

  Attributes:
    images: (100, N, S, S, 3) uint8 RGB; class i is FINE_NAMES[i] (the
      official fine label id). Within a class: the images of the release's
      ``train`` file in file order, then those of ``test`` (N = 600 when full).
  """

  images: np.ndarray

  def __post_init__(self):
    if (self.images.ndim != 5 or self.images.shape[0] != NUM_CLASSES
        or self.images.shape[4] != 3 or self.images.dtype != np.uint8):
      raise ValueError(f"images must be ({NUM_CLASSES}, N, S, S, 3) uint8, got "
                       f"{self.images.shape} {self.images.dtype}")

  @property
  def coarse_labels(self) -> np.ndarray:
    """(100,) int32: the superclass id (index into COARSE_NAMES) of each class."""
    return COARSE_OF_FINE


def resolve_data_dir(data_dir: str | os.PathLike | None) -> tuple[pathlib.Path, bool]:
  """(folder, is_default): the flag value, else $ADVMAML_CIFAR_DIR, else the user cache."""
  return cache.resolve_dir(data_dir, DATA_DIR_ENV, "cifar100")


def _how_to_get(folder: pathlib.Path) -> str:
  return (f"Put {ARCHIVE_NAME} (from {URL}), or the {FOLDER_NAME}/ folder extracted from "
          f"it, in {folder}; select another folder with --data_dir or ${DATA_DIR_ENV}. "
          "Or use the TFDS copy: --dataset=cifar_fs_tfds / fc100_tfds.")


# ---------------------------------------------------------------------------
# From the release's pickles to one array per class.
# ---------------------------------------------------------------------------


def _str_keys(obj: Any, source: str, fix: str) -> dict[str, Any]:
  """A pickled dict with its Python 2 (bytes) keys as str."""
  if type(obj) is not dict:
    raise DataError(f"{source} holds a {type(obj).__name__}, not a dict. {fix}")
  return {k.decode("ascii", "replace") if type(k) is bytes else k: v for k, v in obj.items()}


def _names(value: Any, source: str, key: str, fix: str) -> tuple[str, ...]:
  if type(value) not in (list, tuple) or not all(type(v) in (str, bytes) for v in value):
    raise DataError(f"{source}: {key} must be a list of names. {fix}")
  return tuple(v.decode("ascii", "replace") if type(v) is bytes else v for v in value)


def check_meta(meta: Any, source: str, fix: str) -> None:
  """Checks that `meta` names the classes as the official release does.

  CIFAR-FS selects classes by name and FC100 by superclass name, so label ids
  must mean what they mean in the release.
  """
  meta = _str_keys(meta, source, fix)
  for key, want in (("fine_label_names", FINE_NAMES), ("coarse_label_names", COARSE_NAMES)):
    if key not in meta:
      raise DataError(f"{source} has no {key!r} entry. {fix}")
    got = _names(meta[key], source, key, fix)
    if got != want:
      diff = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                  min(len(got), len(want)))
      raise DataError(f"{source}: {key} differ from the official CIFAR-100 release "
                      f"({len(got)} names; first difference at id {diff}). {fix}")


def _labels(value: Any, n: int, high: int, source: str, key: str, fix: str) -> np.ndarray:
  try:
    labels = np.asarray(value)
  except (TypeError, ValueError):
    labels = np.zeros(0)
  if labels.shape != (n,) or labels.dtype.kind not in "iu" or (
      n and (labels.min() < 0 or labels.max() >= high)):
    raise DataError(f"{source}: {key} must be {n} integers in 0..{high - 1}. {fix}")
  return labels.astype(np.int64)


def parse_batch(batch: Any, source: str, fix: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One unpickled ``train``/``test`` file -> (images, fine, coarse).

  Returns:
    images: (M, 32, 32, 3) uint8, HWC (the file's rows are R, G, B planes of
      32x32, row-major); fine: (M,) fine label ids; coarse: (M,) superclass ids.
  """
  batch = _str_keys(batch, source, fix)
  for key in ("data", "fine_labels", "coarse_labels"):
    if key not in batch:
      raise DataError(f"{source} has no {key!r} entry; is it a CIFAR-100 file? {fix}")
  data = batch["data"]
  pixels = 3 * NATIVE_SIZE * NATIVE_SIZE
  if type(data) is not np.ndarray or data.dtype != np.uint8 or data.ndim != 2 \
      or data.shape[1] != pixels:
    raise DataError(f"{source}: 'data' must be an (N, {pixels}) uint8 array, got "
                    f"{getattr(data, 'shape', type(data).__name__)}. {fix}")
  n = data.shape[0]
  fine = _labels(batch["fine_labels"], n, NUM_CLASSES, source, "fine_labels", fix)
  coarse = _labels(batch["coarse_labels"], n, NUM_SUPERCLASSES, source, "coarse_labels", fix)
  images = data.reshape(n, 3, NATIVE_SIZE, NATIVE_SIZE).transpose(0, 2, 3, 1)
  return images, fine, coarse


def from_arrays(images: np.ndarray, fine: np.ndarray, coarse: np.ndarray, source: str,
                fix: str) -> Cifar100:
  """Groups labelled images by fine class, checking the release's invariants.

  Args:
    images: (M, S, S, 3) uint8 in the order to keep within each class.
    fine, coarse: (M,) fine and superclass label ids.
    source, fix: for error messages (where the data came from, what to do).

  Raises:
    DataError: a class has no images, classes have unequal numbers of images
      (the class pool needs the same number for every class), or a fine label
      is filed under another superclass than in the official taxonomy.
  """
  if fine.shape != (len(images),) or coarse.shape != fine.shape or (len(fine) and (
      fine.min() < 0 or fine.max() >= NUM_CLASSES or coarse.min() < 0
      or coarse.max() >= NUM_SUPERCLASSES)):
    raise DataError(f"{source}: expected one fine label in 0..{NUM_CLASSES - 1} and one "
                    f"superclass label in 0..{NUM_SUPERCLASSES - 1} per image. {fix}")
  wrong = np.flatnonzero(coarse != COARSE_OF_FINE[fine])
  if wrong.size:
    i = wrong[0]
    raise DataError(
        f"{source}: image {i} of class {FINE_NAMES[fine[i]]!r} has superclass id {coarse[i]}; "
        f"the official taxonomy files it under {COARSE_NAMES[COARSE_OF_FINE[fine[i]]]!r}. {fix}")
  counts = np.bincount(fine, minlength=NUM_CLASSES)
  if counts.min() == 0 or counts.min() != counts.max():
    common = int(np.bincount(counts).argmax())
    odd = [f"{FINE_NAMES[c]!r} ({counts[c]})" for c in np.flatnonzero(counts != common)]
    raise DataError(
        f"{source}: classes must all have the same number of images (the official release "
        f"has 600 each, train and test together); most have {common} but "
        f"{', '.join(odd[:5])}{' ...' if len(odd) > 5 else ''} differ. {fix}")
  order = np.argsort(fine, kind="stable")  # class-major, file order within a class
  per_class = int(counts[0])
  return Cifar100(np.ascontiguousarray(images[order]).reshape(
      NUM_CLASSES, per_class, *images.shape[1:]))


def _member_source(source: pathlib.Path, name: str) -> str:
  """How messages name one of the three files, in a folder or in the archive."""
  return str(source / name) if source.is_dir() else f"{source}:{FOLDER_NAME}/{name}"


def _read_members(source: pathlib.Path, fix: str) -> dict[str, Any]:
  """Unpickles ``train``, ``test`` and ``meta`` from the archive or the folder."""
  out = {}
  if source.is_dir():
    for name in MEMBER_NAMES:
      try:
        with open(source / name, "rb") as f:
          out[name] = cache.safe_unpickle(f, source=_member_source(source, name), fix=fix)
      except OSError as e:
        raise DataError(f"cannot read {source / name} ({e}). {fix}") from e
    return out
  try:
    with tarfile.open(source, "r:gz") as archive:
      # One pass in archive order: seeking back in a gzip stream re-inflates it.
      for member in archive:
        top, _, leaf = member.name.removeprefix("./").partition("/")
        if top == FOLDER_NAME and leaf in MEMBER_NAMES and member.isfile():
          with archive.extractfile(member) as f:
            out[leaf] = cache.safe_unpickle(f, source=_member_source(source, leaf), fix=fix)
  except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
    raise DataError(f"{source} is not a readable .tar.gz file ({e}). {fix}") from e
  missing = [f"{FOLDER_NAME}/{n}" for n in MEMBER_NAMES if n not in out]
  if missing:
    raise DataError(f"{source} lacks {', '.join(missing)}; it is not the official archive. {fix}")
  return out


def read_release(source: pathlib.Path, fix: str = "") -> Cifar100:
  """Decodes the official archive or extracted folder at native size (no cache)."""
  members = _read_members(source, fix)
  check_meta(members["meta"], _member_source(source, "meta"), fix)
  parts = [parse_batch(members[name], _member_source(source, name), fix)
           for name in ("train", "test")]
  images, fine, coarse = (np.concatenate(p) for p in zip(*parts))
  return from_arrays(images, fine, coarse, str(source), fix)


def resize(data: Cifar100, image_size: int) -> Cifar100:
  """Lanczos-resized copy; `data` itself at the native 32x32."""
  c, n = data.images.shape[:2]
  flat = data.images.reshape(c * n, *data.images.shape[2:])
  return Cifar100(cache.resize_rgb(flat, image_size).reshape(c, n, image_size, image_size, 3))


# ---------------------------------------------------------------------------
# Finding the files, caching the decoded arrays.
# ---------------------------------------------------------------------------


def _is_release_folder(folder: pathlib.Path) -> bool:
  return all((folder / n).is_file() for n in MEMBER_NAMES)


def _is_tar_gz(path: str) -> bool:
  try:
    with tarfile.open(path, "r:gz") as archive:
      return archive.next() is not None
  except (tarfile.TarError, EOFError, OSError, zlib.error):
    return False


def find_source(folder: pathlib.Path, cache_root: pathlib.Path, download: bool,
                is_default: bool) -> pathlib.Path:
  """The release to read: an extracted folder, else the archive (downloaded if allowed)."""
  fallback = cache_root / "cifar100"  # download target for a read-only folder
  for candidate in (folder / FOLDER_NAME, folder):
    if _is_release_folder(candidate):
      return candidate
  for candidate in (folder / ARCHIVE_NAME, fallback / ARCHIVE_NAME):
    if candidate.is_file():
      return candidate
  if not folder.is_dir() and not (download and is_default):
    raise DataError(f"CIFAR-100 data folder {folder} does not exist. " + _how_to_get(folder))
  partial = [p for p in (folder / FOLDER_NAME, folder) if any(
      (p / n).is_file() for n in MEMBER_NAMES)]
  tried = ""
  if download:
    try:
      folder.mkdir(parents=True, exist_ok=True)
    except OSError:
      pass
    target = folder if cache.is_writable(folder) else fallback
    logging.info("Downloading %s to %s", URL, target)
    try:
      cache.download_file(URL, target / ARCHIVE_NAME, _is_tar_gz, "a .tar.gz file")
      return target / ARCHIVE_NAME
    except OSError as e:  # urllib.error.URLError is an OSError
      tried = f" Download from {URL} failed: {e}."
  where = (f" {partial[0]} holds only some of {', '.join(MEMBER_NAMES)}." if partial else "")
  raise DataError(
      f"CIFAR-100 not found: neither {ARCHIVE_NAME} nor {FOLDER_NAME}/ (with files "
      f"{', '.join(MEMBER_NAMES)}) is in {folder}.{where}{tried} " + _how_to_get(folder))


def _source_files(source: pathlib.Path) -> list[pathlib.Path]:
  return [source / n for n in MEMBER_NAMES] if source.is_dir() else [source]


def load_cifar100(data_dir: str | os.PathLike | None = None, image_size: int = NATIVE_SIZE,
                  download: bool = True,
                  cache_dir: str | os.PathLike | None = None) -> Cifar100:
  """Loads all 60000 CIFAR-100 images, decoding the release once and caching them.

  Args:
    data_dir: folder holding ``cifar-100-python.tar.gz`` or ``cifar-100-python/``
      (or the extracted files themselves); None -> $ADVMAML_CIFAR_DIR, else
      default_cache_dir()/cifar100.
    image_size: side S of the images returned (32 = no resizing).
    download: fetch the archive from the official URL when it is missing.
    cache_dir: where the cache (and a download) goes when the data folder is
      not writable; None -> default_cache_dir().

  Returns:
    Cifar100 with images (100, 600, S, S, 3) uint8.

  Raises:
    DataError: the files are missing (and cannot be downloaded), damaged, not
      the official release, or unsafe to unpickle.
  """
  if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
    raise ValueError(f"image_size must be a positive int, got {image_size!r}")
  folder, is_default = resolve_data_dir(data_dir)
  cache_root = pathlib.Path(cache_dir).expanduser() if cache_dir else cache.default_cache_dir()
  source = find_source(folder, cache_root, download, is_default)
  fix = (f"Replace it with the official release ({URL}); select another folder with "
         f"--data_dir or ${DATA_DIR_ENV}.")
  fingerprint = (f"v{FORMAT_VERSION};size={image_size};"
                 f"{cache.stat_fingerprint(_source_files(source))}")
  cache_path = (cache.cache_folder(folder, cache_root)
                / f"cifar100_{image_size}px_v{FORMAT_VERSION}.npz")
  data = cache.read_npz(cache_path, fingerprint, "CIFAR-100", lambda f: Cifar100(f["images"]))
  if data is None:
    logging.info("Decoding CIFAR-100 from %s at %dx%d", source, image_size, image_size)
    data = resize(read_release(source, fix), image_size)
    cache.write_npz(cache_path, {"images": data.images}, fingerprint, "CIFAR-100",
                    compress=False)
  return data


# ---------------------------------------------------------------------------
# Class splits.
# ---------------------------------------------------------------------------


def split_class_ids(dataset: str) -> dict[str, np.ndarray]:
  """Fine label ids of each split of `dataset` ("cifar_fs" or "fc100"), ascending."""
  if dataset == "cifar_fs":
    ids = {s: [FINE_NAMES.index(n) for n in names] for s, names in CIFAR_FS_CLASSES.items()}
  elif dataset == "fc100":
    ids = {s: [i for i in range(NUM_CLASSES) if COARSE_NAMES[COARSE_OF_FINE[i]] in supers]
           for s, supers in FC100_SUPERCLASSES.items()}
  else:
    raise ValueError(f"unknown CIFAR-100 split {dataset!r}; expected one of {sorted(PROTOCOLS)}")
  return {s: np.array(sorted(ids[s]), np.int32) for s in splits.SPLITS}


def make_splits(data: Cifar100, dataset: str) -> dict[str, splits.ClassSplit]:
  """{"train", "val", "test"} -> ClassSplit of CIFAR-FS or FC100.

  ClassSplit.images is (C, N, S, S, 3) uint8 with classes in ascending fine
  label id; character_ids holds those ids; rotations are all 0.
  """
  return {s: splits.ClassSplit(images=data.images[ids], character_ids=ids,
                               rotations=np.zeros(len(ids), np.int32))
          for s, ids in split_class_ids(dataset).items()}
