"""From a config to class splits: the one place that knows which dataset reads how."""

from __future__ import annotations

from advmaml.data import omniglot, splits

DATASETS = ("omniglot",)


def load_class_splits(dataset: str, *, data_dir=None, split: str = "vinyals",
                      split_seed: int = 0, rotate: bool = True, image_size: int = 28,
                      download: bool = True) -> dict[str, splits.ClassSplit]:
  """Returns {"train", "val", "test"} -> ClassSplit with images (C, D, H, W[, ch]) uint8."""
  if dataset == "omniglot":
    data = omniglot.load_omniglot(data_dir, image_size=image_size, download=download)
    return splits.make_splits(data, split, seed=split_seed, rotate=rotate)
  raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
