"""Tests of advmaml.data.mini_imagenet on tiny files in the two shared formats.

The fakes have the standard 64 / 16 / 20 classes with 2 images each (600 in
the real set): pickle caches ``mini-imagenet-cache-<split>.pkl`` as written by
Python 3's pickle, and Ravi & Larochelle's CSVs with an ``images/`` folder of
differently sized JPEG/PNG files.
"""

from __future__ import annotations

import logging as py_logging
import os
import pathlib
import pickle

import numpy as np
import pytest
from PIL import Image

from advmaml.data import mini_imagenet, sources
from advmaml.data.cache import DataError

PER_CLASS = 2
COUNTS = mini_imagenet.STANDARD_COUNTS
SIZE = mini_imagenet.NATIVE_SIZE


def wnids(split: str) -> list[str]:
  """Fake wnids; splits disjoint; listed out of order on purpose."""
  start = {"train": 0, "val": 100, "test": 200}[split]
  return [f"n{1000000 + start + i:08d}" for i in reversed(range(COUNTS[split]))]


def pixels(wnid: str, k: int, shape=(SIZE, SIZE)) -> np.ndarray:
  """An RGB image whose channels and axes are all distinguishable."""
  c = int(wnid[1:]) % 256
  h, w = np.mgrid[:shape[0], :shape[1]]
  return np.stack([(c + 3 * h + 11 * w) % 256, (50 * k + 5 * h + 7 * w) % 256,
                   (2 * c + k + h * w) % 256], axis=-1).astype(np.uint8)


def write_pickles(folder: pathlib.Path, protocol: int = 4, extra: dict | None = None) -> None:
  """mini-imagenet-cache-<split>.pkl: {"image_data": (N, 84, 84, 3), "class_dict": {wnid: [i]}}."""
  folder.mkdir(parents=True, exist_ok=True)
  for split, name in mini_imagenet.PICKLE_NAMES.items():
    ids = wnids(split)
    images = [pixels(w, k) for k in range(PER_CLASS) for w in ids]  # classes interleaved
    class_dict = {w: [k * len(ids) + i for k in range(PER_CLASS)] for i, w in enumerate(ids)}
    class_dict.update((extra or {}).get(split, {}))
    with open(folder / name, "wb") as f:
      pickle.dump({"image_data": np.stack(images), "class_dict": class_dict}, f,
                  protocol=protocol)


def source_shape(wnid: str, k: int) -> tuple[int, int]:
  """ImageNet originals come in all sizes."""
  return (60 + int(wnid[-1]) * 7 + k, 90 - k * 5)


def write_csvs(folder: pathlib.Path, rows: dict[str, list[str]] | None = None) -> None:
  """<split>.csv with header filename,label; images/<filename> as JPEG or PNG."""
  (folder / "images").mkdir(parents=True, exist_ok=True)
  for split, name in mini_imagenet.CSV_NAMES.items():
    lines = ["filename,label"]
    for w in wnids(split):
      for k in range(PER_CLASS):
        ext = "png" if k == 0 else "jpg"
        filename = f"{w}{k:08d}.{ext}"
        lines.append(f"{filename},{w}")
        Image.fromarray(pixels(w, k, source_shape(w, k))).save(folder / "images" / filename)
    lines += (rows or {}).get(split, [])
    (folder / name).write_text("\n".join(lines) + "\n")


def resized(path: pathlib.Path) -> np.ndarray:
  with Image.open(path) as img:
    return np.asarray(img.convert("RGB").resize((SIZE, SIZE), Image.Resampling.LANCZOS))


pytestmark = pytest.mark.usefixtures("isolated_cache")


def check_standard_split(data: dict) -> None:
  assert {s: len(d.wnids) for s, d in data.items()} == COUNTS
  for split, part in data.items():
    assert part.wnids == tuple(sorted(wnids(split)))
    assert part.images.shape == (COUNTS[split], PER_CLASS, SIZE, SIZE, 3)
    assert part.images.dtype == np.uint8
  all_ids = [w for d in data.values() for w in d.wnids]
  assert len(set(all_ids)) == 100


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickles(tmp_path, protocol):
  write_pickles(tmp_path, protocol)
  data = mini_imagenet.load_mini_imagenet(tmp_path)
  check_standard_split(data)
  for split, part in data.items():
    for c, w in enumerate(part.wnids):
      for k in range(PER_CLASS):
        np.testing.assert_array_equal(part.images[c, k], pixels(w, k))
  assert not list(tmp_path.glob("*.npz"))  # the pickles are the decoded arrays already


def test_csv_and_images(tmp_path):
  write_csvs(tmp_path)
  data = mini_imagenet.load_mini_imagenet(tmp_path)
  check_standard_split(data)
  part = data["val"]
  for c in (0, 7, 15):
    for k in range(PER_CLASS):
      ext = "png" if k == 0 else "jpg"
      want = resized(tmp_path / "images" / f"{part.wnids[c]}{k:08d}.{ext}")
      np.testing.assert_array_equal(part.images[c, k], want)


def test_csv_cache_hit_and_rebuild(tmp_path, monkeypatch, caplog):
  write_csvs(tmp_path)
  first = mini_imagenet.load_mini_imagenet(tmp_path)
  cache_file = tmp_path / "mini_imagenet_csv_84px_v1.npz"
  assert cache_file.is_file()

  def fail(*args):
    raise AssertionError("decoded although a valid cache exists")
  with monkeypatch.context() as m:
    m.setattr(mini_imagenet, "_decode", fail)
    second = mini_imagenet.load_mini_imagenet(tmp_path)
  for split in first:
    np.testing.assert_array_equal(second[split].images, first[split].images)
    assert second[split].wnids == first[split].wnids
  # A replaced image (new mtime) makes the cache stale.
  image = next((tmp_path / "images").glob("*.png"))
  Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(image)
  os.utime(image, ns=(1, 1))
  with caplog.at_level(py_logging.WARNING):
    third = mini_imagenet.load_mini_imagenet(tmp_path)
  assert "stale" in caplog.text
  assert any(not np.array_equal(third[s].images, first[s].images) for s in first)


def test_resized_pickles_are_cached(tmp_path, monkeypatch):
  write_pickles(tmp_path)
  data = mini_imagenet.load_mini_imagenet(tmp_path, image_size=42)
  assert data["test"].images.shape == (20, PER_CLASS, 42, 42, 3)
  assert (tmp_path / "mini_imagenet_pickle_42px_v1.npz").is_file()
  monkeypatch.setattr(mini_imagenet, "read_pickle", lambda *a: 1 / 0)
  again = mini_imagenet.load_mini_imagenet(tmp_path, image_size=42)
  np.testing.assert_array_equal(again["test"].images, data["test"].images)


def test_load_class_splits(tmp_path):
  write_pickles(tmp_path)
  parts = sources.load_class_splits("mini_imagenet", data_dir=tmp_path, split="ravi",
                                    rotate=False, image_size=SIZE)
  assert [parts[s].num_classes for s in ("train", "val", "test")] == [64, 16, 20]
  assert parts["train"].images.shape[1:] == (PER_CLASS, SIZE, SIZE, 3)
  assert parts["val"].character_ids.tolist() == sorted(int(w[1:]) for w in wnids("val"))
  np.testing.assert_array_equal(parts["test"].rotations, 0)


def test_missing_files_message(tmp_path, monkeypatch):
  with pytest.raises(DataError, match="does not exist"):
    mini_imagenet.load_mini_imagenet(tmp_path / "nowhere")
  (tmp_path / "mini-imagenet-cache-train.pkl").write_bytes(b"")
  with pytest.raises(DataError) as err:
    mini_imagenet.load_mini_imagenet(tmp_path)
  msg = str(err.value)
  for part in ("mini-imagenet-cache-val.pkl", "mini-imagenet-cache-test.pkl", "train.csv",
               str(tmp_path), "--data_dir", mini_imagenet.DATA_DIR_ENV, mini_imagenet.CSV_URL):
    assert part in msg
  assert "missing mini-imagenet-cache-train.pkl" not in msg
  # The environment variable names the folder when the flag is not given.
  monkeypatch.setenv(mini_imagenet.DATA_DIR_ENV, str(tmp_path / "env"))
  with pytest.raises(DataError, match=str(tmp_path / "env")):
    mini_imagenet.load_mini_imagenet()


def test_missing_images_are_named(tmp_path):
  write_csvs(tmp_path)
  victim = sorted((tmp_path / "images").iterdir())[3]
  victim.unlink()
  with pytest.raises(DataError, match=f"1 image.*missing from {tmp_path / 'images'}: "
                     f"{victim.name}"):
    mini_imagenet.load_mini_imagenet(tmp_path)


def test_unequal_classes_rejected(tmp_path):
  w = wnids("test")[0]
  write_csvs(tmp_path / "extra", rows={"test": [f"{w}00000000.png,{w}"]})
  with pytest.raises(DataError, match=rf"test.csv: classes must all have the same.*{w} \(3\)"):
    mini_imagenet.load_mini_imagenet(tmp_path / "extra")
  write_pickles(tmp_path / "pkl", extra={"val": {wnids("val")[0]: [0]}})
  with pytest.raises(DataError, match=r"mini-imagenet-cache-val.pkl: classes must all"):
    mini_imagenet.load_mini_imagenet(tmp_path / "pkl")


def test_shared_class_rejected(tmp_path):
  w = wnids("train")[5]
  write_pickles(tmp_path, extra={"test": {w: [0, 1]}})
  with pytest.raises(DataError, match=f"class {w} is in both .*train.pkl and .*test.pkl"):
    mini_imagenet.load_mini_imagenet(tmp_path)


def test_bad_csv_rows(tmp_path):
  write_csvs(tmp_path, rows={"val": ["../../etc/passwd,n01000100"]})
  with pytest.raises(DataError, match="val.csv, line .*not a plain file name"):
    mini_imagenet.load_mini_imagenet(tmp_path)
  (tmp_path / "train.csv").write_text("file,class\n")
  with pytest.raises(DataError, match="header 'filename,label'"):
    mini_imagenet.load_mini_imagenet(tmp_path, source="csv")


class _Payload:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.mkdir, (str(self.marker),))


def test_pickle_with_code_is_refused_unrun(tmp_path):
  write_pickles(tmp_path)
  marker = tmp_path / "pwned"
  with open(tmp_path / mini_imagenet.PICKLE_NAMES["val"], "wb") as f:
    pickle.dump({"image_data": _Payload(marker), "class_dict": {}}, f)
  with pytest.raises(DataError, match=r"cache-val.pkl: refused global.*not executed"):
    mini_imagenet.load_mini_imagenet(tmp_path)
  assert not marker.exists()


def test_shared_class_in_csvs_rejected_before_decoding(tmp_path, monkeypatch):
  w = wnids("val")[0]
  write_csvs(tmp_path, rows={"test": [f"{w}{k:08d}.png,{w}" for k in range(PER_CLASS)]})
  monkeypatch.setattr(mini_imagenet, "_decode", lambda *a: 1 / 0)
  with pytest.raises(DataError, match=f"class {w} is in both .*val.csv and .*test.csv"):
    mini_imagenet.load_mini_imagenet(tmp_path)
