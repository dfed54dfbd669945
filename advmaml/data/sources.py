"""From a config to class splits: the one place that knows which dataset reads how.

| dataset          | files                                  | --split              |
| ---------------- | -------------------------------------- | -------------------- |
| `omniglot`       | official zips (`omniglot.py`)          | `vinyals`, `lake`    |
| `omniglot_tfds`  | TFDS `omniglot` (`tfds_source.py`)     | `vinyals`, `lake`    |
| `cifar_fs`       | `cifar-100-python` (`cifar.py`)        | `bertinetto`         |
| `fc100`          | `cifar-100-python` (`cifar.py`)        | `oreshkin`           |
| `cifar_fs_tfds`  | TFDS `cifar100`                        | `bertinetto`         |
| `fc100_tfds`     | TFDS `cifar100`                        | `oreshkin`           |
| `mini_imagenet`  | pickles or CSVs+images (`mini_imagenet.py`) | `ravi`          |

Every split is a `splits.ClassSplit` whose ``images`` are the class pool
(C, D, H, W) (Omniglot, ink = 255) or (C, D, H, W, 3) (colour), uint8, with
the same number D of images per class. For the non-Omniglot sets
``character_ids`` holds each class's original id (CIFAR-100 fine label,
ImageNet wnid number) and ``rotations`` is all zeros: rotation classes are an
Omniglot protocol only.
"""

from __future__ import annotations

import os

from advmaml.data import cifar, mini_imagenet, omniglot, splits, tfds_source

# Split protocols of each dataset (the values --split accepts).
PROTOCOLS: dict[str, tuple[str, ...]] = {
    "omniglot": splits.PROTOCOLS,
    "omniglot_tfds": splits.PROTOCOLS,
    "cifar_fs": (cifar.PROTOCOLS["cifar_fs"],),
    "fc100": (cifar.PROTOCOLS["fc100"],),
    "cifar_fs_tfds": (cifar.PROTOCOLS["cifar_fs"],),
    "fc100_tfds": (cifar.PROTOCOLS["fc100"],),
    "mini_imagenet": ("ravi",),
}
DATASETS = tuple(PROTOCOLS)
# Image side of each dataset's standard protocol (--image_size).
STANDARD_IMAGE_SIZE = {"omniglot": 28, "omniglot_tfds": 28, "cifar_fs": 32, "fc100": 32,
                       "cifar_fs_tfds": 32, "fc100_tfds": 32, "mini_imagenet": 84}


def check_protocol(dataset: str, split: str, rotate: bool) -> None:
  """Raises ValueError (naming the flag) for a dataset, split or rotation that does not exist."""
  if dataset not in PROTOCOLS:
    raise ValueError(f"--dataset={dataset!r} is unknown; choose one of {DATASETS}")
  if split not in PROTOCOLS[dataset]:
    raise ValueError(f"--split={split!r} is not a split of --dataset={dataset}; choose one of "
                     f"{PROTOCOLS[dataset]}")
  if rotate and dataset not in ("omniglot", "omniglot_tfds"):
    raise ValueError(f"--rotate adds rotated copies of Omniglot characters as classes; "
                     f"{dataset} has no such protocol: pass --rotate=false")


def load_class_splits(dataset: str, *, data_dir=None, split: str = "vinyals",
                      split_seed: int = 0, rotate: bool = True, image_size: int = 28,
                      download: bool = True,
                      tfds_data_dir: str | os.PathLike | None = None
                      ) -> dict[str, splits.ClassSplit]:
  """Returns {"train", "val", "test"} -> ClassSplit with images (C, D, H, W[, 3]) uint8.

  Args:
    dataset: one of DATASETS.
    data_dir: the dataset's folder (None: its environment variable, else the
      user cache); for the *_tfds datasets the TFDS data folder, unless
      `tfds_data_dir` is given.
    split: a protocol of PROTOCOLS[dataset].
    split_seed: shuffle seed of the Omniglot protocols (others are fixed lists).
    rotate: Omniglot's four-rotation classes; must be False for other datasets.
    image_size: side of the (square) images returned.
    download: fetch or prepare missing files where that is possible
      (Omniglot zips, the CIFAR-100 archive, TFDS with TensorFlow installed).
    tfds_data_dir: the TFDS data folder for the *_tfds datasets.

  Raises:
    ValueError: unknown dataset, a split protocol or rotation that the
      dataset does not have.
    DataError: files missing or damaged (the message says how to fix it).
  """
  check_protocol(dataset, split, rotate)
  tfds_dir = tfds_data_dir if tfds_data_dir not in (None, "") else data_dir

  if dataset == "omniglot":
    data = omniglot.load_omniglot(data_dir, image_size=image_size, download=download)
    return splits.make_splits(data, split, seed=split_seed, rotate=rotate)
  if dataset == "omniglot_tfds":
    data = tfds_source.load_tfds_classes("omniglot", tfds_dir, image_size=image_size,
                                         download=download)
    return splits.make_splits(data, split, seed=split_seed, rotate=rotate)
  if dataset in ("cifar_fs", "fc100"):
    data = cifar.load_cifar100(data_dir, image_size=image_size, download=download)
    return cifar.make_splits(data, dataset)
  if dataset in ("cifar_fs_tfds", "fc100_tfds"):
    data = tfds_source.load_tfds_classes("cifar100", tfds_dir, image_size=image_size,
                                         download=download)
    return cifar.make_splits(data, dataset.removesuffix("_tfds"))
  # mini_imagenet: nothing to download (ImageNet's licence).
  return mini_imagenet.make_splits(
      mini_imagenet.load_mini_imagenet(data_dir, image_size=image_size))
