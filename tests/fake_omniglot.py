"""Tiny Omniglot zips in the official release's layout, written by tests."""

from __future__ import annotations

import io
import pathlib
import zipfile

import numpy as np
from PIL import Image

from advmaml.data import omniglot

# (zip name, alphabet, character id); written out of order on purpose.
CHARS = (("images_background.zip", "Beta", 4), ("images_background.zip", "Beta", 5),
         ("images_background.zip", "Beta", 6), ("images_background.zip", "Alpha", 1),
         ("images_background.zip", "Alpha", 2), ("images_background.zip", "Alpha", 3),
         ("images_evaluation.zip", "Gamma", 7), ("images_evaluation.zip", "Gamma", 8))
SRC = 105


def ink_mask(char_id: int, drawer: int, shift: int = 0) -> np.ndarray:
  """(105, 105) bool stroke mask: a rectangle unique to (character, drawer)."""
  mask = np.zeros((SRC, SRC), bool)
  top, left = 5 + (8 * char_id) % 70 + shift, 5 + 3 * drawer
  mask[top:top + 20, left:left + 12] = True
  return mask


def png_bytes(mask: np.ndarray) -> bytes:
  """A 1-bit PNG, white background, black strokes, as in the official zips."""
  buf = io.BytesIO()
  Image.fromarray(~mask).save(buf, format="PNG")  # bool array -> mode "1"
  return buf.getvalue()


def write_zips(folder: pathlib.Path, shift: int = 0, drawers: dict[int, int] | None = None,
               extra: dict[str, bytes] | None = None, chars=CHARS) -> None:
  """Writes both zips into `folder`.

  `drawers` maps a character id to its number of drawers (default 20);
  `extra` adds members (name -> bytes).
  """
  folder.mkdir(parents=True, exist_ok=True)
  for zip_name in omniglot.ZIP_NAMES:
    top = zip_name.removesuffix(".zip")
    with zipfile.ZipFile(folder / zip_name, "w") as zf:
      for number, (name, alphabet, cid) in enumerate(chars):
        if name != zip_name:
          continue
        char_dir = f"{top}/{alphabet}/character{number + 1:02d}/"
        zf.writestr(char_dir, b"")  # folder entries, as zip tools write them
        for d in reversed(range(1, (drawers or {}).get(cid, 20) + 1)):  # drawer order must not matter
          zf.writestr(f"{char_dir}{cid:04d}_{d:02d}.png", png_bytes(ink_mask(cid, d, shift)))
      for member, data in (extra or {}).items():
        if member.startswith(top):
          zf.writestr(member, data)




def many_chars(num_background: int, num_evaluation: int):
  """CHARS-style entries for a larger fake set: ids 1..n, background alphabets first."""
  chars = []
  for cid in range(1, num_background + num_evaluation + 1):
    zip_name = omniglot.ZIP_NAMES[0] if cid <= num_background else omniglot.ZIP_NAMES[1]
    chars.append((zip_name, f"Alphabet{(cid - 1) // 4}", cid))
  return tuple(chars)
