"""Tests of advmaml.data.splits on fake Omniglot data with the full 1623 ids."""

from __future__ import annotations

import numpy as np
import pytest

from advmaml.data import splits
from advmaml.data.omniglot import OmniglotData


def fake_data(num_background: int = 964, num_evaluation: int = 659) -> OmniglotData:
  """Tiny 3x3 images whose pixels encode (character id, drawer, position)."""
  n = num_background + num_evaluation
  ids = np.arange(1, n + 1, dtype=np.int32)
  images = (ids[:, None, None, None] * 7 + np.arange(20)[None, :, None, None] * 3
            + np.arange(9).reshape(1, 1, 3, 3)) % 256
  return OmniglotData(
      images=images.astype(np.uint8), character_ids=ids,
      alphabets=tuple(f"A{i // 20}" for i in range(n)),
      background=ids <= num_background)


@pytest.fixture(scope="module")
def data() -> OmniglotData:
  return fake_data()


def char_sets(result: dict[str, splits.ClassSplit]) -> dict[str, set[int]]:
  return {name: set(s.character_ids.tolist()) for name, s in result.items()}


def assert_disjoint(sets: dict[str, set[int]]):
  assert not sets["train"] & sets["val"]
  assert not sets["train"] & sets["test"]
  assert not sets["val"] & sets["test"]


def test_constants():
  assert (splits.VINYALS_TRAIN, splits.VINYALS_VAL, splits.VINYALS_TEST) == (1100, 100, 423)
  assert (splits.LAKE_TRAIN, splits.LAKE_VAL) == (864, 100)


@pytest.mark.parametrize("rotate, per_char", [(True, 4), (False, 1)])
def test_vinyals_sizes(data, rotate, per_char):
  result = splits.make_splits(data, "vinyals", seed=0, rotate=rotate)
  assert set(result) == {"train", "val", "test"}
  sizes = {name: s.num_classes for name, s in result.items()}
  assert sizes == {"train": 1100 * per_char, "val": 100 * per_char, "test": 423 * per_char}
  sets = char_sets(result)
  assert [len(sets[k]) for k in ("train", "val", "test")] == [1100, 100, 423]
  assert_disjoint(sets)
  assert sets["train"] | sets["val"] | sets["test"] == set(range(1, 1624))
  # Random over alphabets: the background set is not kept together.
  assert 0 < sum(i <= 964 for i in sets["test"]) < 423


def test_lake_sizes_and_membership(data):
  result = splits.make_splits(data, "lake", seed=0)
  sets = char_sets(result)
  assert [len(sets[k]) for k in ("train", "val", "test")] == [864, 100, 659]
  assert result["train"].num_classes == 864 * 4
  assert_disjoint(sets)
  assert all(i <= 964 for i in sets["train"] | sets["val"])
  assert sets["test"] == set(range(965, 1624))


@pytest.mark.parametrize("protocol", splits.PROTOCOLS)
def test_deterministic_given_seed(data, protocol):
  a = splits.make_splits(data, protocol, seed=3)
  b = splits.make_splits(data, protocol, seed=3)
  c = splits.make_splits(data, protocol, seed=4)
  for name in ("train", "val", "test"):
    np.testing.assert_array_equal(a[name].images, b[name].images)
    np.testing.assert_array_equal(a[name].character_ids, b[name].character_ids)
  assert char_sets(a)["val"] != char_sets(c)["val"]


def test_rotations_and_class_order(data):
  split = splits.make_splits(data, "vinyals", seed=1)["val"]
  assert split.images.shape == (400, 20, 3, 3) and split.images.dtype == np.uint8
  assert split.character_ids.dtype == np.int32 and split.rotations.dtype == np.int32
  np.testing.assert_array_equal(split.rotations, np.tile([0, 1, 2, 3], 100))
  chars = split.character_ids[::4]
  assert np.all(np.diff(chars) > 0)  # ascending ids, character-major
  np.testing.assert_array_equal(split.character_ids, np.repeat(chars, 4))
  for cls in (0, 1, 2, 3, 397):
    original = data.images[split.character_ids[cls] - 1]
    for drawer in (0, 19):
      np.testing.assert_array_equal(
          split.images[cls, drawer], np.rot90(original[drawer], split.rotations[cls]))


def test_no_rotation_keeps_images(data):
  split = splits.make_splits(data, "lake", seed=0, rotate=False)["test"]
  np.testing.assert_array_equal(split.rotations, 0)
  np.testing.assert_array_equal(split.images, data.images[964:])


@pytest.mark.parametrize("num_bg, num_eval, want", [
    (6, 2, {"vinyals": (5, 1, 2), "lake": (5, 1, 2)}),
    (2, 1, {"vinyals": (1, 1, 1), "lake": (1, 1, 1)}),
    (300, 200, {"vinyals": (339, 31, 130), "lake": (269, 31, 200)}),
])
def test_small_data_scales_proportionally(num_bg, num_eval, want):
  data = fake_data(num_bg, num_eval)
  for protocol in splits.PROTOCOLS:
    sets = char_sets(splits.make_splits(data, protocol, rotate=False))
    assert tuple(len(sets[k]) for k in ("train", "val", "test")) == want[protocol]
    assert_disjoint(sets)


def test_too_small_or_unsuitable_data():
  with pytest.raises(ValueError, match="cannot split 2"):
    splits.make_splits(fake_data(1, 1), "vinyals")
  with pytest.raises(ValueError, match="evaluation characters"):
    splits.make_splits(fake_data(5, 0), "lake")


def test_unknown_protocol(data):
  with pytest.raises(ValueError, match="vinyals.*lake"):
    splits.make_splits(data, "random")
