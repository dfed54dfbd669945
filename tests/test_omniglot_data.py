"""Tests of advmaml.data.omniglot on tiny zips in the official layout."""

from __future__ import annotations

import io
import logging as py_logging
import os
import pathlib
import urllib.error
import zipfile

import numpy as np
import pytest
from PIL import Image

from advmaml.data import omniglot
from advmaml.data.omniglot import DataError, load_omniglot

from fake_omniglot import ink_mask, png_bytes, write_zips  # noqa: E402


@pytest.fixture
def data_dir(tmp_path: pathlib.Path) -> pathlib.Path:
  folder = tmp_path / "omniglot"
  write_zips(folder)
  return folder


pytestmark = pytest.mark.usefixtures("isolated_cache")


def forbid_decoding(monkeypatch):
  def fail(*args):
    raise AssertionError("decoded although a valid cache exists")
  monkeypatch.setattr(omniglot, "_decode_png", fail)


def test_reads_official_layout_exactly(data_dir):
  data = load_omniglot(data_dir, image_size=105, download=False)
  assert data.images.shape == (8, 20, 105, 105) and data.images.dtype == np.uint8
  np.testing.assert_array_equal(data.character_ids, np.arange(1, 9))
  assert data.character_ids.dtype == np.int32
  assert data.alphabets == ("Alpha",) * 3 + ("Beta",) * 3 + ("Gamma",) * 2
  np.testing.assert_array_equal(data.background, [True] * 6 + [False] * 2)
  for c in range(8):
    for d in range(20):
      # No resizing at 105: ink exactly 255, background exactly 0.
      np.testing.assert_array_equal(data.images[c, d], ink_mask(c + 1, d + 1) * 255)


def test_resizes_like_pil_lanczos(data_dir):
  data = load_omniglot(data_dir, image_size=28, download=False)
  assert data.images.shape == (8, 20, 28, 28)
  for c, d in [(0, 0), (3, 7), (7, 19)]:
    src = Image.fromarray(np.where(ink_mask(c + 1, d + 1), 0, 255).astype(np.uint8))
    want = 255 - np.asarray(src.resize((28, 28), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(data.images[c, d], want)
  assert data.images[:, :, 0, 0].max() == 0  # corners are background
  assert data.images.max() == 255


def test_second_load_uses_cache(data_dir, monkeypatch):
  first = load_omniglot(data_dir, download=False)
  assert (data_dir / "omniglot_28px_v1.npz").is_file()
  forbid_decoding(monkeypatch)
  second = load_omniglot(data_dir, download=False)
  np.testing.assert_array_equal(second.images, first.images)
  np.testing.assert_array_equal(second.character_ids, first.character_ids)
  np.testing.assert_array_equal(second.background, first.background)
  assert second.alphabets == first.alphabets


def test_truncated_cache_is_rebuilt(data_dir, caplog):
  first = load_omniglot(data_dir, download=False)
  cache = data_dir / "omniglot_28px_v1.npz"
  cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
  with caplog.at_level(py_logging.WARNING):
    second = load_omniglot(data_dir, download=False)
  assert "cannot be read" in caplog.text
  np.testing.assert_array_equal(second.images, first.images)
  with np.load(cache, allow_pickle=False) as f:  # rewritten whole
    assert f["images"].shape == (8, 20, 28, 28)


def test_stale_cache_is_rebuilt(data_dir, caplog):
  load_omniglot(data_dir, image_size=105, download=False)
  write_zips(data_dir, shift=3)  # same names, different pixels
  with caplog.at_level(py_logging.WARNING):
    data = load_omniglot(data_dir, image_size=105, download=False)
  assert "stale" in caplog.text
  np.testing.assert_array_equal(data.images[2, 4], ink_mask(3, 5, shift=3) * 255)


def test_read_only_data_dir_caches_in_cache_dir(data_dir, tmp_path, monkeypatch):
  cache_dir = tmp_path / "cache"
  data_dir.chmod(0o555)  # honoured even by root: the probe reads the mode bits
  try:
    first = load_omniglot(data_dir, download=False, cache_dir=cache_dir)
    assert (cache_dir / "omniglot_28px_v1.npz").is_file()
    assert sorted(p.name for p in data_dir.iterdir()) == list(omniglot.ZIP_NAMES)
    forbid_decoding(monkeypatch)
    second = load_omniglot(data_dir, download=False, cache_dir=cache_dir)
    np.testing.assert_array_equal(second.images, first.images)
  finally:
    data_dir.chmod(0o755)


def test_writability_probe(tmp_path, monkeypatch):
  assert omniglot._is_writable(tmp_path)
  assert not omniglot._is_writable(tmp_path / "missing")
  assert os.listdir(tmp_path) == []  # the probe cleans up after itself
  tmp_path.chmod(0o555)
  try:
    assert not omniglot._is_writable(tmp_path)
  finally:
    tmp_path.chmod(0o755)
  # A read-only mount passes the mode check (and os.access, for root) but
  # fails to create a file.
  def read_only_fs(*args, **kwargs):
    raise OSError(30, "Read-only file system")
  monkeypatch.setattr(omniglot.tempfile, "mkstemp", read_only_fs)
  assert not omniglot._is_writable(tmp_path)


def test_missing_folder(tmp_path):
  folder = tmp_path / "nowhere"
  for download in (False, True):
    with pytest.raises(DataError, match="does not exist") as err:
      load_omniglot(folder, download=download)
    assert str(folder) in str(err.value) and "images_background.zip" in str(err.value)


def test_missing_zip_without_download(data_dir):
  (data_dir / "images_evaluation.zip").unlink()
  with pytest.raises(DataError) as err:
    load_omniglot(data_dir, download=False)
  msg = str(err.value)
  assert "images_evaluation.zip" in msg and "images_background.zip" not in msg
  assert str(data_dir) in msg and omniglot.URLS["images_evaluation.zip"] in msg
  assert "--data_dir" in msg and omniglot.DATA_DIR_ENV in msg


def test_failed_download_explains_what_to_do(data_dir, monkeypatch):
  (data_dir / "images_background.zip").unlink()
  def offline(url, timeout):
    raise urllib.error.URLError("network is unreachable")
  monkeypatch.setattr(omniglot.urllib.request, "urlopen", offline)
  with pytest.raises(DataError) as err:
    load_omniglot(data_dir, download=True)
  msg = str(err.value)
  assert "network is unreachable" in msg and "images_background.zip" in msg
  assert str(data_dir) in msg and omniglot.URLS["images_background.zip"] in msg
  assert sorted(p.name for p in data_dir.iterdir()) == ["images_evaluation.zip"]


@pytest.mark.parametrize("writable", [True, False])
def test_download_fetches_missing_zip(data_dir, tmp_path, monkeypatch, writable):
  payload = (data_dir / "images_background.zip").read_bytes()
  (data_dir / "images_background.zip").unlink()
  urls = []
  def fake_urlopen(url, timeout):
    urls.append(url)
    return io.BytesIO(payload)
  monkeypatch.setattr(omniglot.urllib.request, "urlopen", fake_urlopen)
  real_probe = omniglot._is_writable
  monkeypatch.setattr(omniglot, "_is_writable",
                      lambda folder: (writable or folder != data_dir) and real_probe(folder))
  cache_dir = tmp_path / "cache"
  data = load_omniglot(data_dir, image_size=105, download=True, cache_dir=cache_dir)
  assert urls == [omniglot.URLS["images_background.zip"]]
  target = data_dir if writable else cache_dir / "omniglot"
  assert (target / "images_background.zip").read_bytes() == payload
  np.testing.assert_array_equal(data.images[0, 0], ink_mask(1, 1) * 255)


def test_download_rejects_non_zip(data_dir, monkeypatch):
  (data_dir / "images_background.zip").unlink()
  monkeypatch.setattr(omniglot.urllib.request, "urlopen",
                      lambda url, timeout: io.BytesIO(b"<html>rate limited</html>"))
  with pytest.raises(DataError, match="did not return a zip"):
    load_omniglot(data_dir, download=True)
  assert not (data_dir / "images_background.zip").exists()


def test_corrupt_zip(data_dir):
  (data_dir / "images_evaluation.zip").write_bytes(b"PK\x03\x04 not really a zip")
  with pytest.raises(DataError, match="images_evaluation.zip is not a readable zip"):
    load_omniglot(data_dir, download=False)


def test_character_with_19_drawers(tmp_path):
  write_zips(tmp_path, drawers={5: 19})
  with pytest.raises(DataError, match=r"character 0005 .*has 19 drawers.*expected 20"):
    load_omniglot(tmp_path, download=False)


def test_undecodable_png(tmp_path):
  member = "images_evaluation/Gamma/character09/0009_01.png"
  write_zips(tmp_path, extra={member: b"\x89PNG garbage"})
  # Give character 0009 its other 19 drawers so only the PNG itself is bad.
  with zipfile.ZipFile(tmp_path / "images_evaluation.zip", "a") as zf:
    for d in range(2, 21):
      zf.writestr(member.replace("_01", f"_{d:02d}"), png_bytes(ink_mask(9, d)))
  with pytest.raises(DataError, match="0009_01.png is not a decodable PNG"):
    load_omniglot(tmp_path, download=False)


def test_unexpected_layout(tmp_path):
  write_zips(tmp_path, extra={"images_background/Alpha/notes.txt": b"hi"})
  with pytest.raises(DataError, match="unexpected member.*notes.txt"):
    load_omniglot(tmp_path, download=False)


def test_os_litter_is_ignored(tmp_path):
  write_zips(tmp_path, extra={"images_background/.DS_Store": b"x",
                              "images_background/__MACOSX/._a.png": b"x"})
  assert len(load_omniglot(tmp_path, image_size=8, download=False).character_ids) == 8


def test_index_zip(data_dir):
  index = omniglot.index_zip(data_dir / "images_background.zip")
  assert [e.character_id for e in index] == [1, 2, 3, 4, 5, 6]
  char_id, alphabet, members = index[3]
  assert (char_id, alphabet) == (4, "Beta")
  assert members[0].endswith("0004_01.png") and members[19].endswith("0004_20.png")


def test_resolve_data_dir(tmp_path, monkeypatch):
  assert omniglot.default_cache_dir() == tmp_path / "xdg" / "advmaml"
  assert omniglot.resolve_data_dir(None) == tmp_path / "xdg" / "advmaml" / "omniglot"
  monkeypatch.setenv(omniglot.DATA_DIR_ENV, "/from/env")
  assert omniglot.resolve_data_dir(None) == pathlib.Path("/from/env")
  assert omniglot.resolve_data_dir("/from/flag") == pathlib.Path("/from/flag")
  monkeypatch.delenv("XDG_CACHE_HOME")
  assert omniglot.default_cache_dir() == pathlib.Path.home() / ".cache" / "advmaml"


def test_rejects_bad_image_size(data_dir):
  with pytest.raises(ValueError, match="image_size"):
    load_omniglot(data_dir, image_size=0)


def _shared_omniglot() -> pathlib.Path:
  env = os.environ.get("ADVMAML_SHARED_OMNIGLOT")
  if env:
    return pathlib.Path(env)
  return pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"


@pytest.mark.skipif(not _shared_omniglot().is_dir(), reason="no shared Omniglot copy")
def test_shared_copy_has_official_layout():
  folder = omniglot.resolve_data_dir(_shared_omniglot())
  if not folder.stat().st_mode & 0o222:  # a read-only copy must be left alone
    assert not omniglot._is_writable(folder)
  background = omniglot.index_zip(folder / "images_background.zip")
  evaluation = omniglot.index_zip(folder / "images_evaluation.zip")
  assert [e.character_id for e in background] == list(range(1, 965))
  assert [e.character_id for e in evaluation] == list(range(965, 1624))
  assert len({e.alphabet for e in background}) == 30
  assert len({e.alphabet for e in evaluation}) == 20
  assert all(len(e.members) == 20 for e in background + evaluation)
