"""Tests of advmaml.data.cifar on a tiny CIFAR-100 release written in the official format.

The official ``cifar-100-python`` files are Python 2 cPickle dumps (protocol
2): dict keys and names are Python 2 str, and each ``data`` array is a numpy
1.x ndarray pickled through ``numpy.core.multiarray._reconstruct``. Python 3
cannot write such a file with `pickle`, so `py2_pickle` below emits the same
opcodes by hand.
"""

from __future__ import annotations

import io
import logging as py_logging
import os
import pathlib
import pickle
import struct
import tarfile
import urllib.error
import warnings

import numpy as np
import pytest
from PIL import Image

from advmaml.data import cache, cifar, sources
from advmaml.data.cache import DataError

PER_CLASS_TRAIN, PER_CLASS_TEST = 2, 1  # 500 and 100 in the real release
PER_CLASS = PER_CLASS_TRAIN + PER_CLASS_TEST


# ---------------------------------------------------------------------------
# A Python 2 style pickle writer (just what the CIFAR files contain).
# ---------------------------------------------------------------------------


def _py2_str(data: bytes) -> bytes:
  if len(data) < 256:
    return b"U" + bytes([len(data)]) + data  # SHORT_BINSTRING
  return b"T" + struct.pack("<i", len(data)) + data  # BINSTRING


def _py2_int(value: int) -> bytes:
  return b"J" + struct.pack("<i", value)  # BININT


def _py2_value(value) -> bytes:
  if isinstance(value, bytes):
    return _py2_str(value)
  if isinstance(value, int):
    return _py2_int(value)
  if isinstance(value, list):
    return b"](" + b"".join(_py2_value(v) for v in value) + b"e"  # EMPTY_LIST MARK .. APPENDS
  if isinstance(value, np.ndarray):  # numpy 1.x ndarray.__reduce__ under Python 2
    assert value.dtype == np.uint8 and value.ndim == 2
    dtype = (b"cnumpy\ndtype\n" + _py2_str(b"u1") + b"K\x00K\x01\x87R"
             + b"(K\x03" + _py2_str(b"|") + b"NNN" + _py2_int(-1) + _py2_int(-1) + b"K\x00tb")
    state = (b"(K\x01" + _py2_int(value.shape[0]) + _py2_int(value.shape[1]) + b"\x86"
             + dtype + b"\x89" + _py2_str(value.tobytes()) + b"t")
    return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + b"K\x00\x85"
            + _py2_str(b"b") + b"\x87R" + state + b"b")
  raise TypeError(type(value))


def py2_pickle(obj: dict) -> bytes:
  """A protocol-2 pickle as Python 2's cPickle writes it (keys: str -> bytes)."""
  items = b"".join(_py2_str(k.encode()) + _py2_value(v) for k, v in obj.items())
  return b"\x80\x02}(" + items + b"u."


# ---------------------------------------------------------------------------
# The fake release.
# ---------------------------------------------------------------------------


def pixels(cls: int, k: int, size: int = 32) -> np.ndarray:
  """(32, 32, 3) uint8 image k of class cls: channels and axes all distinguishable."""
  h, w = np.mgrid[:size, :size]
  return np.stack([(cls + 3 * h + 11 * w) % 256, (50 * k + 5 * h + 7 * w) % 256,
                   (2 * cls + k + h * w) % 256], axis=-1).astype(np.uint8)


def examples(extra: dict[int, int] | None = None) -> dict[str, list[tuple[int, int]]]:
  """(class, k) of each image of `train` and `test` in file order (classes interleaved)."""
  order = np.random.default_rng(0).permutation(cifar.NUM_CLASSES)
  train = [(int(c), k) for k in range(PER_CLASS_TRAIN) for c in order]
  test = [(c, PER_CLASS_TRAIN) for c in reversed(range(cifar.NUM_CLASSES))]
  for cls, n in (extra or {}).items():
    train += [(cls, PER_CLASS + i) for i in range(n)]
  return {"train": train, "test": test}


def expected_images(size: int = 32) -> np.ndarray:
  return np.stack([np.stack([pixels(c, k, size) for k in range(PER_CLASS)])
                   for c in range(cifar.NUM_CLASSES)])


def member_bytes(extra=None, fine_names=cifar.FINE_NAMES) -> dict[str, bytes]:
  """The three files of cifar-100-python, pickled as the official ones."""
  out = {}
  for name, items in examples(extra).items():
    # Rows are channel-major: R plane, G plane, B plane, each 32x32 row-major.
    data = np.stack([pixels(c, k).transpose(2, 0, 1).reshape(-1) for c, k in items])
    fine = [c for c, _ in items]
    out[name] = py2_pickle({
        "filenames": [f"img_{i}.png".encode() for i in range(len(items))],
        "batch_label": f"{name} batch 1 of 1".encode(),
        "fine_labels": fine,
        "coarse_labels": [int(cifar.COARSE_OF_FINE[c]) for c in fine],
        "data": data})
  out["meta"] = py2_pickle({"fine_label_names": [n.encode() for n in fine_names],
                            "coarse_label_names": [n.encode() for n in cifar.COARSE_NAMES]})
  return out


def write_folder(folder: pathlib.Path, members: dict[str, bytes] | None = None) -> pathlib.Path:
  """Writes <folder>/cifar-100-python/{train,test,meta}; returns that subfolder."""
  sub = folder / cifar.FOLDER_NAME
  sub.mkdir(parents=True, exist_ok=True)
  for name, data in (members or member_bytes()).items():
    (sub / name).write_bytes(data)
  return sub


def archive_bytes(members: dict[str, bytes] | None = None) -> bytes:
  """cifar-100-python.tar.gz: a folder entry, the three files and a stray backup file."""
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz") as tar:
    entry = tarfile.TarInfo(cifar.FOLDER_NAME)
    entry.type = tarfile.DIRTYPE
    tar.addfile(entry)
    for name, data in list((members or member_bytes()).items()) + [("file.txt~", b"x")]:
      info = tarfile.TarInfo(f"{cifar.FOLDER_NAME}/{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return buf.getvalue()


def write_archive(folder: pathlib.Path, members=None) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / cifar.ARCHIVE_NAME
  path.write_bytes(archive_bytes(members))
  return path


pytestmark = pytest.mark.usefixtures("isolated_cache")


def forbid_decoding(monkeypatch):
  def fail(*args):
    raise AssertionError("decoded although a valid cache exists")
  monkeypatch.setattr(cifar, "read_release", fail)


# ---------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------


def test_fake_is_what_python2_cpickle_writes():
  """The stock unpickler reads the fake as it reads the real files."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # numpy.core is numpy 1.x's name
    meta = pickle.loads(member_bytes()["meta"], encoding="bytes")
    train = pickle.loads(member_bytes()["train"], encoding="bytes")
  assert meta[b"fine_label_names"][0] == b"apple" and len(meta[b"coarse_label_names"]) == 20
  assert train[b"data"].shape == (PER_CLASS_TRAIN * 100, 3072) and train[b"data"].dtype == np.uint8
  assert isinstance(train[b"fine_labels"][0], int)


@pytest.mark.parametrize("layout", ["archive", "folder", "files_in_data_dir"])
def test_reads_release_exactly(tmp_path, layout):
  folder = tmp_path / "data"
  if layout == "archive":
    write_archive(folder)
    data_dir = folder
  else:
    sub = write_folder(folder)
    data_dir = folder if layout == "folder" else sub
  data = cifar.load_cifar100(data_dir, download=False)
  assert data.images.shape == (100, PER_CLASS, 32, 32, 3) and data.images.dtype == np.uint8
  # Class-major by fine id; within a class train images in file order, then test.
  np.testing.assert_array_equal(data.images, expected_images())
  assert cifar.FINE_NAMES[data.coarse_labels.argmin()] in cifar.SUPERCLASSES["aquatic_mammals"]


@pytest.mark.parametrize("dataset, counts", [("cifar_fs", (64, 16, 20)),
                                             ("fc100", (60, 20, 20))])
def test_splits(tmp_path, dataset, counts):
  write_archive(tmp_path)
  data = cifar.load_cifar100(tmp_path, download=False)
  parts = cifar.make_splits(data, dataset)
  assert tuple(parts[s].num_classes for s in ("train", "val", "test")) == counts
  ids = [set(parts[s].character_ids.tolist()) for s in ("train", "val", "test")]
  assert set.union(*ids) == set(range(100)) and sum(map(len, ids)) == 100  # disjoint
  for split, part in parts.items():
    assert part.images.shape == (len(part.character_ids), PER_CLASS, 32, 32, 3)
    np.testing.assert_array_equal(part.images, data.images[part.character_ids])
    np.testing.assert_array_equal(part.rotations, 0)
    names = {cifar.FINE_NAMES[i] for i in part.character_ids}
    if dataset == "cifar_fs":
      assert names == set(cifar.CIFAR_FS_CLASSES[split])
    else:
      supers = {cifar.COARSE_NAMES[data.coarse_labels[i]] for i in part.character_ids}
      assert supers == set(cifar.FC100_SUPERCLASSES[split])
  if dataset == "fc100":  # no superclass in two splits
    supers = [{int(data.coarse_labels[i]) for i in ids[j]} for j in range(3)]
    assert not (supers[0] & supers[1] or supers[0] & supers[2] or supers[1] & supers[2])
  assert {"whale", "worm", "baby"} <= {cifar.FINE_NAMES[i] for i in
                                       cifar.make_splits(data, "cifar_fs")["test"].character_ids}


def test_load_class_splits(tmp_path):
  write_archive(tmp_path)
  parts = sources.load_class_splits("fc100", data_dir=tmp_path, split="oreshkin", rotate=False,
                                    image_size=32, download=False)
  assert [parts[s].num_classes for s in ("train", "val", "test")] == [60, 20, 20]
  assert parts["test"].images.shape[1:] == (PER_CLASS, 32, 32, 3)
  with pytest.raises(ValueError, match="--split='vinyals'.*bertinetto"):
    sources.load_class_splits("cifar_fs", data_dir=tmp_path, rotate=False)
  with pytest.raises(ValueError, match="--rotate=false"):
    sources.load_class_splits("cifar_fs", data_dir=tmp_path, split="bertinetto", rotate=True)


def test_resizes_like_pil_lanczos(tmp_path):
  write_archive(tmp_path)
  data = cifar.load_cifar100(tmp_path, image_size=20, download=False)
  assert data.images.shape == (100, PER_CLASS, 20, 20, 3)
  want = np.asarray(Image.fromarray(pixels(7, 1)).resize((20, 20), Image.Resampling.LANCZOS))
  np.testing.assert_array_equal(data.images[7, 1], want)


def test_second_load_uses_cache_and_rebuilds_when_stale(tmp_path, monkeypatch, caplog):
  archive = write_archive(tmp_path)
  first = cifar.load_cifar100(tmp_path, download=False)
  cache_file = tmp_path / "cifar100_32px_v1.npz"
  assert cache_file.is_file()
  with monkeypatch.context() as m:
    forbid_decoding(m)
    np.testing.assert_array_equal(cifar.load_cifar100(tmp_path, download=False).images,
                                  first.images)
  os.utime(archive, ns=(1, 1))  # another file now
  with caplog.at_level(py_logging.WARNING):
    again = cifar.load_cifar100(tmp_path, download=False)
  assert "stale" in caplog.text
  np.testing.assert_array_equal(again.images, first.images)
  cache_file.write_bytes(cache_file.read_bytes()[:100])  # truncated
  with caplog.at_level(py_logging.WARNING):
    cifar.load_cifar100(tmp_path, download=False)
  assert "cannot be read" in caplog.text


def test_read_only_folder_caches_in_user_cache(tmp_path):
  data_dir, cache_dir = tmp_path / "ro", tmp_path / "cache"
  write_archive(data_dir)
  data_dir.chmod(0o555)
  try:
    cifar.load_cifar100(data_dir, download=False, cache_dir=cache_dir)
    assert (cache_dir / "cifar100_32px_v1.npz").is_file()
    assert [p.name for p in data_dir.iterdir()] == [cifar.ARCHIVE_NAME]
  finally:
    data_dir.chmod(0o755)


def test_unequal_class_sizes_rejected(tmp_path):
  write_folder(tmp_path, member_bytes(extra={3: 1}))  # one more "bear"
  with pytest.raises(DataError, match=r"same number of images.*'bear' \(4\)"):
    cifar.load_cifar100(tmp_path, download=False)


def test_other_class_names_rejected(tmp_path):
  names = ("apples",) + cifar.FINE_NAMES[1:]
  write_folder(tmp_path, member_bytes(fine_names=names))
  with pytest.raises(DataError, match="fine_label_names differ from the official"):
    cifar.load_cifar100(tmp_path, download=False)


class _Payload:
  """Unpickling this would create `marker` (if a loader ever ran it)."""

  def __init__(self, marker: pathlib.Path):
    self.marker = marker

  def __reduce__(self):
    return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("layout", ["archive", "folder"])
def test_pickle_with_code_is_refused_unrun(tmp_path, layout):
  marker = tmp_path / "pwned"
  members = member_bytes()
  members["train"] = pickle.dumps({b"data": _Payload(marker), b"fine_labels": []}, protocol=2)
  folder = tmp_path / "data"
  (write_archive if layout == "archive" else write_folder)(folder, members)
  with pytest.raises(DataError, match=r"refused global '(posix|os)\.mkdir'.*not executed") as err:
    cifar.load_cifar100(folder, download=False)
  assert "train" in str(err.value)
  assert not marker.exists()


def test_safe_unpickle_refuses_object_arrays():
  evil = pickle.dumps(np.array([print, None], dtype=object), protocol=2)
  with pytest.raises(DataError, match="refused"):
    cache.safe_unpickle(evil, source="evil.pkl", fix="")
  with pytest.raises(DataError, match="truncated"):
    cache.safe_unpickle(pickle.dumps(np.arange(3))[:-5], source="cut.pkl", fix="")


def test_missing_files_explain_what_to_do(tmp_path):
  with pytest.raises(DataError, match="does not exist") as err:
    cifar.load_cifar100(tmp_path / "nowhere", download=False)
  assert str(tmp_path / "nowhere") in str(err.value)
  (tmp_path / "empty").mkdir()
  write_folder(tmp_path / "empty", {"meta": b"x"})  # a partial extraction
  with pytest.raises(DataError) as err:
    cifar.load_cifar100(tmp_path / "empty", download=False)
  msg = str(err.value)
  for part in (cifar.ARCHIVE_NAME, cifar.FOLDER_NAME, str(tmp_path / "empty"), cifar.URL,
               "--data_dir", cifar.DATA_DIR_ENV, "holds only some", "cifar_fs_tfds"):
    assert part in msg


def test_damaged_archive(tmp_path):
  (tmp_path / cifar.ARCHIVE_NAME).write_bytes(archive_bytes()[:3000])
  with pytest.raises(DataError, match="cifar-100-python.tar.gz"):
    cifar.load_cifar100(tmp_path, download=False)


def test_env_var_and_download_into_default_folder(tmp_path, monkeypatch):
  monkeypatch.setenv(cifar.DATA_DIR_ENV, str(tmp_path / "from_env"))
  write_archive(tmp_path / "from_env")
  assert cifar.load_cifar100(download=False).images.shape[0] == 100
  monkeypatch.delenv(cifar.DATA_DIR_ENV)
  payload, urls = archive_bytes(), []

  def fake_urlopen(url, timeout):
    urls.append(url)
    return io.BytesIO(payload)
  monkeypatch.setattr(cache.urllib.request, "urlopen", fake_urlopen)
  data = cifar.load_cifar100(download=True)
  assert urls == [cifar.URL]
  default = tmp_path / "xdg" / "advmaml" / "cifar100"
  assert (default / cifar.ARCHIVE_NAME).read_bytes() == payload
  np.testing.assert_array_equal(data.images, expected_images())


def test_failed_download(tmp_path, monkeypatch):
  def offline(url, timeout):
    raise urllib.error.URLError("network is unreachable")
  monkeypatch.setattr(cache.urllib.request, "urlopen", offline)
  with pytest.raises(DataError, match="network is unreachable") as err:
    cifar.load_cifar100(tmp_path, download=True)
  assert cifar.URL in str(err.value) and list(tmp_path.iterdir()) == []
  monkeypatch.setattr(cache.urllib.request, "urlopen",
                      lambda url, timeout: io.BytesIO(b"<html>rate limited</html>"))
  with pytest.raises(DataError, match="did not return a .tar.gz"):
    cifar.load_cifar100(tmp_path, download=True)
  assert list(tmp_path.iterdir()) == []
