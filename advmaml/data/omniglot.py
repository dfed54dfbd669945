"""Reads the Omniglot data set from the zip files of its official release.

The official release (github.com/brendenlake/omniglot, folder ``python/``) has
two zips, ``images_background.zip`` (30 alphabets, characters 0001-0964) and
``images_evaluation.zip`` (20 alphabets, characters 0965-1623), laid out as
``images_background/<Alphabet>/characterNN/<IIII>_<YY>.png`` with IIII the
global character id and YY the drawer (01..20). Each PNG is a 105x105 1-bit
image, black strokes on white.

`load_omniglot` decodes every PNG once (resized, inverted so ink is 255) and
caches the result as one ``.npz`` file keyed by a fingerprint of the zips.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
import pathlib
import re
import tempfile  # noqa: F401  (tests patch omniglot.tempfile; the probe is in cache)
import urllib.error
import urllib.request  # noqa: F401  (tests patch omniglot.urllib.request.urlopen)
import zipfile
import zlib
from typing import NamedTuple

import numpy as np
from absl import logging
from PIL import Image

from advmaml.data import cache
# Re-exported: these lived here before advmaml.data.cache existed.
from advmaml.data.cache import DataError, default_cache_dir
from advmaml.data.cache import is_writable as _is_writable

DATA_DIR_ENV = "ADVMAML_DATA_DIR"
ZIP_NAMES = ("images_background.zip", "images_evaluation.zip")
URL_BASE = "https://github.com/brendenlake/omniglot/raw/master/python/"
URLS = {name: URL_BASE + name for name in ZIP_NAMES}
NUM_DRAWERS = 20
# Bump when the cached arrays change meaning, so old caches are rebuilt.
FORMAT_VERSION = 1
DOWNLOAD_TIMEOUT_S = 30.0

_PNG_RE = re.compile(r"(\d{4})_(\d{2})\.png")
_CHARACTER_RE = re.compile(r"character\d+")
# Decoder errors PIL raises on a damaged PNG (SyntaxError: "broken PNG file").
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)

@dataclasses.dataclass(frozen=True)
class OmniglotData:
  """Every Omniglot image, grouped by character.

  Attributes:
    images: (num_characters, 20, S, S) uint8; ink = 255, background = 0.
      Characters sorted by global id, drawers 01..20 in order.
    character_ids: (num_characters,) int32 global ids (1..1623 when full).
    alphabets: the alphabet name of each character, num_characters entries.
    background: (num_characters,) bool, True if from images_background.zip.
  """

  images: np.ndarray
  character_ids: np.ndarray
  alphabets: tuple[str, ...]
  background: np.ndarray

  def __post_init__(self):
    n = self.images.shape[0]
    if (self.images.ndim != 4 or self.images.shape[1] != NUM_DRAWERS
        or self.images.dtype != np.uint8):
      raise ValueError(f"images must be (n, {NUM_DRAWERS}, S, S) uint8, got "
                       f"{self.images.shape} {self.images.dtype}")
    if (self.character_ids.shape != (n,) or self.background.shape != (n,)
        or len(self.alphabets) != n):
      raise ValueError("character_ids, alphabets and background must have one "
                       f"entry per character ({n})")


class CharacterIndex(NamedTuple):
  """Where one character's PNGs lie inside a zip."""

  character_id: int
  alphabet: str
  members: tuple[str, ...]  # 20 member names, drawers 01..20 in order


def resolve_data_dir(data_dir: str | os.PathLike | None) -> pathlib.Path:
  """The flag value, else $ADVMAML_DATA_DIR, else default_cache_dir()/omniglot."""
  for value in (data_dir, os.environ.get(DATA_DIR_ENV)):
    if value is not None and os.fspath(value) != "":
      return pathlib.Path(os.fspath(value)).expanduser()
  return default_cache_dir() / "omniglot"


def _is_ignorable(name: str) -> bool:
  """Folder entries and OS litter (__MACOSX/, .DS_Store) carry no images."""
  parts = name.split("/")
  return name.endswith("/") or any(
      p.startswith(".") or p == "__MACOSX" or p == "Thumbs.db" for p in parts)


def index_zip(path: str | os.PathLike) -> list[CharacterIndex]:
  """Lists the characters of one official zip, sorted by global id.

  Checks the layout: ``<zip stem>/<Alphabet>/characterNN/<IIII>_<YY>.png``,
  one character id per folder, ids unique, drawers exactly 01..20.

  Raises:
    DataError: the file is not a zip, or its layout is not the official one.
  """
  path = pathlib.Path(path)
  top = path.name.removesuffix(".zip")
  fix = (f"Delete it and put the official {path.name} there "
         f"({URLS.get(path.name, URL_BASE)}).")
  try:
    with zipfile.ZipFile(path) as zf:
      names = zf.namelist()
  except (zipfile.BadZipFile, OSError) as e:
    raise DataError(f"{path} is not a readable zip file ({e}). {fix}") from e

  folders: dict[tuple[str, str], dict[int, str]] = {}
  folder_ids: dict[tuple[str, str], int] = {}
  for name in names:
    if _is_ignorable(name):
      continue
    parts = name.split("/")
    match = _PNG_RE.fullmatch(parts[-1])
    if (len(parts) != 4 or parts[0] != top or match is None
        or not _CHARACTER_RE.fullmatch(parts[2])):
      raise DataError(
          f"{path}: unexpected member {name!r}; expected "
          f"{top}/<Alphabet>/characterNN/<IIII>_<YY>.png. {fix}")
    folder = (parts[1], parts[2])
    char_id, drawer = int(match.group(1)), int(match.group(2))
    if folder_ids.setdefault(folder, char_id) != char_id:
      raise DataError(f"{path}: folder {top}/{parts[1]}/{parts[2]} mixes "
                      f"character ids {folder_ids[folder]} and {char_id}. {fix}")
    drawers = folders.setdefault(folder, {})
    if drawer in drawers:
      raise DataError(f"{path}: duplicate member {name!r}. {fix}")
    drawers[drawer] = name

  if not folders:
    raise DataError(f"{path} holds no character images. {fix}")
  entries = []
  seen: dict[int, tuple[str, str]] = {}
  # In id order, so the first problem reported is the lowest character.
  for folder, drawers in sorted(folders.items(), key=lambda kv: folder_ids[kv[0]]):
    char_id = folder_ids[folder]
    where = f"{top}/{folder[0]}/{folder[1]}"
    if char_id in seen:
      raise DataError(f"{path}: character id {char_id:04d} appears in both "
                      f"{top}/{'/'.join(seen[char_id])} and {where}. {fix}")
    seen[char_id] = folder
    if sorted(drawers) != list(range(1, NUM_DRAWERS + 1)):
      raise DataError(
          f"{path}: character {char_id:04d} ({where}) has {len(drawers)} drawers "
          f"{sorted(drawers)}; expected {NUM_DRAWERS} drawers 01..20. {fix}")
    members = tuple(drawers[d] for d in range(1, NUM_DRAWERS + 1))
    entries.append(CharacterIndex(char_id, folder[0], members))
  return entries


def _ensure_writable(folder: pathlib.Path) -> bool:
  """Creates `folder` if needed; whether files can then be written in it."""
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError:
    return False
  return _is_writable(folder)


def _download(url: str, dest: pathlib.Path) -> None:
  """Fetches `url` into `dest` atomically; raises OSError on any failure."""
  cache.download_file(url, dest, zipfile.is_zipfile, "a zip file", DOWNLOAD_TIMEOUT_S)


def _find_zips(data_dir: pathlib.Path, cache_dir: pathlib.Path, download: bool,
               is_default: bool) -> list[pathlib.Path]:
  """The paths of both zips, downloading missing ones when allowed."""
  fallback = cache_dir / "omniglot"  # download target for a read-only data_dir
  if not data_dir.is_dir() and not (download and is_default):
    raise DataError(
        f"Omniglot data folder {data_dir} does not exist. Create it and put "
        + " and ".join(f"{n} ({URLS[n]})" for n in ZIP_NAMES)
        + f" in it, or select another folder with --data_dir or ${DATA_DIR_ENV}.")
  paths, missing, errors = [], [], []
  for name in ZIP_NAMES:
    path = next((d / name for d in (data_dir, fallback) if (d / name).is_file()), None)
    if path is None and download:
      target = data_dir if _ensure_writable(data_dir) else fallback
      logging.info("Downloading %s to %s", URLS[name], target)
      try:
        _download(URLS[name], target / name)
        path = target / name
      except (OSError, urllib.error.URLError) as e:  # URLError covers HTTP errors
        errors.append(f"{URLS[name]}: {e}")
    if path is None:
      missing.append(name)
    paths.append(path)
  if missing:
    tried = (" Download failed: " + "; ".join(errors) + ".") if errors else ""
    raise DataError(
        f"Omniglot file(s) {', '.join(missing)} not found in {data_dir}.{tried} "
        f"Put the official file(s) in {data_dir}: "
        + ", ".join(f"{n} from {URLS[n]}" for n in missing)
        + f". Select another folder with --data_dir or ${DATA_DIR_ENV}.")
  return paths


def _fingerprint(zip_paths: list[pathlib.Path], image_size: int) -> str:
  """Identifies what a cache was built from: zip contents, size, format."""
  sums = ",".join(f"{p.name}:{cache.sha256(p)}" for p in zip_paths)
  return f"v{FORMAT_VERSION};size={image_size};{sums}"


def _read_cache(path: pathlib.Path, fingerprint: str) -> OmniglotData | None:
  """The cached data, or None (with a warning) if missing, corrupt or stale."""
  return cache.read_npz(path, fingerprint, "Omniglot", lambda f: OmniglotData(
      images=f["images"], character_ids=f["character_ids"].astype(np.int32),
      alphabets=tuple(str(a) for a in f["alphabets"]),
      background=f["background"].astype(bool)))


def _write_cache(path: pathlib.Path, data: OmniglotData, fingerprint: str) -> None:
  """Writes the cache atomically; a failure only costs a later rebuild."""
  cache.write_npz(path, dict(
      images=data.images, character_ids=data.character_ids,
      alphabets=np.array(data.alphabets, dtype=np.str_), background=data.background),
      fingerprint, "Omniglot")


def decode_png(data: bytes, image_size: int) -> np.ndarray:
  """One PNG's bytes -> (image_size, image_size) uint8, ink = 255.

  The one image convention of every Omniglot source (zips, TFDS, Lake's runs):
  grey, Lanczos resize when the size differs, inverted.
  """
  with Image.open(io.BytesIO(data)) as img:
    gray = img.convert("L")
  if gray.size != (image_size, image_size):
    gray = gray.resize((image_size, image_size), Image.Resampling.LANCZOS)
  return 255 - np.asarray(gray, dtype=np.uint8)


# The zip decoder calls it by this name, so tests can replace it.
_decode_png = decode_png


def _decode_zip(path: pathlib.Path, entries: list[CharacterIndex],
                image_size: int, pool: concurrent.futures.Executor) -> np.ndarray:
  """Decodes the indexed PNGs of one zip -> (len(entries), 20, S, S) uint8."""
  names = [m for e in entries for m in e.members]
  blobs = []
  with zipfile.ZipFile(path) as zf:
    for name in names:
      try:
        blobs.append(zf.read(name))
      except (zipfile.BadZipFile, zlib.error, OSError) as e:
        raise DataError(f"{path}: cannot read {name} ({e}). Delete the zip and "
                        f"put a fresh copy there ({URLS.get(path.name, URL_BASE)}).") from e

  def decode(i: int) -> np.ndarray:
    try:
      return _decode_png(blobs[i], image_size)
    except _DECODE_ERRORS as e:
      raise DataError(f"{path}: {names[i]} is not a decodable PNG ({e}). Delete "
                      f"the zip and put a fresh copy there.") from e

  images = np.stack(list(pool.map(decode, range(len(names)))))
  return images.reshape(len(entries), NUM_DRAWERS, image_size, image_size)


def _decode_all(zip_paths: list[pathlib.Path], image_size: int) -> OmniglotData:
  indexes = [index_zip(p) for p in zip_paths]
  all_ids = [e.character_id for index in indexes for e in index]
  if len(set(all_ids)) != len(all_ids):
    raise DataError(f"{zip_paths[0]} and {zip_paths[1]} share character ids; "
                    "they are not the official pair.")
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    parts = [_decode_zip(p, index, image_size, pool)
             for p, index in zip(zip_paths, indexes)]
  entries = [e for index in indexes for e in index]
  background = np.concatenate([np.full(len(index), name == ZIP_NAMES[0])
                               for name, index in zip(ZIP_NAMES, indexes)])
  order = np.argsort(all_ids, kind="stable")  # sorted by global id overall
  return OmniglotData(
      images=np.concatenate(parts)[order],
      character_ids=np.asarray(all_ids, dtype=np.int32)[order],
      alphabets=tuple(entries[i].alphabet for i in order),
      background=background[order])


def load_omniglot(data_dir: str | os.PathLike | None = None, image_size: int = 28,
                  download: bool = True,
                  cache_dir: str | os.PathLike | None = None) -> OmniglotData:
  """Loads every Omniglot image, decoding the zips once and caching the result.

  Args:
    data_dir: folder holding the two official zips; None -> $ADVMAML_DATA_DIR,
      else default_cache_dir()/omniglot (see `resolve_data_dir`).
    image_size: side S of the square images returned (105 = no resizing).
    download: fetch missing zips from the official URLs.
    cache_dir: where the decoded cache (and downloaded zips) go when `data_dir`
      is not writable; None -> default_cache_dir().

  Returns:
    OmniglotData with images of shape (num_characters, 20, S, S).

  Raises:
    DataError: the folder or a zip is missing (and cannot be downloaded), or a
      zip is damaged or not laid out as the official one.
  """
  if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
    raise ValueError(f"image_size must be a positive int, got {image_size!r}")
  is_default = data_dir in (None, "") and not os.environ.get(DATA_DIR_ENV)
  folder = resolve_data_dir(data_dir)
  cache_root = pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
  zip_paths = _find_zips(folder, cache_root, download, is_default)

  fingerprint = _fingerprint(zip_paths, image_size)
  cache_folder = folder if _is_writable(folder) else cache_root
  cache_path = cache_folder / f"omniglot_{image_size}px_v{FORMAT_VERSION}.npz"
  data = _read_cache(cache_path, fingerprint)
  if data is None:
    logging.info("Decoding Omniglot from %s at %dx%d", folder, image_size, image_size)
    data = _decode_all(zip_paths, image_size)
    _write_cache(cache_path, data, fingerprint)
  return data
