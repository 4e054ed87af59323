"""Decoding one image file: RGB (bilinear resize) and label maps (nearest),
each failure a ValueError naming the file; header-only checks.

The only place pixels are decoded from files: the folder input
(`input_pipeline.ImageSource`) and the records export (`records.export`)
both call these, so both formats hold the same bytes.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image


def read_rgb(path: str, image_size) -> np.ndarray:
  """uint8 [H, W, 3], bilinear resize to `image_size` (H, W).

  Raises ValueError naming the file when it cannot be decoded.
  """
  h, w = int(image_size[0]), int(image_size[1])
  try:
    with Image.open(path) as img:
      img = img.convert("RGB")
      if img.size != (w, h):
        img = img.resize((w, h), Image.BILINEAR)
      return np.asarray(img, np.uint8)
  except (OSError, ValueError, SyntaxError) as e:
    raise ValueError(f"{path}: cannot decode image ({e})") from None


def read_labels(path: str, image_size, num_classes: Optional[int] = None) -> np.ndarray:
  """uint8 [H, W] class ids, nearest-neighbour resize to `image_size`.

  Raises ValueError naming the file when it is missing, not a single-channel
  label map, or holds an id >= num_classes (255 = ignore is allowed).
  """
  h, w = int(image_size[0]), int(image_size[1])
  try:
    with Image.open(path) as img:
      if img.mode not in ("L", "P", "I", "I;16"):
        raise ValueError(f"mode {img.mode}, expected a single-channel label map")
      if img.size != (w, h):
        img = img.resize((w, h), Image.NEAREST)
      labels = np.asarray(img)
  except FileNotFoundError:
    raise ValueError(f"{path}: missing label map") from None
  except (OSError, ValueError, SyntaxError) as e:
    raise ValueError(f"{path}: cannot read label map ({e})") from None
  if num_classes is not None:
    bad = (labels >= num_classes) & (labels != 255)
    if bad.any():
      raise ValueError(f"{path}: label id {int(labels[bad].max())} >= number of "
                       f"classes {num_classes}")
  return labels.astype(np.uint8)


def check_header(path: str, label_map: bool = False) -> None:
  """Reads only the file's header: raises ValueError naming the file when it
  is missing, not an image PIL can open, or (label maps) not single-channel.
  Milliseconds per file, so a split is checked before compute without
  decoding it; the pixels are decoded (and checked) when first used."""
  try:
    with Image.open(path) as img:
      mode = img.mode
  except FileNotFoundError:
    raise ValueError(f"{path}: missing {'label map' if label_map else 'image'}") from None
  except (OSError, ValueError, SyntaxError) as e:
    raise ValueError(f"{path}: cannot {'read label map' if label_map else 'decode image'} "
                     f"({e})") from None
  if label_map and mode not in ("L", "P", "I", "I;16"):
    raise ValueError(f"{path}: cannot read label map (mode {mode}, expected a "
                     f"single-channel label map)")
