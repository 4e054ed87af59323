"""Cityscapes classes of the synthetic city and an imperfect segmenter.

`corrupt_labels` simulates an imperfect segmenter on the *written* label maps:
dropped thin objects (poles, signs, lights, people, bikes removed and filled
from the class beside them), blob-wise class confusions (smooth random blobs
where road<->sidewalk, building<->wall / sky, vegetation<->terrain,
car<->truck, ... swap) and boundary erosion. Changed pixels (typical): day
0.2 % < repaint 2 % < dusk 4 % < fog 9 % < night 12 %. `render` itself
returns exact labels. `colorize` paints a label map in the Cityscapes colours.

The class ids (ROAD ... BICYCLE, Cityscapes trainIds) are defined in `world`,
whose primitives carry them.
"""

from __future__ import annotations

import functools

import numpy as np

from structvpr_jax.data.synthetic.world import (
    BICYCLE, BUILDING, BUS, CAR, CONDITIONS, FENCE, MOTORCYCLE, PERSON, POLE, RIDER, ROAD,
    SIDEWALK, SKY, TERRAIN, TRAFFIC_LIGHT, TRAFFIC_SIGN, TRAIN, TRUCK, VEGETATION, WALL)

NUM_CLASSES = 19
CLASS_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole",
               "traffic light", "traffic sign", "vegetation", "terrain", "sky",
               "person", "rider", "car", "truck", "bus", "train", "motorcycle",
               "bicycle")
PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156),
    (190, 153, 153), (153, 153, 153), (250, 170, 30), (220, 220, 0),
    (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100),
    (0, 0, 230), (119, 11, 32)], np.uint8)

# condition: (boundary take-over prob, blob fraction, thin-object drop prob)
_CORRUPTION = {
    "day": (0.04, 0.0, 0.0),
    "repaint": (0.08, 0.015, 0.05),
    "dusk": (0.15, 0.03, 0.12),
    "fog": (0.3, 0.07, 0.35),
    "night": (0.4, 0.1, 0.45),
}
_CONFUSE = np.arange(NUM_CLASSES)[:, None].repeat(2, 1)
for _c, _alts in {ROAD: (SIDEWALK, SIDEWALK), SIDEWALK: (ROAD, TERRAIN),
                  BUILDING: (WALL, SKY), WALL: (BUILDING, FENCE), FENCE: (WALL, VEGETATION),
                  POLE: (BUILDING, TRAFFIC_SIGN), TRAFFIC_LIGHT: (POLE, TRAFFIC_SIGN),
                  TRAFFIC_SIGN: (POLE, BUILDING), VEGETATION: (TERRAIN, BUILDING),
                  TERRAIN: (VEGETATION, SIDEWALK), SKY: (BUILDING, VEGETATION),
                  PERSON: (RIDER, POLE), RIDER: (PERSON, BICYCLE), CAR: (TRUCK, BUILDING),
                  TRUCK: (CAR, BUS), BUS: (TRUCK, TRAIN), TRAIN: (BUS, BUS),
                  MOTORCYCLE: (BICYCLE, PERSON), BICYCLE: (MOTORCYCLE, PERSON)}.items():
  _CONFUSE[_c] = _alts
_CONFUSE = _CONFUSE.astype(np.uint8)
_THIN = np.zeros(256, bool)
_THIN[[POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN, PERSON, RIDER, MOTORCYCLE, BICYCLE]] = True


@functools.lru_cache(maxsize=16)
def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
  """[n_out, n_in] linear interpolation weights (coarse grid spans the output)."""
  pos = (np.arange(n_out) + 0.5) / n_out * (n_in - 1)
  i0 = np.minimum(np.floor(pos).astype(int), n_in - 2)
  w = pos - i0
  m = np.zeros((n_out, n_in), np.float32)
  m[np.arange(n_out), i0] = 1.0 - w
  m[np.arange(n_out), i0 + 1] = w
  return m


def _smooth_field(rng, H, W, cell=12):
  """A smooth random field in [0, 1] (bilinear upsampling of coarse noise)."""
  gh, gw = max(2, H // cell + 2), max(2, W // cell + 2)
  coarse = rng.random((gh, gw), np.float32)
  return _interp_matrix(H, gh) @ coarse @ _interp_matrix(W, gw).T


def corrupt_labels(labels: np.ndarray, condition: str, rng: np.random.Generator) -> np.ndarray:
  """A plausibly wrong segmentation of `labels` for `condition` (uint8 [H, W]).

  Dropped thin objects (each pole / sign / light / person / bike -- a run of
  adjacent columns of its class -- with a condition-dependent probability,
  filled from the pixels to its left), blob-wise class confusions (smooth random blobs covering a fraction
  of the image where classes swap with a confusable one) and boundary
  erosion (border pixels take a random neighbour's class). Strength grows
  day (lightest) < repaint < dusk < fog < night. Deterministic given rng.
  """
  if condition not in _CORRUPTION:
    raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
  p_edge, blob, p_drop = _CORRUPTION[condition]
  out = np.array(labels, np.uint8, copy=True)
  H, W = out.shape
  cols = np.arange(W)
  if p_drop > 0:
    thin = _THIN[out]
    if thin.any():
      # objects = runs of adjacent image columns holding a thin class
      drop = np.zeros_like(thin)
      for c in np.nonzero(np.bincount(out[thin], minlength=NUM_CLASSES))[0]:
        mask = out == c
        has = mask.any(axis=0)
        start = has & ~np.concatenate([[False], has[:-1]])
        run = np.cumsum(start) * has
        dropped = np.concatenate([[False], rng.random(int(run.max())) < p_drop])[run]
        drop |= mask & dropped
      if drop.any():
        # fill from the nearest kept pixel to the left (right at the border)
        left = np.maximum.accumulate(np.where(drop, -1, cols), axis=1)
        right = np.minimum.accumulate(np.where(drop, W, cols)[:, ::-1], axis=1)[:, ::-1]
        src = np.where(left >= 0, left, np.minimum(right, W - 1))
        out = np.take_along_axis(out, src, axis=1)
  if blob > 0:
    field = _smooth_field(rng, H, W)
    mask = field > np.quantile(field[::3, ::3], 1.0 - blob)
    choice = (_smooth_field(rng, H, W, 20) > 0.5).astype(np.intp)
    alt = _CONFUSE[out, choice]
    if condition in ("night", "fog"):  # dark / washed-out buildings read as sky near the top
      alt[:int(H * 0.3)] = np.where(out[:int(H * 0.3)] == BUILDING, SKY, alt[:int(H * 0.3)])
    out = np.where(mask, alt, out)
  if p_edge > 0:
    for _ in range(2):
      pad = np.pad(out, 1, mode="edge")
      edge = ((pad[:-2, 1:-1] != out) | (pad[2:, 1:-1] != out) |
              (pad[1:-1, :-2] != out) | (pad[1:-1, 2:] != out))
      ii, jj = np.nonzero(edge)
      take = rng.random(len(ii)) < p_edge
      ii, jj = ii[take], jj[take]
      d = rng.integers(0, 4, len(ii))
      out[ii, jj] = pad[ii + 1 + np.array([-1, 1, 0, 0])[d], jj + 1 + np.array([0, 0, -1, 1])[d]]
  return out


def colorize(labels: np.ndarray) -> np.ndarray:
  """Cityscapes colours for a label map (255 / unknown -> black)."""
  pal = np.zeros((256, 3), np.uint8)
  pal[:NUM_CLASSES] = PALETTE
  return pal[np.asarray(labels, np.uint8)]
