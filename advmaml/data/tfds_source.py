"""Omniglot and CIFAR-100 read from TensorFlow Datasets (TFDS), without TensorFlow.

TFDS's random-access reader (``builder.as_data_source``, array_record files)
decodes images with PIL and needs no TensorFlow, so data that was prepared in
the ``array_record`` format can be read with only ``tensorflow-datasets`` and
``array_record`` installed. Preparing (downloading and writing the files)
does need TensorFlow: TFDS encodes images and walks the Omniglot archive with
``tf.io``. Prepare once on any machine with TensorFlow::

    pip install tensorflow tensorflow-datasets
    tfds build omniglot cifar100 --file_format=array_record --data_dir=DIR

and point ``--tfds_data_dir`` (else ``--data_dir``, else ``$TFDS_DATA_DIR``,
else ``~/tensorflow_datasets``) at DIR. With ``download=True`` and
TensorFlow installed, `load_tfds_classes` prepares missing data itself.

Mapping to the loaders of the official files:

* ``omniglot``: TFDS ``label`` is the global character id - 1 and
  ``alphabet`` an index into the sorted alphabet names; split ``train`` is
  images_background.zip and ``test`` images_evaluation.zip (``small1`` and
  ``small2`` are subsets of ``train`` and are ignored). TFDS stores the
  release's 1-bit PNGs as they are; they are decoded here, not by TFDS (whose
  numpy decoder returns them as 0/1), turned to grey, Lanczos-resized and
  inverted exactly as `omniglot.load_omniglot` does (ink = 255), giving an
  `OmniglotData` for `splits.make_splits`. TFDS does not keep the drawer
  number, so the 20 images of a character are in TFDS record order rather
  than drawers 01..20.
* ``cifar100``: ``label`` and ``coarse_label`` are the official fine and
  superclass ids; the ``id`` field (``train_00042``) restores the order of
  the official files, so the result equals `cifar.load_cifar100`'s.

Decoded arrays are cached in ``<cache_dir>/tfds/`` keyed by the sizes and
modification times of the prepared files.
"""

from __future__ import annotations

import importlib.util
import io
import os
import pathlib
from typing import Any, Iterator

import numpy as np
from absl import logging
from PIL import Image

from advmaml.data import cache, cifar, omniglot
from advmaml.data.cache import DataError

NAMES = ("omniglot", "cifar100")
DATA_DIR_ENV = "TFDS_DATA_DIR"  # TFDS's own variable, honoured by TFDS itself
DEFAULT_IMAGE_SIZE = {"omniglot": 28, "cifar100": cifar.NATIVE_SIZE}
# Bump when the cached arrays change meaning, so old caches are rebuilt.
FORMAT_VERSION = 1
_READ_CHUNK = 1024  # records fetched per batched read


def _install_hint() -> str:
  return "pip install tensorflow-datasets array_record"


def _prepare_hint(name: str, root: str) -> str:
  return (f"Prepare it on a machine with TensorFlow (pip install 'advmaml[tfds-prepare]' or pip install tensorflow): "
          f"`tfds build {name} --file_format=array_record --data_dir={root}`, or run with "
          "download enabled there; then point --tfds_data_dir (or --data_dir, or "
          f"${DATA_DIR_ENV}) at that folder.")


def _has_tensorflow() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise DataError(f"Reading TFDS data needs tensorflow-datasets ({e}); {_install_hint()}.") \
        from e
  return tfds


def _builder(name: str, data_dir: str | os.PathLike | None, download: bool) -> Any:
  """A TFDS builder whose data is prepared (preparing it if allowed)."""
  tfds = _import_tfds()
  root = os.fspath(data_dir) if data_dir not in (None, "") else None
  try:
    # No file_format here: TFDS refuses one that differs from the prepared data's.
    builder = tfds.builder(name, data_dir=root)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"TFDS cannot open {name!r} in {root or 'its default folder'} "
                    f"({type(e).__name__}: {e}).") from e
  if builder.is_prepared():
    return builder
  where = builder.data_dir  # <root>/<name>/<version>
  root_shown = root or str(pathlib.Path(where).parents[1])
  if not download:
    raise DataError(f"TFDS {name} is not prepared in {where} (no dataset_info.json and "
                    f"data files there). " + _prepare_hint(name, root_shown))
  if not _has_tensorflow():
    # Checked first: TFDS would otherwise fail mid-way, after downloading.
    raise DataError(f"TFDS {name} is not prepared in {where}, and preparing it needs "
                    f"TensorFlow, which is not installed: pip install tensorflow. "
                    + _prepare_hint(name, root_shown))
  logging.info("Preparing TFDS %s in %s", name, where)
  try:
    builder = tfds.builder(name, data_dir=root, file_format="array_record")
    builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"TFDS could not prepare {name} in {where} ({type(e).__name__}: {e}). "
                    + _prepare_hint(name, root_shown)) from e
  return builder


def _data_source(builder: Any, split: str) -> Any:
  """Random access to a split's records, images left as their encoded bytes.

  TFDS's own numpy image decoding takes the PIL image's raw values: a 1-bit
  PNG (as Omniglot's) comes out as 0/1, a palette PNG as palette indices.
  So images are decoded here, by `_decode_image`.
  """
  tfds = _import_tfds()
  try:
    return builder.as_data_source(split=split,
                                  decoders={"image": tfds.decode.SkipDecoding()})
  except ModuleNotFoundError as e:
    raise DataError(f"Reading TFDS {builder.name} needs a module that is missing ({e}); "
                    f"{_install_hint()}.") from e
  except (NotImplementedError, ValueError, KeyError) as e:
    raise DataError(
        f"TFDS {builder.name} in {builder.data_dir} cannot be read without TensorFlow "
        f"({type(e).__name__}: {e}). It must be prepared in the array_record format: "
        f"`tfds build {builder.name} --file_format=array_record` or "
        "`tfds convert_format --out_file_format=array_record` (both need "
        "pip install tensorflow).") from e


def _records(source: Any) -> Iterator[dict[str, Any]]:
  """Every record of a data source, in order (batched reads where supported)."""
  n = len(source)
  batched = getattr(source, "__getitems__", None)
  for start in range(0, n, _READ_CHUNK):
    keys = list(range(start, min(n, start + _READ_CHUNK)))
    yield from (batched(keys) if batched is not None else (source[k] for k in keys))


def _fingerprint(builder: Any, image_size: int) -> str | None:
  """What a cache was built from, or None when there are no prepared files (mock data)."""
  folder = pathlib.Path(builder.data_dir)
  if not builder.is_prepared() or not folder.is_dir():
    return None
  files = sorted(p for p in folder.iterdir() if p.is_file())
  return (f"v{FORMAT_VERSION};{builder.name}:{builder.version};size={image_size};"
          + cache.stat_fingerprint(files))


def _label_names(builder: Any, feature: str, official: tuple[str, ...]) -> None:
  """Checks that TFDS's class names, where known, are the official ones."""
  names = tuple(builder.info.features[feature].names)
  if names == tuple(str(i) for i in range(len(official))):
    return  # names unknown (mock data or info without label files): ids must do
  if names != official:
    raise DataError(f"TFDS {builder.name} in {builder.data_dir}: the names of {feature!r} "
                    "are not those of the official CIFAR-100 release, so class ids would "
                    "mean other classes. Re-prepare the data with TFDS.")


# ---------------------------------------------------------------------------
# The two data sets.
# ---------------------------------------------------------------------------


def _decode_image(value: Any, mode: str, where: str) -> Image.Image:
  """A record's image in PIL `mode`; `value` is encoded bytes, or an array (mock data)."""
  try:
    if isinstance(value, (bytes, bytearray)):
      with Image.open(io.BytesIO(value)) as img:
        return img.convert(mode)
    array = np.asarray(value, np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
      array = array[..., 0]
    return Image.fromarray(array).convert(mode)
  except (OSError, ValueError, SyntaxError, EOFError, TypeError) as e:
    raise DataError(f"{where}: an image cannot be decoded ({e}). Re-prepare the data with "
                    "TFDS.") from e


def _ink(value: Any, image_size: int, where: str) -> np.ndarray:
  """A TFDS Omniglot image -> (S, S) uint8, ink = 255, as from the official zips."""
  if isinstance(value, (bytes, bytearray)):  # the release's PNG, stored as is
    try:
      return omniglot.decode_png(value, image_size)
    except (OSError, ValueError, SyntaxError, EOFError) as e:
      raise DataError(f"{where}: an image cannot be decoded ({e}). Re-prepare the data with "
                      "TFDS.") from e
  # Arrays (mock data): the same steps as omniglot.decode_png.
  gray = _decode_image(value, "L", where)
  if gray.size != (image_size, image_size):
    gray = gray.resize((image_size, image_size), Image.Resampling.LANCZOS)
  return 255 - np.asarray(gray, dtype=np.uint8)


def _read_omniglot(builder: Any, image_size: int) -> omniglot.OmniglotData:
  names = builder.info.features["alphabet"].names
  where = f"TFDS omniglot in {builder.data_dir}"
  chars: dict[int, tuple[int, bool, list[np.ndarray]]] = {}
  for split, background in (("train", True), ("test", False)):
    for record in _records(_data_source(builder, split)):
      label, alphabet = int(record["label"]), int(record["alphabet"])
      entry = chars.setdefault(label, (alphabet, background, []))
      if entry[:2] != (alphabet, background):
        raise DataError(f"TFDS omniglot in {builder.data_dir}: character {label + 1:04d} "
                        "appears under two alphabets or in both train and test. Re-prepare "
                        "the data with TFDS.")
      entry[2].append(_ink(record["image"], image_size, where))
  if not chars:
    raise DataError(f"TFDS omniglot in {builder.data_dir} holds no images.")
  bad = [(label + 1, len(e[2])) for label, e in sorted(chars.items())
         if len(e[2]) != omniglot.NUM_DRAWERS]
  if bad:
    raise DataError(f"TFDS omniglot in {builder.data_dir}: character {bad[0][0]:04d} has "
                    f"{bad[0][1]} images; every character needs {omniglot.NUM_DRAWERS} "
                    f"({len(bad)} character(s) differ). Re-prepare the data with TFDS.")
  labels = sorted(chars)
  return omniglot.OmniglotData(
      images=np.stack([np.stack(chars[k][2]) for k in labels]),
      character_ids=np.array(labels, np.int32) + 1,  # TFDS label = global id - 1
      alphabets=tuple(names[chars[k][0]] for k in labels),
      background=np.array([chars[k][1] for k in labels], bool))


def _read_cifar100(builder: Any, image_size: int) -> cifar.Cifar100:
  _label_names(builder, "label", cifar.FINE_NAMES)
  _label_names(builder, "coarse_label", cifar.COARSE_NAMES)
  parts = []
  for split in ("train", "test"):
    records = list(_records(_data_source(builder, split)))
    # Zero-padded ids ("train_00042") sort into the official files' order.
    records.sort(key=lambda r: r["id"].decode() if isinstance(r["id"], bytes) else str(r["id"]))
    if records:
      where = f"TFDS cifar100 in {builder.data_dir}"
      parts.append((np.stack([np.asarray(_decode_image(r["image"], "RGB", where))
                              for r in records]),
                    np.array([int(r["label"]) for r in records], np.int64),
                    np.array([int(r["coarse_label"]) for r in records], np.int64)))
  if not parts:
    raise DataError(f"TFDS cifar100 in {builder.data_dir} holds no images.")
  images, fine, coarse = (np.concatenate(p) for p in zip(*parts))
  if images.shape[1:] != (cifar.NATIVE_SIZE, cifar.NATIVE_SIZE, 3):
    raise DataError(f"TFDS cifar100 in {builder.data_dir}: images are {images.shape[1:]}, "
                    "not 32x32x3.")
  data = cifar.from_arrays(images, fine, coarse, f"TFDS cifar100 in {builder.data_dir}",
                           "Re-prepare the data with TFDS.")
  return cifar.resize(data, image_size)


def load_tfds_classes(name: str, data_dir: str | os.PathLike | None = None, *,
                      image_size: int | None = None, download: bool = False,
                      cache_dir: str | os.PathLike | None = None
                      ) -> omniglot.OmniglotData | cifar.Cifar100:
  """Loads a TFDS data set as per-class image arrays.

  Args:
    name: "omniglot" or "cifar100".
    data_dir: the TFDS data folder (holding <name>/<version>/); None ->
      $TFDS_DATA_DIR, else ~/tensorflow_datasets (TFDS's own default).
    image_size: side S of the images; None -> 28 (omniglot), 32 (cifar100).
    download: prepare missing data (needs TensorFlow and network).
    cache_dir: the decoded cache goes in <cache_dir>/tfds/; None ->
      default_cache_dir().

  Returns:
    omniglot: OmniglotData, images (1623, 20, S, S) uint8, ink = 255.
    cifar100: cifar.Cifar100, images (100, 600, S, S, 3) uint8.

  Raises:
    DataError: TFDS missing, data not prepared (and not preparable here),
      prepared in a format that needs TensorFlow, or not as expected.
  """
  if name not in NAMES:
    raise ValueError(f"unknown TFDS data set {name!r}; expected one of {NAMES}")
  image_size = DEFAULT_IMAGE_SIZE[name] if image_size is None else image_size
  if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
    raise ValueError(f"image_size must be a positive int, got {image_size!r}")
  builder = _builder(name, data_dir, download)
  cache_root = pathlib.Path(cache_dir).expanduser() if cache_dir else cache.default_cache_dir()
  cache_path = cache_root / "tfds" / f"{name}_{image_size}px_v{FORMAT_VERSION}.npz"
  fingerprint = _fingerprint(builder, image_size)
  data = _read_cache(name, cache_path, fingerprint) if fingerprint else None
  if data is None:
    logging.info("Decoding TFDS %s from %s at %dx%d", name, builder.data_dir, image_size,
                 image_size)
    read = _read_omniglot if name == "omniglot" else _read_cifar100
    data = read(builder, image_size)
    if fingerprint:
      _write_cache(cache_path, data, fingerprint)
  return data


def _read_cache(name: str, path: pathlib.Path, fingerprint: str):
  if name == "omniglot":  # same cache layout as the loader of the official zips
    return omniglot._read_cache(path, fingerprint)  # pylint: disable=protected-access
  return cache.read_npz(path, fingerprint, "TFDS CIFAR-100",
                        lambda f: cifar.Cifar100(f["images"]))


def _write_cache(path: pathlib.Path, data, fingerprint: str) -> None:
  if isinstance(data, omniglot.OmniglotData):
    omniglot._write_cache(path, data, fingerprint)  # pylint: disable=protected-access
  else:
    cache.write_npz(path, {"images": data.images}, fingerprint, "TFDS CIFAR-100",
                    compress=False)
