"""Train / validation / test class splits of Omniglot.

Two protocols:

* ``"vinyals"`` (Vinyals et al. 2016, used by MAML, Finn et al. 2017): all
  1623 characters are shuffled together; 1100 go to train, 100 to validation
  and the remaining 423 to test, regardless of alphabet.
* ``"lake"`` (Lake et al. 2015): the 964 background characters are shuffled;
  100 go to validation and the other 864 to train. The test split is the 659
  characters of the evaluation alphabets, so test alphabets are never seen.

With ``rotate=True`` each character yields four classes, its images turned by
0, 90, 180 and 270 degrees (Vinyals et al. 2016), so that the rotations of one
character are always in the same split.

For a data set smaller than the full one (a test fixture, a subset), the split
sizes scale proportionally (``vinyals``: fractions 1100/1623 and 100/1623 of
all characters, the rest to test; ``lake``: 100/964 of the background
characters to validation), rounded, with at least one character per split.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from advmaml.data.omniglot import OmniglotData

PROTOCOLS = ("vinyals", "lake")
SPLITS = ("train", "val", "test")
NUM_ROTATIONS = 4

# Character counts of the full data set under each protocol.
NUM_CHARACTERS = 1623
NUM_BACKGROUND = 964
VINYALS_TRAIN = 1100
VINYALS_VAL = 100
VINYALS_TEST = NUM_CHARACTERS - VINYALS_TRAIN - VINYALS_VAL  # 423
LAKE_VAL = 100
LAKE_TRAIN = NUM_BACKGROUND - LAKE_VAL  # 864


@dataclasses.dataclass(frozen=True)
class ClassSplit:
  """The classes of one split.

  Attributes:
    images: (num_classes, 20, S, S) uint8, ink = 255.
    character_ids: (num_classes,) int32, the global id of each class's character.
    rotations: (num_classes,) int32 in {0, 1, 2, 3}, the multiple of 90 degrees
      (counter-clockwise, as np.rot90) applied to that character's images.
  """

  images: np.ndarray
  character_ids: np.ndarray
  rotations: np.ndarray

  def __post_init__(self):
    n = self.images.shape[0]
    if self.character_ids.shape != (n,) or self.rotations.shape != (n,):
      raise ValueError(f"character_ids and rotations must have shape ({n},), got "
                       f"{self.character_ids.shape} and {self.rotations.shape}")

  @property
  def num_classes(self) -> int:
    return int(self.images.shape[0])


def _split_counts(total: int, fractions: tuple[float, ...]) -> list[int]:
  """Rounded sizes for `fractions` of `total`, the rest last; each at least 1.

  Returns len(fractions) + 1 counts that sum to `total`.
  """
  parts = len(fractions) + 1
  if total < parts:
    raise ValueError(f"cannot split {total} characters into {parts} non-empty parts")
  counts = []
  left = total
  for i, fraction in enumerate(fractions):
    still_needed = parts - i - 1  # one character for each later part
    counts.append(min(max(1, round(total * fraction)), left - still_needed))
    left -= counts[-1]
  return counts + [left]


def _character_splits(data: OmniglotData, protocol: str,
                      rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Indices into `data`'s characters of each split, each sorted ascending."""
  n = len(data.character_ids)
  if protocol == "vinyals":
    order = rng.permutation(n)
    n_train, n_val, _ = _split_counts(
        n, (VINYALS_TRAIN / NUM_CHARACTERS, VINYALS_VAL / NUM_CHARACTERS))
    chunks = np.split(order, [n_train, n_train + n_val])
  elif protocol == "lake":
    background = np.flatnonzero(data.background)
    evaluation = np.flatnonzero(~data.background)
    if evaluation.size == 0:
      raise ValueError("the lake protocol needs evaluation characters for its test split")
    order = rng.permutation(background)
    n_val, _ = _split_counts(len(background), (LAKE_VAL / NUM_BACKGROUND,))
    chunks = [order[n_val:], order[:n_val], evaluation]
  else:
    raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
  # Sorted, so a split's class order does not depend on the shuffle.
  return {name: np.sort(chunk) for name, chunk in zip(SPLITS, chunks)}


def _make_classes(data: OmniglotData, chars: np.ndarray, rotate: bool) -> ClassSplit:
  """Classes of the characters at indices `chars`, character-major."""
  images = data.images[chars]  # (c, 20, S, S)
  ids = data.character_ids[chars].astype(np.int32)
  if not rotate:
    return ClassSplit(images, ids, np.zeros(len(chars), np.int32))
  if images.shape[2] != images.shape[3]:
    raise ValueError(f"rotate=True needs square images, got {images.shape[2:]}")
  # (c, 4, 20, S, S): rotation k of every drawer image of each character.
  rotated = np.stack([np.rot90(images, k, axes=(2, 3)) for k in range(NUM_ROTATIONS)],
                     axis=1)
  return ClassSplit(
      images=rotated.reshape((-1,) + images.shape[1:]),
      character_ids=np.repeat(ids, NUM_ROTATIONS),
      rotations=np.tile(np.arange(NUM_ROTATIONS, dtype=np.int32), len(chars)))


def make_splits(data: OmniglotData, protocol: str, seed: int = 0,
                rotate: bool = True) -> dict[str, ClassSplit]:
  """Splits Omniglot's characters into train, val and test classes.

  Args:
    data: the loaded data set, images (num_characters, 20, S, S).
    protocol: one of PROTOCOLS (see the module docstring).
    seed: seeds np.random.default_rng for the shuffle of characters.
    rotate: whether each character gives 4 classes (0/90/180/270 degrees)
      instead of 1.

  Returns:
    {"train", "val", "test"} -> ClassSplit. Within a split, characters are in
    ascending global id, and with rotate=True the 4 rotations of a character
    are consecutive classes (rotations 0, 1, 2, 3).

  Raises:
    ValueError: unknown protocol, or too few characters for non-empty splits.
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
  chars = _character_splits(data, protocol, np.random.default_rng(seed))
  return {name: _make_classes(data, idx, rotate) for name, idx in chars.items()}
