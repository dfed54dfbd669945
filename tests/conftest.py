"""Shared fixtures: a small fake Omniglot in the official layout, isolated caches."""

from __future__ import annotations

import pathlib

import pytest

from fake_omniglot import many_chars, write_zips

# 16 characters: enough for 3-way episodes in every split (rotations give 4 classes each).
NUM_BACKGROUND, NUM_EVALUATION = 10, 6


@pytest.fixture(scope="session")
def fake_omniglot_dir(tmp_path_factory) -> pathlib.Path:
  """A folder holding both zips of a 16-character Omniglot; read only by tests."""
  folder = tmp_path_factory.mktemp("fake_omniglot")
  write_zips(folder, chars=many_chars(NUM_BACKGROUND, NUM_EVALUATION))
  return folder


DATA_DIR_VARIABLES = ("ADVMAML_DATA_DIR", "ADVMAML_CIFAR_DIR", "ADVMAML_MINI_IMAGENET_DIR",
                      "TFDS_DATA_DIR")


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> pathlib.Path:
  """Keeps a test off the user's cache and data folders: a temp cache, no data-dir variables."""
  for name in DATA_DIR_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  return tmp_path / "xdg"
