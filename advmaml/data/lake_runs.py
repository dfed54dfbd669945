"""Lake et al.'s fixed 20-way one-shot Omniglot benchmark (``all_runs.zip``).

The official archive holds ``run01`` .. ``run20``; each has
``training/class01.png`` .. ``class20.png`` (one image per class),
``test/item01.png`` .. ``item20.png`` and ``class_labels.txt``, whose lines
read ``runNN/test/itemMM.png runNN/training/classKK.png``. Images are 105x105
1-bit PNGs with black ink; they are decoded exactly as the Omniglot loader
decodes the training zips (28x28 Lanczos, ink = 255), so a model sees the
same kind of input it was trained on.
"""

from __future__ import annotations

import os
import pathlib
import re
import zipfile
import zlib

import numpy as np

from advmaml.data.episodes import Episode
from advmaml.data.omniglot import DataError, decode_png

NUM_RUNS = 20
NUM_CLASSES = 20
_LINE_RE = re.compile(r"^(run\d\d)/test/(item\d\d)\.png\s+(run\d\d)/training/class(\d\d)\.png$")


class _Files:
  """Uniform read access to the runs as a zip or as an extracted folder."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    if path.is_dir():
      self._zip = None
      self.names = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    else:
      try:
        self._zip = zipfile.ZipFile(path)
      except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path}: not a readable zip ({e}); pass the official all_runs.zip "
                        "or the folder it extracts to") from e
      self.names = set(self._zip.namelist())
    # The zip may or may not wrap everything in a top folder (all_runs/run01/...).
    prefixes = {n.split("run01/")[0] for n in self.names if "run01/" in n}
    self.prefix = min(prefixes, key=len) if prefixes else ""

  def read(self, name: str) -> bytes:
    full = self.prefix + name
    if full not in self.names:
      raise DataError(f"{self.path}: {full} is missing; the runs must follow all_runs.zip's "
                      "layout runNN/{training/classKK.png,test/itemMM.png,class_labels.txt}")
    try:
      if self._zip is not None:
        return self._zip.read(full)
      return (self.path / full).read_bytes()
    except (OSError, zipfile.BadZipFile, EOFError, zlib.error) as e:
      raise DataError(f"{self.path}: cannot read {full} ({e}); re-extract or re-download "
                      "all_runs.zip") from None

  def image(self, name: str, image_size: int) -> np.ndarray:
    data = self.read(name)
    try:
      return decode_png(data, image_size)
    except Exception as e:  # pylint: disable=broad-except  # PIL raises many kinds for bad bytes
      raise DataError(f"{self.path}: {self.prefix + name} is not a readable PNG "
                      f"({type(e).__name__}); re-extract or re-download all_runs.zip") from None

  def text(self, name: str) -> str:
    try:
      return self.read(name).decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError(f"{self.path}: {self.prefix + name} is not UTF-8 text ({e.reason} at "
                      f"byte {e.start}); re-extract or re-download all_runs.zip") from None


def load_lake_runs(path: str | os.PathLike, image_size: int = 28) -> tuple[Episode, list[str]]:
  """Reads the 20 runs into one batched Episode (numpy) and the run names.

  Returns Episode with support_x (20, 20, S, S, 1) uint8 (class KK at index
  KK-1, label KK-1), support_y (20, 20), query_x (20, 20, S, S, 1) uint8 (item
  MM at index MM-1), query_y (20, 20) the true class of each item.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise DataError(f"--runs={path} does not exist; pass Lake's all_runs.zip (from the "
                    "official Omniglot repository, python/one-shot-classification/all_runs.zip) "
                    "or the folder it extracts to")
  files = _Files(path)
  runs = [f"run{r:02d}" for r in range(1, NUM_RUNS + 1)]
  support = np.zeros((NUM_RUNS, NUM_CLASSES, image_size, image_size, 1), np.uint8)
  query = np.zeros_like(support)
  query_y = np.full((NUM_RUNS, NUM_CLASSES), -1, np.int32)
  for r, run in enumerate(runs):
    for k in range(NUM_CLASSES):
      support[r, k, ..., 0] = files.image(f"{run}/training/class{k + 1:02d}.png", image_size)
      query[r, k, ..., 0] = files.image(f"{run}/test/item{k + 1:02d}.png", image_size)
    lines = files.text(f"{run}/class_labels.txt").split("\n")
    for line in filter(None, (l.strip() for l in lines)):
      m = _LINE_RE.match(line)
      if not m or m.group(1) != run or m.group(3) != run:
        raise DataError(f"{path}: {run}/class_labels.txt has an unexpected line {line!r}; expected "
                        f"'{run}/test/itemMM.png {run}/training/classKK.png'")
      query_y[r, int(m.group(2)[4:]) - 1] = int(m.group(4)) - 1
    if (query_y[r] < 0).any():
      missing = [f"item{i + 1:02d}" for i in np.flatnonzero(query_y[r] < 0)]
      raise DataError(f"{path}: {run}/class_labels.txt gives no class for {missing}")
  support_y = np.tile(np.arange(NUM_CLASSES, dtype=np.int32), (NUM_RUNS, 1))
  return Episode(support, support_y, query, query_y), runs
