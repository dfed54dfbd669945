"""Tests of advmaml.data.tfds_source, without TensorFlow.

Real TFDS data folders are written offline: builders with the names,
versions and features of TFDS's ``omniglot`` and ``cifar100`` (kept out of
TFDS's registry) prepare tiny ``array_record`` files and ``dataset_info.json``
(TFDS needs no TensorFlow for that when images are given as PNG bytes), and
the loader then reads them through TFDS's own registered builders, as it
would read the real prepared data. One test also uses
``tfds.testing.mock_data``.
"""

from __future__ import annotations

import io
import json
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")
from tensorflow_datasets.core import registered  # noqa: E402

from advmaml.data import cifar, omniglot, sources, splits, tfds_source  # noqa: E402
from advmaml.data.cache import DataError  # noqa: E402

import test_cifar  # noqa: E402  (the fake CIFAR-100 release)
from fake_omniglot import CHARS, ink_mask, png_bytes, write_zips  # noqa: E402

ALPHABETS = sorted({alphabet for _, alphabet, _ in CHARS})


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


with registered.skip_registration():

  class Omniglot(tfds.core.GeneratorBasedBuilder):
    """TFDS omniglot 3.0.0's features; `chars` and `drawers` say what to write."""

    VERSION = tfds.core.Version("3.0.0")
    chars = CHARS
    drawers: dict[int, int] = {}

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(105, 105, 3), encoding_format="png"),
          "alphabet": tfds.features.ClassLabel(names=ALPHABETS),
          "alphabet_char_id": np.int64,
          "label": tfds.features.ClassLabel(num_classes=1623)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples("images_background.zip"),
              "test": self._generate_examples("images_evaluation.zip"),
              "small1": self._generate_examples("images_background.zip", limit=2)}

    def _generate_examples(self, zip_name, limit=None):
      for number, (name, alphabet, cid) in enumerate(self.chars[:limit]):
        if name != zip_name:
          continue
        for d in range(1, self.drawers.get(cid, 20) + 1):
          # TFDS stores the release's PNG bytes as they are (1-bit, black ink).
          yield f"{alphabet}_{number}_{cid:04d}_{d:02d}.png", {
              "image": png_bytes(ink_mask(cid, d)), "alphabet": ALPHABETS.index(alphabet),
              "alphabet_char_id": number, "label": cid - 1}

  class Cifar100(tfds.core.GeneratorBasedBuilder):
    """TFDS cifar100 3.0.2's features, filled from test_cifar's fake release."""

    VERSION = tfds.core.Version("3.0.2")
    extra: dict[int, int] = {}

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "id": tfds.features.Text(),
          "image": tfds.features.Image(shape=(32, 32, 3)),
          "label": tfds.features.ClassLabel(names=cifar.FINE_NAMES),
          "coarse_label": tfds.features.ClassLabel(names=cifar.COARSE_NAMES)}))

    def _split_generators(self, dl_manager):
      items = test_cifar.examples(self.extra)
      return {split: self._generate_examples(split, items[split]) for split in items}

    def _generate_examples(self, split, items):
      for index, (cls, k) in enumerate(items):
        yield index, {"id": f"{split}_{index:05d}", "image": _png(test_cifar.pixels(cls, k)),
                      "label": cls, "coarse_label": int(cifar.COARSE_OF_FINE[cls])}


def prepare(builder_cls, root, **attrs):
  """Writes a prepared TFDS data folder <root>/<name>/<version>/ (array_record)."""
  with registered.skip_registration():
    builder_cls = type(builder_cls.__name__, (builder_cls,), attrs) if attrs else builder_cls
    builder = builder_cls(data_dir=str(root), file_format="array_record")
  builder.download_and_prepare()
  return root


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture(autouse=True)
def temp_dirs_in_tmp_path(tmp_path, monkeypatch):
  """TFDS (mock_data) makes temporary folders it never removes: keep them in tmp_path."""
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory):
  return prepare(Omniglot, tmp_path_factory.mktemp("tfds_omniglot"))


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
  return prepare(Cifar100, tmp_path_factory.mktemp("tfds_cifar"))


def by_content(images: np.ndarray) -> np.ndarray:
  """A character's 20 images in a canonical order (TFDS keeps no drawer number)."""
  return images[sorted(range(len(images)), key=lambda d: images[d].tobytes())]


@pytest.mark.parametrize("image_size", [105, 28])
def test_omniglot_matches_official_zips(omniglot_root, tmp_path, image_size):
  data = tfds_source.load_tfds_classes("omniglot", omniglot_root, image_size=image_size)
  write_zips(tmp_path / "zips")
  want = omniglot.load_omniglot(tmp_path / "zips", image_size=image_size, download=False)
  assert data.images.shape == want.images.shape == (8, 20, image_size, image_size)
  np.testing.assert_array_equal(data.character_ids, want.character_ids)
  assert data.alphabets == want.alphabets
  np.testing.assert_array_equal(data.background, want.background)
  for c in range(len(want.images)):
    np.testing.assert_array_equal(by_content(data.images[c]), by_content(want.images[c]))
  for protocol in splits.PROTOCOLS:
    got, exp = splits.make_splits(data, protocol), splits.make_splits(want, protocol)
    for name in splits.SPLITS:
      np.testing.assert_array_equal(got[name].character_ids, exp[name].character_ids)


def test_omniglot_through_sources(omniglot_root):
  parts = sources.load_class_splits("omniglot_tfds", tfds_data_dir=omniglot_root, split="lake",
                                    image_size=28)
  assert parts["test"].num_classes == 2 * 4  # the 2 evaluation characters, 4 rotations
  assert parts["train"].images.shape[1:] == (20, 28, 28)


def test_omniglot_cache(omniglot_root, monkeypatch):
  first = tfds_source.load_tfds_classes("omniglot", omniglot_root)
  monkeypatch.setattr(tfds_source, "_read_omniglot", lambda *a: 1 / 0)
  second = tfds_source.load_tfds_classes("omniglot", omniglot_root)
  np.testing.assert_array_equal(second.images, first.images)


def test_omniglot_missing_drawer(tmp_path):
  prepare(Omniglot, tmp_path, drawers={5: 19})
  with pytest.raises(DataError, match="character 0005 has 19 images; every character needs 20"):
    tfds_source.load_tfds_classes("omniglot", tmp_path)


def test_cifar100_matches_official_release(cifar_root, tmp_path):
  data = tfds_source.load_tfds_classes("cifar100", cifar_root)
  want = cifar.read_release(test_cifar.write_folder(tmp_path))
  np.testing.assert_array_equal(data.images, want.images)  # same order within each class
  parts = sources.load_class_splits("cifar_fs_tfds", data_dir=cifar_root, split="bertinetto",
                                    rotate=False, image_size=32)
  assert [parts[s].num_classes for s in splits.SPLITS] == [64, 16, 20]
  assert parts["val"].images.shape[1:] == (3, 32, 32, 3)


def test_cifar100_unequal_classes(tmp_path):
  prepare(Cifar100, tmp_path, extra={3: 1})
  with pytest.raises(DataError, match=r"same number of images.*'bear' \(4\)"):
    tfds_source.load_tfds_classes("cifar100", tmp_path)


def test_not_prepared(tmp_path, monkeypatch):
  with pytest.raises(DataError) as err:
    tfds_source.load_tfds_classes("omniglot", tmp_path, download=False)
  msg = str(err.value)
  assert "not prepared in " + str(tmp_path / "omniglot" / "3.0.0") in msg
  assert f"tfds build omniglot --file_format=array_record --data_dir={tmp_path}" in msg
  assert "--tfds_data_dir" in msg
  monkeypatch.setattr(tfds_source, "_has_tensorflow", lambda: False)
  with pytest.raises(DataError, match="needs TensorFlow.*pip install tensorflow"):
    tfds_source.load_tfds_classes("cifar100", tmp_path, download=True)
  assert not (tmp_path / "downloads").exists()


def test_tfrecord_format_needs_tensorflow(tmp_path):
  prepare(Omniglot, tmp_path)
  info = tmp_path / "omniglot" / "3.0.0" / "dataset_info.json"
  meta = json.loads(info.read_text())
  meta["fileFormat"] = "tfrecord"
  info.write_text(json.dumps(meta))
  with pytest.raises(DataError, match="array_record format.*pip install tensorflow"):
    tfds_source.load_tfds_classes("omniglot", tmp_path)


def test_mock_data(tmp_path, monkeypatch):
  """tfds.testing.mock_data works without TensorFlow; its records go through the loader.

  mock_data replaces download_and_prepare, so "preparing" is allowed here.
  """
  monkeypatch.setattr(tfds_source, "_has_tensorflow", lambda: True)
  items = test_cifar.examples()

  def as_data_source(self, split, **kwargs):
    del self, kwargs
    # Reversed: the loader restores file order from the ids.
    return [{"id": f"{split}_{i:05d}".encode(), "image": test_cifar.pixels(c, k),
             "label": np.int64(c), "coarse_label": np.int64(cifar.COARSE_OF_FINE[c])}
            for i, (c, k) in reversed(list(enumerate(items[split])))]

  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    data = tfds_source.load_tfds_classes("cifar100", tmp_path, image_size=16, download=True)
  assert data.images.shape == (100, 3, 16, 16, 3)
  want = cifar.resize(cifar.Cifar100(test_cifar.expected_images()), 16)
  np.testing.assert_array_equal(data.images, want.images)


def test_mock_data_omniglot_arrays(tmp_path, monkeypatch):
  """Decoded (array) images give what the PNG bytes give."""
  monkeypatch.setattr(tfds_source, "_has_tensorflow", lambda: True)

  def as_data_source(self, split, **kwargs):
    del self, kwargs
    zip_name = {"train": "images_background.zip", "test": "images_evaluation.zip"}[split]
    return [{"image": np.repeat(np.where(ink_mask(cid, d), 0, 255).astype(np.uint8)[..., None],
                                3, axis=2),
             "alphabet": np.int64(ALPHABETS.index(alphabet)), "label": np.int64(cid - 1)}
            for name, alphabet, cid in CHARS if name == zip_name for d in range(1, 21)]

  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    data = tfds_source.load_tfds_classes("omniglot", tmp_path, download=True)
  write_zips(tmp_path / "zips")
  want = omniglot.load_omniglot(tmp_path / "zips", download=False)
  np.testing.assert_array_equal(data.images, want.images)  # drawer order kept here
  np.testing.assert_array_equal(data.background, want.background)


def test_no_tensorflow_was_imported():
  assert "tensorflow" not in sys.modules
