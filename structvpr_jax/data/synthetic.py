"""A procedural 2.5-D city with exact per-pixel labels (the embedded default data).

Training runs on a fresh machine with no download: this module renders street
views of a procedural city with pure, vectorised numpy and writes them in the
project layout (`structvpr_jax.data.layout`)::

    <root>/images/{train,val,test}/{database,queries}/@east@north@...@note@.jpg
    <root>/segmentations/{train,val,test}/{database,queries}/<same stem>.png
    <root>/synthetic.json     (parameters, counts, per-place regimes)

Names: ``layout.format_name(east, north, utm_zone_number="32",
utm_zone_letter="T", pano_id=<split><place:05d>, heading=<compass deg>,
timestamp=q<query:06d> (queries only), note=<condition>)``; UTM metres.

World (`make_world`)
--------------------
A district is a set of straight streets ("corridors"), each with its own frame
(a: metres along the street, b: metres to its left). A street has a road
(|b| < road_half), kerb + sidewalk (with grass verges / tree pits) up to the
facade line (|b| = facade), and is cut into blocks separated by cross streets
(zebra crossings, traffic lights, the cross street's facades). Blocks hold
facades (2-D segments in the ground plane with a height; bay/floor window
grids, shop fronts with coloured sign bands, doors, cornices, gable roofs,
set-backs, side walls), a back row of taller buildings (the skyline), walls,
fences, hedges, trees (trunk + ellipsoidal crown), street lamps, traffic
lights, traffic signs, parked cars (body + cabin boxes), trucks / buses,
people and cyclists. Database places are `PLACE_SPACING` = 5 m apart along
the right lane of each street, looking along it. Street centres lie on an
800 m grid (places of different streets are > 25 m apart) and a street only
draws its own corridor (nothing of the other streets). The districts of
train / val / test come from different random streams and sit at UTM offsets
30 km apart, so they share no street, building or coordinate. Everything is
deterministic in (seed, split, num_places).

Rendering (`render`)
--------------------
One ray per image column (all columns at once) is intersected with every
primitive near the camera: segments (facades, walls, fences, hedges), vertical
cylinders (poles, lamps, trunks, crowns, people, signs, traffic lights) and
oriented boxes (cars, cabins, buses, bicycles). Each hit gives a depth t and,
through the pinhole model (focal f = W/2 / tan(hfov/2), hfov 90 deg, horizon
row cy = H/2, camera height h), the screen rows
``[ceil(cy - f (z_top - h)/t - 1/2), ceil(cy - f (z_bot - h)/t - 1/2))`` it
covers (a pixel is covered when its centre is). Per column the hits are
sorted by depth; a hit is visible when its top pokes above everything nearer
that stands on the ground (a floating part -- crown, cabin, lamp head, sign
plate -- never hides what is behind it below itself), and up to 16 visible
layers are painted far to near: a low car in front of a building shows the
building above it, a tower of the back row shows above a lower facade.
Pixels with no hit are sky above the horizon and ground below it (exact
ray / plane intersection, classified road / sidewalk / terrain from the street
plan). Labels (Cityscapes trainIds) come from the same per-pixel decision, so
they are exact for the rendered geometry. Textures are functions of the hit
position (metres along a facade, height, angle on a cylinder), so a building
looks the same from every place.

Traversals (conditions)
-----------------------
``day`` is the database traverse. Queries are ``dusk`` (warm, darker, some
lit windows), ``night`` (dark; random lit windows and shops, street lamps with
pools of light, traffic lights, tail lights), ``fog`` (contrast falls as
exp(-depth / 25..45 m)) and ``repaint`` (every facade's colours are *swapped
with another building of the district*, so appearance points to a wrong
place). Every traverse has its own parked cars / people / cyclists / oncoming
traffic (so in queries they are moved w.r.t. the database, consistently along
a traverse); query poses are jittered (+-2 m along, +-0.7 m lateral, +-7 deg
yaw, +-0.15 m height; every query is <= 2.2 m from its place) and get an
exposure / white-balance jitter and sensor noise.

`corrupt_labels` simulates an imperfect segmenter on the *written* label maps:
dropped thin objects (poles, signs, lights, people, bikes removed and filled
from the class beside them), blob-wise class confusions (smooth random blobs
where road<->sidewalk, building<->wall / sky, vegetation<->terrain,
car<->truck, ... swap) and boundary erosion. Changed pixels (typical): day
0.2 % < repaint 2 % < dusk 4 % < fog 9 % < night 12 %. `render` itself
returns exact labels.

Deliberate regimes (``World.place_regime``; also ``regimes`` in synthetic.json)
------------------------------------------------------------------------------
Every block is one of three kinds, balanced over the places of a district; a
place's regime is the kind of the block 20 m ahead of it.

* ``structure`` (the D2 regime: segmentation right, RGB wrong): strongly varied
  building heights (1..14 floors, gables, set-backs), gaps with walls / fences /
  hedges, a dense back row of towers (distinctive skyline), irregular clusters
  of trees, irregular lamp / sign spacing -- but *muted, similar* facade
  colours. The label map is a strong fingerprint (label maps 30 m apart agree
  on ~55-80 % of pixels); under night or repaint the RGB appearance changes
  strongly (repaint even moves another place's colours here), so the RGB
  branch is expected to fail where the seg branch succeeds.
* ``repetitive`` (the D3 regime: RGB right, segmentation wrong): long runs
  (140-210 m) of identical buildings with period P in {10, 15} m (same width,
  height, windows, shop fronts, flat roofs, aligned on both sides), trees and
  lamps on the same period, no gaps, no signs, no back row, no vehicles and
  few people -- but every building has its own saturated facade / shop-sign
  colour. Places a multiple of P apart have near-identical label maps
  (> 95 % equal pixels, see the tests), so the seg branch cannot tell them
  apart, while the colours (kept under dusk and fog) identify them.
* ``mixed``: ordinary streets (natural colours, moderate variation).

Public API
----------
``render``, ``corrupt_labels``, ``make_world`` (``World.poses``,
``World.place_regime``, ``World.utm``), ``query_pose``, ``make_scene``
(hand-placed scenes), ``generate``, ``montage``, ``colorize``; CLI::

    python -m structvpr_jax.data.synthetic generate --root DIR [--seed 0] \
        [--height 120 --width 160] [--train N --val N --test N]
    python -m structvpr_jax.data.synthetic montage --out docs/synthetic_montage.png

Limitations: 2.5-D (vertical extrusions only: no overhangs, roofs seen from
above, or transparency -- fences are drawn solid); camera pitch / roll are 0;
no cast shadows; primitives more than 170 m ahead are not drawn; a street's
corridor is all that is drawn, so a camera looking across a street's end
sees empty sky beyond it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
from typing import Optional, Sequence, Union

import numpy as np

from structvpr_jax.data import layout

VERSION = 1

# Cityscapes trainIds.
(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN,
 VEGETATION, TERRAIN, SKY, PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE,
 BICYCLE) = range(19)
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

DATABASE_CONDITION = "day"
QUERY_CONDITIONS = ("dusk", "night", "fog", "repaint")
CONDITIONS = (DATABASE_CONDITION,) + QUERY_CONDITIONS
REGIMES = ("structure", "repetitive", "mixed")

PLACE_SPACING = 5.0        # metres between consecutive database images
HFOV_DEG = 90.0
CAMERA_HEIGHT = 1.8
VIEW_DISTANCE = 170.0      # primitives farther ahead are not drawn
_WEDGE_CULL = True         # skip primitives outside the viewing wedge (exact)
_DYNAMIC_DISTANCE = 110.0  # query traverses re-draw cars / people this far ahead
MAX_LAYERS = 16            # visible depth layers painted per column
_NEAR = 0.05

SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}
# Distinct UTM offsets per split (districts never overlap: 30 km apart).
UTM_ORIGIN = {"train": (500000.0, 4500000.0), "val": (530000.0, 4500000.0),
              "test": (560000.0, 4500000.0)}
UTM_ZONE = ("32", "T")
_STREET_GRID = 800.0       # street centres on an 800 m grid, 4 per row

# Primitive types and kinds (kind selects the texture).
SEG, CYL, BOX = 0, 1, 2
(K_FACADE, K_WALL, K_FENCE, K_HEDGE, K_POLE, K_LAMP, K_TLIGHT, K_SIGN, K_TRUNK,
 K_CROWN, K_BODY, K_HEAD, K_CAR, K_CABIN, K_BIG, K_BIKE) = range(16)
_ROUNDED = (K_CROWN, K_HEAD)  # cylinders with an ellipsoidal vertical profile


# ----------------------------------------------------------------------------
# World data structures
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class Prims:
  """Struct of arrays of primitives in a street frame (a along, b left).

  geom per type: SEG (a0, b0, a1, b1); CYL (a, b, r); BOX (a, b, half_len,
  half_wid, cos, sin). tex: 8 texture parameters (facades: bay width, floor
  height, window w/h fraction, ground-floor type, door bay, wall top, gable
  height). bid: building id (>= 0) for facades, else -1.
  """
  ptype: np.ndarray
  geom: np.ndarray
  zb: np.ndarray
  zt: np.ndarray
  cls: np.ndarray
  kind: np.ndarray
  col: np.ndarray
  col2: np.ndarray
  rcol: np.ndarray
  rcol2: np.ndarray
  tex: np.ndarray
  seed: np.ndarray
  bid: np.ndarray
  amin: np.ndarray
  amax: np.ndarray
  bmin: np.ndarray
  bmax: np.ndarray

  def __len__(self):
    return len(self.ptype)

  def take(self, idx) -> "Prims":
    return Prims(**{f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)})

  @staticmethod
  def concat(parts: Sequence["Prims"]) -> "Prims":
    return Prims(**{f.name: np.concatenate([getattr(p, f.name) for p in parts])
                    for f in dataclasses.fields(Prims)})


class _Builder:
  """Accumulates primitives in Python lists, then packs them into `Prims`."""

  def __init__(self):
    self.rows = []

  def add(self, ptype, geom, zb, zt, cls, kind, col=(0.5, 0.5, 0.5), col2=None,
          tex=(), seed=0, bid=-1):
    geom = tuple(float(g) for g in geom) + (0.0,) * (6 - len(geom))
    tex = tuple(float(x) for x in tex) + (0.0,) * (8 - len(tex))
    col2 = col if col2 is None else col2
    self.rows.append((ptype, geom, float(zb), float(zt), cls, kind,
                      tuple(col), tuple(col2), tex, int(seed) & 0xFFFFFFFF, bid))

  def seg(self, p0, p1, zb, zt, cls, kind, **kw):
    self.add(SEG, (p0[0], p0[1], p1[0], p1[1]), zb, zt, cls, kind, **kw)

  def cyl(self, a, b, r, zb, zt, cls, kind, **kw):
    self.add(CYL, (a, b, r), zb, zt, cls, kind, **kw)

  def box(self, a, b, half_len, half_wid, angle, zb, zt, cls, kind, **kw):
    self.add(BOX, (a, b, half_len, half_wid, math.cos(angle), math.sin(angle)),
             zb, zt, cls, kind, **kw)

  def build(self) -> Prims:
    n = len(self.rows)
    if n == 0:
      return _empty_prims()
    cols = list(zip(*self.rows))
    geom = np.array(cols[1], np.float64).reshape(n, 6)
    ptype = np.array(cols[0], np.int8)
    col = np.array(cols[6], np.float32).reshape(n, 3)
    col2 = np.array(cols[7], np.float32).reshape(n, 3)
    amin, amax, bmin, bmax = _extent(ptype, geom)
    return Prims(ptype=ptype, geom=geom, zb=np.array(cols[2]), zt=np.array(cols[3]),
                 cls=np.array(cols[4], np.uint8), kind=np.array(cols[5], np.int8),
                 col=col, col2=col2, rcol=col.copy(), rcol2=col2.copy(),
                 tex=np.array(cols[8], np.float32).reshape(n, 8),
                 seed=np.array(cols[9], np.uint32), bid=np.array(cols[10], np.int32),
                 amin=amin, amax=amax, bmin=bmin, bmax=bmax)


def _empty_prims() -> Prims:
  z = lambda *s, d=np.float64: np.zeros(s, d)
  return Prims(ptype=z(0, d=np.int8), geom=z(0, 6), zb=z(0), zt=z(0),
               cls=z(0, d=np.uint8), kind=z(0, d=np.int8), col=z(0, 3, d=np.float32),
               col2=z(0, 3, d=np.float32), rcol=z(0, 3, d=np.float32),
               rcol2=z(0, 3, d=np.float32), tex=z(0, 8, d=np.float32),
               seed=z(0, d=np.uint32), bid=z(0, d=np.int32), amin=z(0), amax=z(0),
               bmin=z(0), bmax=z(0))


def _extent(ptype, geom):
  """Bounding box (amin, amax, bmin, bmax) of each primitive in the street frame."""
  seg = ptype == SEG
  rad = np.where(seg, 0.0, np.where(ptype == CYL, geom[:, 2], geom[:, 2] + geom[:, 3]))
  amin = np.where(seg, np.minimum(geom[:, 0], geom[:, 2]), geom[:, 0] - rad)
  amax = np.where(seg, np.maximum(geom[:, 0], geom[:, 2]), geom[:, 0] + rad)
  bmin = np.where(seg, np.minimum(geom[:, 1], geom[:, 3]), geom[:, 1] - rad)
  bmax = np.where(seg, np.maximum(geom[:, 1], geom[:, 3]), geom[:, 1] + rad)
  return amin, amax, bmin, bmax


@dataclasses.dataclass
class Street:
  """One straight street: frame, ground plan lookups and primitives."""
  origin: np.ndarray          # (east, north) of a=0,b=0, metres from the district origin
  angle: float                # direction of +a, radians counter-clockwise from east
  road_half: float
  facade: float               # |b| of the facade line (outer sidewalk edge)
  a_lo: float                 # first cell of the ground lookups
  res: float                  # lookup resolution (m)
  cross: np.ndarray           # bool [M] cross street (road beyond the kerb)
  zebra: np.ndarray           # bool [M] zebra crossing on the road
  verge: np.ndarray           # bool [2, M] terrain strip in the sidewalk (0 right, 1 left)
  beyond: np.ndarray          # uint8 [2, M] ground behind the facade line: 0 pavement, 1 terrain
  parking: np.ndarray         # bool [2, M] parking allowed
  quiet: np.ndarray           # bool [M] repetitive runs: little traffic / few people
  prims: Prims                # static world
  traffic: dict               # condition -> Prims: that traverse's cars / people
  lamps: np.ndarray           # [L, 3] lamp heads (a, b, z)
  sun: np.ndarray             # (2,) horizontal sun direction in the street frame
  blocks: list                # (a0, a1, kind, period)
  crowd: float = 1.0


@dataclasses.dataclass(frozen=True)
class Pose:
  """Camera pose in a street frame: a (along), b (left), yaw (rad, + = left)."""
  street: int
  a: float
  b: float
  yaw: float = 0.0
  height: float = CAMERA_HEIGHT


@dataclasses.dataclass
class World:
  """A district: streets, the database poses along them and their regimes."""
  seed: int
  split: str
  origin: tuple               # UTM (east, north) of the district
  streets: list
  poses: list                 # database Pose per place
  place_regime: np.ndarray    # str per place: "structure" | "repetitive" | "mixed"
  place_block: np.ndarray     # int [N, 2] (street, block index) per place

  @property
  def num_places(self) -> int:
    return len(self.poses)

  def utm(self, pose: Pose) -> tuple:
    """UTM (east, north, compass heading in degrees) of a pose."""
    st = self.streets[pose.street]
    c, s = math.cos(st.angle), math.sin(st.angle)
    east = self.origin[0] + st.origin[0] + pose.a * c - pose.b * s
    north = self.origin[1] + st.origin[1] + pose.a * s + pose.b * c
    heading = (90.0 - math.degrees(st.angle + pose.yaw)) % 360.0
    return east, north, heading


# ----------------------------------------------------------------------------
# Colours
# ----------------------------------------------------------------------------

_NATURAL = np.array([
    (0.82, 0.76, 0.64), (0.88, 0.84, 0.74), (0.62, 0.33, 0.25), (0.55, 0.42, 0.32),
    (0.62, 0.62, 0.6), (0.9, 0.9, 0.86), (0.9, 0.82, 0.55), (0.6, 0.68, 0.75),
    (0.85, 0.6, 0.5), (0.6, 0.6, 0.45), (0.75, 0.55, 0.4), (0.45, 0.45, 0.47)])
_TRIM = np.array([(0.95, 0.95, 0.92), (0.85, 0.82, 0.75), (0.3, 0.3, 0.32),
                  (0.5, 0.35, 0.25), (0.7, 0.7, 0.72)])
_GREENS = np.array([(0.22, 0.42, 0.15), (0.28, 0.48, 0.2), (0.18, 0.36, 0.14),
                    (0.35, 0.5, 0.2), (0.25, 0.4, 0.25)])
_CAR_COLOURS = np.array([(0.85, 0.85, 0.85), (0.1, 0.1, 0.12), (0.55, 0.56, 0.6),
                         (0.7, 0.1, 0.1), (0.1, 0.2, 0.55), (0.9, 0.9, 0.92),
                         (0.3, 0.32, 0.3), (0.75, 0.6, 0.2), (0.2, 0.4, 0.3)])
_SIGN_COLOURS = np.array([(0.1, 0.25, 0.7), (0.8, 0.1, 0.1), (0.95, 0.8, 0.1),
                          (0.95, 0.95, 0.95), (0.1, 0.5, 0.2)])
_CLOTHES = np.array([(0.1, 0.1, 0.12), (0.2, 0.25, 0.5), (0.6, 0.1, 0.1),
                     (0.85, 0.85, 0.82), (0.3, 0.45, 0.3), (0.75, 0.6, 0.3),
                     (0.4, 0.3, 0.25), (0.5, 0.5, 0.55)])
_SKIN = np.array([(0.87, 0.7, 0.58), (0.7, 0.5, 0.38), (0.45, 0.3, 0.22),
                  (0.95, 0.8, 0.7)])


def _hsv(h, s, v):
  i = int(h * 6.0) % 6
  f = h * 6.0 - math.floor(h * 6.0)
  p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
  return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def _jit(rng, c, amount=0.05):
  return tuple(np.clip(np.asarray(c) + rng.uniform(-amount, amount, 3), 0.02, 0.98))


def _pick(rng, table, amount=0.04):
  return _jit(rng, table[rng.integers(len(table))], amount)


# ----------------------------------------------------------------------------
# World generation
# ----------------------------------------------------------------------------

class _StreetPlan:
  """Mutable state while one street is generated."""

  def __init__(self, rng, road_half, facade, a_lo, a_hi, bid_start):
    self.rng = rng
    self.rh = road_half
    self.fo = facade
    self.a_lo = a_lo
    self.a_hi = a_hi
    self.res = 0.25
    m = int(math.ceil((a_hi + 60.0 - a_lo) / self.res)) + 1
    self.m = m
    self.cross = np.zeros(m, bool)
    self.zebra = np.zeros(m, bool)
    self.verge = np.zeros((2, m), bool)
    self.beyond = np.zeros((2, m), np.uint8)
    self.parking = np.zeros((2, m), bool)
    self.quiet = np.zeros(m, bool)
    self.b = _Builder()
    self.lamps = []
    self.blocks = []
    self.bid = bid_start

  def cells(self, a0, a1):
    i0 = int(np.clip(math.floor((a0 - self.a_lo) / self.res), 0, self.m))
    i1 = int(np.clip(math.ceil((a1 - self.a_lo) / self.res), 0, self.m))
    return slice(i0, i1)

  def new_bid(self):
    self.bid += 1
    return self.bid - 1

  # -- objects ---------------------------------------------------------------
  def building(self, side, a0, a1, height, setback, col, col2, params, prev,
               depth=14.0, line=None):
    """A facade [a0, a1] on `side` (+1 left / -1 right); returns its record."""
    rng = self.rng
    bline = (self.fo if line is None else line) + setback
    bid = self.new_bid()
    seed = int(rng.integers(1 << 31))
    fh, bay_target, wwf, whf, gft, roof = params
    width = a1 - a0
    nbays = max(1, int(round(width / bay_target)))
    tex = (width / nbays, fh, wwf, whf, gft, int(rng.integers(nbays)), height, roof)
    self.b.seg((a0, side * bline), (a1, side * bline), 0.0, height, BUILDING, K_FACADE,
               col=col, col2=col2, tex=tex, seed=seed, bid=bid)
    need_side = (prev is None or prev[0] < height - 0.01 or prev[1] > setback + 0.01)
    if need_side:
      sd = (depth / max(1, round(depth / bay_target)), fh, wwf, whf, 2, -1, height, 0.0)
      self.b.seg((a0, side * bline), (a0, side * (bline + depth)), 0.0, height,
                 BUILDING, K_FACADE, col=col, col2=col2, tex=sd, seed=seed + 1, bid=bid)
    return (height + roof, setback)

  def tree(self, a, side, crown_r=None, height=None, trunk_r=None, pit=True):
    rng = self.rng
    b = side * (self.rh + 1.1)
    r = rng.uniform(1.6, 2.8) if crown_r is None else crown_r
    top = rng.uniform(6.0, 10.0) if height is None else height
    bottom = max(2.2, top - 2.2 * r)
    seed = int(rng.integers(1 << 31))
    trunk_r = rng.uniform(0.14, 0.24) if trunk_r is None else trunk_r
    self.b.cyl(a, b, trunk_r, 0.0, bottom + 0.6, VEGETATION, K_TRUNK,
               col=_jit(rng, (0.33, 0.24, 0.16), 0.04), seed=seed)
    self.b.cyl(a, b, r, bottom, top, VEGETATION, K_CROWN, col=_pick(self.rng, _GREENS),
               seed=seed + 1)
    if pit:
      self.verge[(0 if side < 0 else 1), self.cells(a - 0.7, a + 0.7)] = True

  def lamp(self, a, side, height=None):
    rng = self.rng
    h = rng.uniform(5.0, 7.5) if height is None else height
    b = side * (self.rh + 0.35)
    col = _jit(rng, (0.35, 0.37, 0.4), 0.05)
    self.b.cyl(a, b, 0.09, 0.0, h, POLE, K_POLE, col=col)
    self.b.cyl(a, b - side * 0.4, 0.32, h - 0.3, h + 0.05, POLE, K_LAMP, col=col)
    self.lamps.append((a, b - side * 0.4, h - 0.3))

  def sign(self, a, side):
    rng = self.rng
    b = side * (self.rh + 0.4)
    self.b.cyl(a, b, 0.05, 0.0, 2.1, POLE, K_POLE, col=(0.55, 0.56, 0.58))
    c = _SIGN_COLOURS[rng.integers(len(_SIGN_COLOURS))]
    self.b.cyl(a, b, rng.uniform(0.3, 0.45), 2.1, 2.1 + rng.uniform(0.5, 0.8),
               TRAFFIC_SIGN, K_SIGN, col=tuple(c), col2=(0.95, 0.95, 0.95),
               seed=int(rng.integers(1 << 31)))

  def traffic_light(self, a, side):
    rng = self.rng
    b = side * (self.rh + 0.5)
    self.b.cyl(a, b, 0.08, 0.0, 3.3, POLE, K_POLE, col=(0.2, 0.22, 0.22))
    self.b.cyl(a, b, 0.2, 3.3, 4.3, TRAFFIC_LIGHT, K_TLIGHT, col=(0.08, 0.08, 0.08),
               seed=int(rng.integers(1 << 31)))

  def filler(self, side, a0, a1, what):
    rng = self.rng
    p0, p1 = (a0, side * self.fo), (a1, side * self.fo)
    if what == "wall":
      self.b.seg(p0, p1, 0.0, rng.uniform(1.8, 3.0), WALL, K_WALL,
                 col=_jit(rng, (0.62, 0.6, 0.56), 0.06), seed=int(rng.integers(1 << 31)))
    elif what == "fence":
      self.b.seg(p0, p1, 0.0, rng.uniform(1.3, 2.0), FENCE, K_FENCE,
                 col=_jit(rng, (0.3, 0.3, 0.3), 0.08), seed=int(rng.integers(1 << 31)))
    elif what == "hedge":
      self.b.seg(p0, p1, 0.0, rng.uniform(0.9, 1.6), VEGETATION, K_HEDGE,
                 col=_pick(rng, _GREENS), seed=int(rng.integers(1 << 31)))

  def tower(self, side, a0, a1, dist, height, col, col2):
    rng = self.rng
    fh = rng.uniform(3.2, 3.8)
    params = (fh, rng.uniform(2.0, 3.2), rng.uniform(0.5, 0.8), rng.uniform(0.5, 0.75),
              2, 0.0)
    self.building(side, a0, a1, height, 0.0, col, col2, params, None, depth=20.0,
                  line=self.fo + dist)

  # -- blocks ----------------------------------------------------------------
  def facade_params(self, shop_p=0.4):
    rng = self.rng
    fh = rng.uniform(3.0, 3.6)
    gft = 1 if rng.random() < shop_p else (0 if rng.random() < 0.7 else 2)
    roof = 0.0
    return (fh, rng.uniform(2.6, 4.0), rng.uniform(0.35, 0.6), rng.uniform(0.4, 0.6), gft, roof)

  def block(self, a0, a1, kind, period=0.0):
    if kind == "repetitive":
      self._repetitive(a0, a1, period)
    else:
      for side in (-1, 1):
        self._varied(side, a0, a1, kind)
      for side in (-1, 1):
        self.parking[(0 if side < 0 else 1), self.cells(a0 + 2, a1 - 2)] = True

  def _varied(self, side, a0, a1, kind):
    rng = self.rng
    structure = kind == "structure"
    si = 0 if side < 0 else 1
    x = a0
    prev = None
    gap_p = 0.28 if structure else 0.12
    while x < a1 - 3.0:
      if prev is not None and rng.random() < gap_p:
        gw = min(rng.uniform(3.0, 9.0), a1 - x)
        what = rng.choice(["wall", "fence", "hedge", "none"], p=[0.35, 0.3, 0.25, 0.1])
        self.filler(side, x, x + gw, what)
        self.beyond[si, self.cells(x, x + gw)] = 1 if rng.random() < 0.5 else 0
        prev = None
        x += gw
        continue
      w = rng.uniform(6.0, 24.0) if structure else rng.uniform(8.0, 20.0)
      if a1 - (x + w) < 5.0:
        w = a1 - x
      if structure:
        floors = int(rng.choice([1, 2, 3, 4, 5, 6, 8, 10, 12, 14],
                                p=[.08, .12, .14, .14, .12, .12, .1, .08, .06, .04]))
        col = _jit(rng, np.array((1.0, 0.97, 0.92)) * rng.uniform(0.45, 0.8), 0.03)
        col2 = _jit(rng, np.array((0.9, 0.9, 0.88)) * rng.uniform(0.5, 1.0), 0.02)
      else:
        floors = int(rng.integers(3, 8))
        col = _pick(rng, _NATURAL)
        col2 = _pick(rng, _TRIM)
      fh, bay, wwf, whf, gft, _ = self.facade_params(shop_p=0.45 if floors > 1 else 0.8)
      height = floors * fh + rng.uniform(0.5, 1.2)
      roof = rng.uniform(2.0, 5.0) if rng.random() < (0.3 if structure else 0.12) else 0.0
      setback = 0.0 if rng.random() < (0.6 if structure else 0.8) else rng.uniform(1.5, 4.0)
      prev = self.building(side, x, x + w, height, setback, col, col2,
                           (fh, bay, wwf, whf, gft, roof), prev)
      if setback > 0:
        self.beyond[si, self.cells(x, x + w)] = 1 if rng.random() < 0.6 else 0
      x += w
    # back row: the skyline
    x = a0 + rng.uniform(-5, 10)
    while x < a1:
      w = rng.uniform(10.0, 25.0) if structure else rng.uniform(15.0, 30.0)
      if rng.random() < (0.75 if structure else 0.4):
        h = rng.uniform(25.0, 80.0) if structure else rng.uniform(20.0, 42.0)
        col = (_jit(rng, np.array((0.8, 0.8, 0.8)) * rng.uniform(0.6, 1.0), 0.03) if structure
               else _pick(rng, _NATURAL))
        self.tower(side, x, x + w, rng.uniform(16.0, 32.0), h, col, _pick(rng, _TRIM))
      x += w + rng.uniform(2.0, 25.0)
    # trees
    if structure:
      for _ in range(rng.poisson(max(1.0, (a1 - a0) / 40.0))):
        c = rng.uniform(a0 + 3, a1 - 3)
        for k in range(int(rng.integers(2, 6))):
          self.tree(c + k * rng.uniform(4.0, 6.5), side)
    elif rng.random() < 0.55:
      x = a0 + rng.uniform(2, 6)
      while x < a1 - 1:
        self.tree(x, side)
        x += rng.uniform(7.0, 12.0)
    elif rng.random() < 0.5:
      self.verge[si, self.cells(a0 + 1, a1 - 1)] = True
    # lamps and signs
    x = a0 + rng.uniform(2, 12)
    while x < a1 - 1:
      self.lamp(x + 0.5, side)
      x += rng.uniform(10.0, 40.0) if structure else rng.uniform(22.0, 32.0)
    for _ in range(rng.poisson((a1 - a0) / (35.0 if structure else 70.0))):
      self.sign(rng.uniform(a0 + 1, a1 - 1) + 0.3, side)

  def _repetitive(self, a0, a1, period):
    rng = self.rng
    floors = int(rng.integers(4, 7))
    fh = rng.uniform(3.0, 3.4)
    nb = int(round(period / 3.33))
    params = (fh, period / nb, rng.uniform(0.4, 0.55), rng.uniform(0.45, 0.6), 1, 0.0)
    height = floors * fh + 0.8
    trees = rng.random() < 0.7
    lamps = rng.random() < 0.6
    tree_r = rng.uniform(1.8, 2.4)
    tree_h = rng.uniform(7.0, 9.0)
    lamp_h = rng.uniform(5.5, 7.0)
    n = int((a1 - a0) // period)
    crowns = _pick(rng, _GREENS)
    for side in (-1, 1):
      prev = None
      for k in range(n):
        x = a0 + k * period
        hue = rng.random()
        col = _hsv(hue, rng.uniform(0.45, 0.8), rng.uniform(0.6, 0.92))
        col2 = _hsv((hue + rng.uniform(0.25, 0.75)) % 1.0, rng.uniform(0.6, 0.95),
                    rng.uniform(0.55, 0.95))
        prev = self.building(side, x, x + period, height, 0.0, col, col2, params, prev)
        if trees:
          self.tree(x + 0.5 * period, side, crown_r=tree_r, height=tree_h, trunk_r=0.2)
          self.b.rows[-1] = self.b.rows[-1][:6] + (crowns, crowns) + self.b.rows[-1][8:]
        if lamps:
          self.lamp(x + 0.5 * period + 3.0, side, height=lamp_h)
    self.parking[:, self.cells(a0, a1)] = False
    self.quiet[self.cells(a0 - 10.0, a1 + 10.0)] = True

  def cross_street(self, g0, g1):
    rng = self.rng
    self.cross[self.cells(g0, g1)] = True
    self.zebra[self.cells(g0 - 4.5, g0 - 1.5)] = True
    for side in (-1, 1):
      if rng.random() < 0.7:
        self.traffic_light(g0 - 1.0, side)
      elif rng.random() < 0.6:
        self.sign(g0 - 1.0, side)
      # facades along the cross street, seen through the gap
      for edge in (g0, g1):
        h = rng.uniform(10.0, 30.0)
        params = self.facade_params()
        bid = self.new_bid()
        col = _pick(rng, _NATURAL)
        self.b.seg((edge, side * (self.fo + 14.0)), (edge, side * (self.fo + 70.0)), 0.0, h,
                   BUILDING, K_FACADE, col=col, col2=_pick(rng, _TRIM),
                   tex=(params[1], params[0], params[2], params[3], 2, -1, h, 0.0),
                   seed=int(rng.integers(1 << 31)), bid=bid)
      # far end of the cross street
      h = rng.uniform(12.0, 35.0)
      bid = self.new_bid()
      self.b.seg((g0 - 10.0, side * (self.fo + 75.0)), (g1 + 10.0, side * (self.fo + 75.0)),
                 0.0, h, BUILDING, K_FACADE, col=_pick(rng, _NATURAL), col2=_pick(rng, _TRIM),
                 tex=(3.0, 3.3, 0.5, 0.5, 2, -1, h, 0.0), seed=int(rng.integers(1 << 31)),
                 bid=bid)


def _colours(rng, table, n, amount=0.04):
  c = table[rng.integers(len(table), size=n)] + rng.uniform(-amount, amount, (n, 3))
  return np.clip(c, 0.02, 0.98)


def _populate(st: Street, lo: float, hi: float, rng, moving: bool = True) -> Prims:
  """Cars (parked where allowed, a few oncoming), people and cyclists in [lo, hi]."""
  rh, fo = st.road_half, st.facade
  ncell = len(st.cross)
  cars_a, cars_b, cars_len, cars_big, cars_ang = [], [], [], [], []
  nslots = int((hi - lo) / 5.0) + 3
  for side in (-1, 1):
    si = 0 if side < 0 else 1
    big = rng.random(nslots) < 0.05
    length = np.where(big, rng.uniform(7.0, 11.0, nslots), rng.uniform(3.9, 4.8, nslots))
    gap = rng.uniform(0.8, 5.0, nslots)
    x0 = lo + rng.uniform(0.0, 6.0) + np.concatenate([[0.0], np.cumsum(length + gap)[:-1]])
    occupied = rng.random(nslots) < 0.6
    ok = occupied & (x0 < hi)
    for frac in (0.0, 0.5, 1.0):
      cell = np.clip(((x0 + frac * length - st.a_lo) / st.res).astype(np.intp), 0, ncell - 1)
      ok &= st.parking[si, cell]
    cars_a.append((x0 + 0.5 * length)[ok])
    cars_b.append(np.full(ok.sum(), side * (rh - 1.15)))
    cars_len.append(length[ok])
    cars_big.append(big[ok])
    cars_ang.append(rng.uniform(-0.03, 0.03, ok.sum()))
  def busy(a, p_quiet=0.0):  # no vehicles, few people in the quiet (repetitive) runs
    cell = np.clip(((a - st.a_lo) / st.res).astype(np.intp), 0, ncell - 1)
    return ~st.quiet[cell] | (rng.random(len(a)) < p_quiet)

  if moving:  # oncoming traffic in the left lane
    n = rng.poisson((hi - lo) / 70.0)
    oa_ = rng.uniform(lo, hi, n)
    keep = busy(oa_)
    n = int(keep.sum())
    cars_a.append(oa_[keep])
    cars_b.append(np.full(n, rh * 0.45))
    cars_len.append(rng.uniform(3.9, 4.8, n))
    cars_big.append(rng.random(n) < 0.08)
    cars_ang.append(math.pi + rng.uniform(-0.02, 0.02, n))
  a, b, length, big, ang = (np.concatenate(x) for x in
                            (cars_a, cars_b, cars_len, cars_big, cars_ang))
  acc = {k: [] for k in ("typ", "geom", "zb", "zt", "cls", "kind", "col", "col2", "tex", "seed")}

  def add(typ, geom, zb, zt, cls, kind, col, col2, seed, tex=0.0):
    n = len(geom)
    g = np.zeros((n, 6))
    g[:, :geom.shape[1]] = geom
    for key, v, dt in (("typ", typ, np.int8), ("zb", zb, np.float64), ("zt", zt, np.float64),
                       ("cls", cls, np.uint8), ("kind", kind, np.int8),
                       ("tex", tex, np.float32), ("seed", seed, np.uint32)):
      acc[key].append(np.broadcast_to(np.asarray(v).astype(dt), (n,)))
    acc["geom"].append(g)
    acc["col"].append(np.broadcast_to(np.asarray(col, np.float32), (n, 3)))
    acc["col2"].append(np.broadcast_to(np.asarray(col2, np.float32), (n, 3)))

  # small cars: body + cabin
  m = ~big
  n = int(m.sum())
  if n:
    ca, sa = np.cos(ang[m]), np.sin(ang[m])
    hw = rng.uniform(0.85, 0.95, n)
    body = rng.uniform(0.9, 1.05, n)
    col = _colours(rng, _CAR_COLOURS, n, 0.03)
    seed = rng.integers(1 << 31, size=n)
    hl = 0.5 * length[m]
    add(BOX, np.stack([a[m], b[m], hl, hw, ca, sa], 1), 0.0, body, CAR, K_CAR, col, col, seed)
    off = -0.24 * hl
    add(BOX, np.stack([a[m] + off * ca, b[m] + off * sa, 0.54 * hl, hw - 0.08, ca, sa], 1),
        body - 0.02, body + rng.uniform(0.42, 0.55, n), CAR, K_CABIN, col, col, seed + 1)
  m = big
  n = int(m.sum())
  if n:
    bus = rng.random(n) < 0.5
    col = np.where(bus[:, None], _colours(rng, np.array([(0.85, 0.75, 0.2)]), n, 0.1),
                   _colours(rng, _CAR_COLOURS, n))
    add(BOX, np.stack([a[m], b[m], 0.5 * length[m], np.full(n, 1.2), np.cos(ang[m]),
                       np.sin(ang[m])], 1), 0.0, rng.uniform(2.9, 3.3, n),
        np.where(bus, BUS, TRUCK), K_BIG, col, _colours(rng, _TRIM, n),
        rng.integers(1 << 31, size=n), tex=bus)
  # people on the sidewalks
  pa = rng.uniform(lo, hi, rng.poisson(st.crowd * (hi - lo) / 16.0))
  pa = pa[busy(pa, 0.15)]
  n = len(pa)
  if n:
    side = np.where(rng.random(n) < 0.5, 1.0, -1.0)
    pb = side * rng.uniform(rh + 0.6, fo - 0.4, n)
    h = rng.uniform(1.55, 1.9, n)
    seed = rng.integers(1 << 31, size=n)
    add(CYL, np.stack([pa, pb, rng.uniform(0.2, 0.26, n)], 1), 0.0, h - 0.24, PERSON, K_BODY,
        _colours(rng, _CLOTHES, n), _colours(rng, _CLOTHES, n), seed)
    hair = np.where((rng.random(n) < 0.8)[:, None], (0.1, 0.08, 0.06), (0.6, 0.5, 0.3))
    add(CYL, np.stack([pa, pb, np.full(n, 0.12)], 1), h - 0.3, h, PERSON, K_HEAD,
        _colours(rng, _SKIN, n, 0.02), hair, seed + 1)
  # cyclists near the kerb
  ca = rng.uniform(lo, hi, rng.poisson((hi - lo) / 120.0))
  ca = ca[busy(ca)]
  n = len(ca)
  if n:
    side = np.where(rng.random(n) < 0.5, 1.0, -1.0)
    cb = np.where(side > 0, rh - 0.6, -(rh - 2.6))
    seed = rng.integers(1 << 31, size=n)
    add(BOX, np.stack([ca, cb, np.full(n, 0.85), np.full(n, 0.2), np.ones(n), np.zeros(n)], 1),
        0.0, 1.0, BICYCLE, K_BIKE, (0.12, 0.12, 0.14), (0.12, 0.12, 0.14), seed)
    add(CYL, np.stack([ca - 0.15, cb, np.full(n, 0.22)], 1), 0.75, 1.55, RIDER, K_BODY,
        _colours(rng, _CLOTHES, n), _colours(rng, _CLOTHES, n), seed + 1, tex=1.0)
    add(CYL, np.stack([ca - 0.15, cb, np.full(n, 0.12)], 1), 1.5, 1.78, RIDER, K_HEAD,
        _colours(rng, _SKIN, n, 0.02), (0.15, 0.15, 0.15), seed + 2)
  if not acc["zb"]:
    return _empty_prims()
  cat = {k: np.concatenate(v) for k, v in acc.items()}
  tex = np.zeros((len(cat["zb"]), 8), np.float32)
  tex[:, 0] = cat["tex"]
  amin, amax, bmin, bmax = _extent(cat["typ"], cat["geom"])
  return Prims(ptype=cat["typ"], geom=cat["geom"], zb=cat["zb"], zt=cat["zt"], cls=cat["cls"],
               kind=cat["kind"], col=cat["col"], col2=cat["col2"], rcol=cat["col"],
               rcol2=cat["col2"], tex=tex, seed=cat["seed"],
               bid=np.full(len(tex), -1, np.int32), amin=amin, amax=amax, bmin=bmin, bmax=bmax)


def _split_rng(seed: int, split: str, *extra) -> np.random.Generator:
  if split not in SPLIT_INDEX:
    raise ValueError(f"split must be one of {tuple(SPLIT_INDEX)}, got {split!r}")
  return np.random.default_rng([int(seed), SPLIT_INDEX[split], 0x5EC7, *extra])


def _street_lengths(rng, num_places):
  out = []
  left = num_places
  while left > 0:
    n = int(rng.integers(24, 49))
    if left - n < 12:
      n = left if left <= 60 else left // 2
    n = min(n, left)
    out.append(n)
    left -= n
  return out


def _make_street(rng, n_places, bid_start, grid_index, coverage) -> tuple:
  rh = rng.uniform(5.5, 7.0)
  fo = rh + rng.uniform(3.5, 5.5)
  a_first = 10.0
  a_last = a_first + PLACE_SPACING * (n_places - 1)
  a_lo, a_hi = -25.0, a_last + VIEW_DISTANCE + 10.0
  plan = _StreetPlan(rng, rh, fo, a_lo, a_hi, bid_start)
  a = a_lo
  while True:
    # balance the regimes over the district's places (metres of places covered)
    kind = REGIMES[int(np.argmin([coverage[k] + rng.uniform(0.0, 30.0) for k in REGIMES]))]
    if kind == "repetitive":
      period = float(rng.choice([10.0, 15.0]))
      length = period * int(rng.uniform(140.0, 210.0) // period)
    else:
      period = 0.0
      length = rng.uniform(60.0, 130.0)
    a1 = a + length
    if kind == "repetitive" and a1 > a_hi + 5.0:
      a1 = a + period * math.ceil((a_hi + 5.0 - a) / period)
    elif a1 > a_hi - 20.0 and kind != "repetitive":
      a1 = max(a1, a_hi + 5.0)
    coverage[kind] += max(0.0, min(a1 - 20.0, a_last) - max(a - 20.0, a_first))
    plan.block(a, a1, kind, period)
    plan.blocks.append((a, a1, kind, period))
    if a1 >= a_hi:
      break
    gap = rng.uniform(12.0, 18.0)
    plan.cross_street(a1, a1 + gap)
    a = a1 + gap
  # the street ends at a building across the street
  end = plan.blocks[-1][1] + 4.0
  h = rng.uniform(16.0, 35.0)
  plan.b.seg((end, -fo - 30.0), (end, fo + 30.0), 0.0, h, BUILDING, K_FACADE,
             col=_pick(rng, _NATURAL), col2=_pick(rng, _TRIM),
             tex=(3.2, 3.3, 0.5, 0.5, 1, 3, h, 0.0), seed=int(rng.integers(1 << 31)),
             bid=plan.new_bid())
  length = end - a_lo
  angle = rng.uniform(0.0, 2.0 * math.pi)
  centre = np.array([(grid_index % 4) * _STREET_GRID, (grid_index // 4) * _STREET_GRID])
  centre = centre + rng.uniform(-40.0, 40.0, 2)
  e = np.array([math.cos(angle), math.sin(angle)])
  origin = centre - (a_lo + 0.5 * length) * e
  sun_angle = rng.uniform(0, 2 * math.pi)
  st = Street(origin=origin, angle=angle, road_half=rh, facade=fo, a_lo=a_lo, res=plan.res,
              cross=plan.cross, zebra=plan.zebra, verge=plan.verge, beyond=plan.beyond,
              parking=plan.parking, quiet=plan.quiet, prims=plan.b.build(), traffic={},
              lamps=np.array(plan.lamps, np.float64).reshape(-1, 3),
              sun=np.array([math.cos(sun_angle), math.sin(sun_angle)]), blocks=plan.blocks,
              crowd=rng.uniform(0.5, 1.5))
  # every traverse (condition) has its own parked cars / people / cyclists
  for cond in CONDITIONS:
    st.traffic[cond] = _populate(st, a_lo, end, np.random.default_rng(rng.integers(1 << 62)))
  places = [a_first + PLACE_SPACING * i for i in range(n_places)]
  return st, places, plan.bid


def _regime_at(st: Street, a: float) -> tuple:
  look = a + 20.0
  for i, (a0, a1, kind, _) in enumerate(st.blocks):
    if look < a1:
      return kind, i
  return st.blocks[-1][2], len(st.blocks) - 1


def make_world(seed: int, split: str, num_places: int) -> World:
  """A district of streets for `split` with `num_places` database places.

  Deterministic in (seed, split, num_places); splits use different random
  streams and UTM offsets (disjoint districts). Consecutive places on a street
  are `PLACE_SPACING` (5 m) apart; streets are >= 180 m apart.
  """
  if num_places < 1:
    raise ValueError(f"num_places must be >= 1, got {num_places}")
  rng = _split_rng(seed, split)
  streets, poses, regimes, blocks = [], [], [], []
  bid = 0
  coverage = {k: 0.0 for k in REGIMES}
  for j, n in enumerate(_street_lengths(rng, num_places)):
    st, places, bid = _make_street(rng, n, bid, j, coverage)
    streets.append(st)
    for a in places:
      poses.append(Pose(street=j, a=a, b=-0.35 * st.road_half))
      kind, bi = _regime_at(st, a)
      regimes.append(kind)
      blocks.append((j, bi))
  # repaint: every building takes the colours of another building of the district
  _assign_repaint(streets, bid, rng)
  return World(seed=int(seed), split=split, origin=UTM_ORIGIN[split], streets=streets,
               poses=poses, place_regime=np.array(regimes), place_block=np.array(blocks))


def _assign_repaint(streets, num_buildings, rng):
  if num_buildings < 2:
    return
  col = np.zeros((num_buildings, 3), np.float32)
  col2 = np.zeros((num_buildings, 3), np.float32)
  for st in streets:
    p = st.prims
    m = p.bid >= 0
    col[p.bid[m]] = p.col[m]
    col2[p.bid[m]] = p.col2[m]
  perm = rng.permutation(num_buildings)
  fixed = np.nonzero(perm == np.arange(num_buildings))[0]
  for i in fixed:  # no building keeps its own colours
    j = (i + 1) % num_buildings
    perm[i], perm[j] = perm[j], perm[i]
  for st in streets:
    p = st.prims
    m = p.bid >= 0
    p.rcol[m] = col[perm[p.bid[m]]]
    p.rcol2[m] = col2[perm[p.bid[m]]]


def make_scene(segments=(), cylinders=(), boxes=(), road_half_width=6.0,
               sidewalk_width=4.0) -> World:
  """A hand-placed single-street world (for tests / debugging).

  The street frame is the world frame (a = east, b = north); camera poses are
  `Pose(0, a, b, yaw, height)`. Items are dicts:
    segments: p0=(a,b), p1=(a,b), top, bottom=0, cls=BUILDING
    cylinders: center=(a,b), radius, top, bottom=0, cls=POLE
    boxes: center=(a,b), half=(len,wid), top, bottom=0, angle=0, cls=CAR
  Cylinders are flat-topped. Nothing else (no cars, people) is in the scene.
  """
  b = _Builder()
  seg_kind = {BUILDING: K_FACADE, WALL: K_WALL, FENCE: K_FENCE, VEGETATION: K_HEDGE}
  cyl_kind = {POLE: K_POLE, VEGETATION: K_TRUNK, TRAFFIC_SIGN: K_SIGN,
              TRAFFIC_LIGHT: K_TLIGHT, PERSON: K_BODY, RIDER: K_BODY}
  for i, s in enumerate(segments):
    cls = s.get("cls", BUILDING)
    h = s["top"]
    b.seg(s["p0"], s["p1"], s.get("bottom", 0.0), h, cls, seg_kind.get(cls, K_WALL),
          col=s.get("col", (0.8, 0.7, 0.6)), col2=(0.9, 0.9, 0.9),
          tex=(3.0, 3.2, 0.5, 0.5, 0, 0, h, 0.0), seed=i, bid=i if cls == BUILDING else -1)
  for c in cylinders:
    cls = c.get("cls", POLE)
    b.cyl(c["center"][0], c["center"][1], c["radius"], c.get("bottom", 0.0), c["top"],
          cls, cyl_kind.get(cls, K_POLE), col=c.get("col", (0.4, 0.4, 0.4)))
  for x in boxes:
    b.box(x["center"][0], x["center"][1], x["half"][0], x["half"][1], x.get("angle", 0.0),
          x.get("bottom", 0.0), x["top"], x.get("cls", CAR), K_CAR,
          col=x.get("col", (0.7, 0.1, 0.1)))
  prims = b.build()
  m = 4096
  res = 0.25
  a_lo = -500.0
  st = Street(origin=np.zeros(2), angle=0.0, road_half=road_half_width,
              facade=road_half_width + sidewalk_width, a_lo=a_lo, res=res,
              cross=np.zeros(m, bool), zebra=np.zeros(m, bool),
              verge=np.zeros((2, m), bool), beyond=np.zeros((2, m), np.uint8),
              parking=np.zeros((2, m), bool), quiet=np.zeros(m, bool), prims=prims,
              traffic={c: _empty_prims() for c in CONDITIONS},
              lamps=np.zeros((0, 3)), sun=np.array([0.6, 0.8]),
              blocks=[(a_lo, -a_lo, "mixed", 0.0)], crowd=0.0)
  return World(seed=0, split="test", origin=(0.0, 0.0), streets=[st],
               poses=[Pose(0, 0.0, 0.0)], place_regime=np.array(["mixed"]),
               place_block=np.zeros((1, 2), int))


def query_pose(world: World, place: int, rng) -> Pose:
  """A jittered query pose near database place `place` (<= 2.2 m away)."""
  p = world.poses[place]
  return Pose(street=p.street, a=p.a + rng.uniform(-2.0, 2.0), b=p.b + rng.uniform(-0.7, 0.7),
              yaw=p.yaw + rng.uniform(-0.12, 0.12),
              height=p.height + rng.uniform(-0.15, 0.15))


# ----------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------

_LIGHT = {
    # ambient, sun, sky top, sky horizon, lit-window prob, emission gain, lamp gain
    "day": dict(amb=(0.5, 0.52, 0.56), sun=(0.6, 0.57, 0.5), sky_top=(0.32, 0.52, 0.85),
                sky_hor=(0.72, 0.82, 0.93), lit=0.0, emit=0.0, lamps=0.0, noise=2),
    "dusk": dict(amb=(0.27, 0.22, 0.25), sun=(0.42, 0.24, 0.12), sky_top=(0.2, 0.17, 0.38),
                 sky_hor=(0.95, 0.55, 0.3), lit=0.2, emit=0.55, lamps=0.35, noise=3),
    "night": dict(amb=(0.04, 0.045, 0.07), sun=(0.0, 0.0, 0.0), sky_top=(0.01, 0.012, 0.03),
                  sky_hor=(0.09, 0.08, 0.11), lit=0.35, emit=1.0, lamps=1.6, noise=5),
    "fog": dict(amb=(0.62, 0.62, 0.63), sun=(0.12, 0.12, 0.12), sky_top=(0.78, 0.79, 0.8),
                sky_hor=(0.8, 0.81, 0.82), lit=0.0, emit=0.0, lamps=0.0, noise=2),
}
_LIGHT["repaint"] = _LIGHT["day"]
_WARM = np.array([1.0, 0.8, 0.45], np.float32)


def _hash(seed, *ints):
  """Deterministic hash of integer(-valued) arrays -> float32 in [0, 1)."""
  with np.errstate(over="ignore"):
    h = np.asarray(seed).astype(np.uint32) ^ np.uint32(2166136261)
    for v in ints:
      v = np.asarray(v)
      v = v.astype(np.int32).view(np.uint32) if v.dtype.kind == "f" else v.astype(np.uint32)
      h = (h ^ v) * np.uint32(16777619)
      h ^= h >> np.uint32(13)
    h = h * np.uint32(0x5BD1E995)
    h ^= h >> np.uint32(15)
  return (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def _frac(x, period=1.0):
  """x mod period, divided by period, in [0, 1) (much faster than np.mod)."""
  q = x * (1.0 / period)
  return q - np.floor(q)


def _ray_depths(P: Prims, spans, oa, ob, dx, dy):
  """Depth t [K, W] of every primitive along every column ray (inf: miss).

  `P` is sorted by type; spans[type] = (start, stop)."""
  K, W = len(P), dx.shape[0]
  t = np.full((K, W), np.inf)
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    i0, i1 = spans[SEG]
    if i1 > i0:
      g = P.geom[i0:i1]
      x0, y0 = g[:, 0:1], g[:, 1:2]
      ex, ey = g[:, 2:3] - x0, g[:, 3:4] - y0
      wx, wy = x0 - oa, y0 - ob
      inv = 1.0 / (dx * ey - dy * ex)
      tt = (wx * ey - wy * ex) * inv
      ss = (wx * dy - wy * dx) * inv
      t[i0:i1] = np.where((tt > _NEAR) & (ss >= 0.0) & (ss <= 1.0), tt, np.inf)
    i0, i1 = spans[CYL]
    if i1 > i0:
      g = P.geom[i0:i1]
      r = g[:, 2:3]
      ocx, ocy = oa - g[:, 0:1], ob - g[:, 1:2]
      A = dx * dx + dy * dy
      B = 2.0 * (dx * ocx + dy * ocy)
      disc = B * B - 4.0 * A * (ocx * ocx + ocy * ocy - r * r)
      tt = (-B - np.sqrt(disc)) / (2.0 * A)
      t[i0:i1] = np.where((disc >= 0.0) & (tt > _NEAR), tt, np.inf)
    i0, i1 = spans[BOX]
    if i1 > i0:
      g = P.geom[i0:i1]
      hl, hw, c, sn = g[:, 2:3], g[:, 3:4], g[:, 4:5], g[:, 5:6]
      rx, ry = oa - g[:, 0:1], ob - g[:, 1:2]
      lx = rx * c + ry * sn
      ly = ry * c - rx * sn
      ddx = dx * c + dy * sn
      ddy = dy * c - dx * sn
      ddx = np.where(np.abs(ddx) < 1e-9, 1e-9, ddx)
      ddy = np.where(np.abs(ddy) < 1e-9, 1e-9, ddy)
      t1, t2 = (-hl - lx) / ddx, (hl - lx) / ddx
      t3, t4 = (-hw - ly) / ddy, (hw - ly) / ddy
      ten = np.maximum(np.minimum(t1, t2), np.minimum(t3, t4))
      tex_ = np.minimum(np.maximum(t1, t2), np.maximum(t3, t4))
      t[i0:i1] = np.where((ten < tex_) & (ten > _NEAR), ten, np.inf)
  return t


def _hit_details(P: Prims, k, th, hx, hy, ddx, ddy, oa, ob, sun):
  """Texture coordinates (s, u), sun shading and z range of each hit.

  k: primitive index per hit; th: depth; (hx, hy): hit point; (ddx, ddy): ray.
  s: metres along a segment / along a box, u: -1..1 across a cylinder (right
  = +) or a box. Rounded cylinders (crowns, heads) get an ellipsoidal z range.
  """
  n = len(k)
  s = np.zeros(n)
  u = np.zeros(n)
  shade = np.zeros(n)
  zb = P.zb[k].copy()
  zt = P.zt[k].copy()
  typ = P.ptype[k]
  g = P.geom[k]
  m = typ == SEG
  if m.any():
    gm = g[m]
    ex, ey = gm[:, 2] - gm[:, 0], gm[:, 3] - gm[:, 1]
    length = np.hypot(ex, ey)
    sm = ((hx[m] - gm[:, 0]) * ex + (hy[m] - gm[:, 1]) * ey) / length
    s[m] = sm
    nx, ny = ey / length, -ex / length
    facing = np.where(nx * ddx[m] + ny * ddy[m] > 0, -1.0, 1.0)
    shade[m] = facing * (nx * sun[0] + ny * sun[1])
    roof = P.tex[k[m], 7]
    if np.any(roof > 0):
      zt[m] += roof * np.clip(1.0 - np.abs(2.0 * sm / length - 1.0), 0.0, 1.0)
  m = typ == CYL
  if m.any():
    gm = g[m]
    r = gm[:, 2]
    dxm, dym = ddx[m], ddy[m]
    um = np.clip((dym * (oa - gm[:, 0]) - dxm * (ob - gm[:, 1])) /
                 (np.sqrt(dxm * dxm + dym * dym) * r), -1.0, 1.0)
    u[m] = um
    s[m] = um
    shade[m] = ((hx[m] - gm[:, 0]) * sun[0] + (hy[m] - gm[:, 1]) * sun[1]) / r
    rnd = np.isin(P.kind[k[m]], _ROUNDED)
    if rnd.any():
      j = np.nonzero(m)[0][rnd]
      half = np.sqrt(np.clip(1.0 - um[rnd] ** 2, 0.0, 1.0))
      zc, hz = 0.5 * (zb[j] + zt[j]), 0.5 * (zt[j] - zb[j])
      zt[j] = zc + hz * np.sqrt(half)
      zb[j] = zc - hz * half
  m = typ == BOX
  if m.any():
    gm = g[m]
    c, sn = gm[:, 4], gm[:, 5]
    rx, ry = hx[m] - gm[:, 0], hy[m] - gm[:, 1]
    lx = rx * c + ry * sn
    ly = ry * c - rx * sn
    s[m] = lx
    u[m] = np.clip(ly / gm[:, 3], -1.0, 1.0)
    xface = np.abs(lx) / gm[:, 2] >= np.abs(ly) / gm[:, 3]
    nlx = np.where(xface, np.sign(lx), 0.0)
    nly = np.where(xface, 0.0, np.sign(ly))
    shade[m] = (nlx * c - nly * sn) * sun[0] + (nlx * sn + nly * c) * sun[1]
  return s, u, shade, zb, zt


def _visible_layers(col, th, zb, zt, hc, f, cy, H, W):
  """Per column, the visible hits nearest first.

  A hit is visible when its top row is above every nearer ground-standing hit
  of its column (floating parts never occlude what is below them). Returns
  (layer_hit [L, W] hit index or -1, row_top [L, W], row_bottom [L, W]); a
  pixel of row r is covered when row_top <= r < row_bottom.
  """
  n = len(th)
  if n == 0:
    z = np.zeros((0, W), np.int64)
    return z, z, z
  rt = np.clip(np.ceil(cy - f * (zt - hc) / th - 0.5), 0, H).astype(np.int64)
  rb = np.clip(np.ceil(cy - f * (zb - hc) / th - 0.5), 0, H).astype(np.int64)
  order = np.lexsort((th, col))
  cs, rts, rbs = col[order], rt[order], rb[order]
  grounded = zb[order] <= 1e-6
  base = cs * (H + 2)
  run = np.maximum.accumulate(base + np.where(grounded, H - rts, 0))
  same = np.empty(n, bool)
  same[0] = False
  same[1:] = cs[1:] == cs[:-1]
  ceiling = np.full(n, H, np.int64)
  ceiling[1:] = np.where(same[1:], H - (run[:-1] - base[1:]), H)
  vis = (rts < ceiling) & (rts < rbs)
  csum = np.cumsum(vis)
  start = np.maximum.accumulate(np.where(same, 0, np.arange(n)))
  rank = csum - (csum[start] - vis[start]) - 1
  sel = vis & (rank < MAX_LAYERS)
  if not sel.any():
    z = np.zeros((0, W), np.int64)
    return z, z, z
  L = int(rank[sel].max()) + 1
  layer_hit = np.full((L, W), -1, np.int64)
  lrt = np.full((L, W), H, np.int64)
  lrb = np.full((L, W), H, np.int64)
  r, c = rank[sel], cs[sel]
  layer_hit[r, c] = order[sel]
  lrt[r, c] = rts[sel]
  lrb[r, c] = rbs[sel]
  return layer_hit, lrt, lrb


def _ground_class(st: Street, a, b):
  ab = np.abs(b)
  left = (b > 0).astype(np.intp)
  ia = np.clip(((a - st.a_lo) / st.res).astype(np.intp), 0, len(st.cross) - 1)
  out = np.zeros(a.shape, np.uint8)
  side = (ab >= st.road_half) & ~st.cross[ia]
  band = side & (ab < st.facade)
  out[band] = SIDEWALK
  verge = st.verge[left, ia] & (ab > st.road_half + 0.5) & (ab < st.road_half + 1.7)
  out[band & verge] = TERRAIN
  beyond = side & (ab >= st.facade)
  out[beyond] = np.where(st.beyond[left[beyond], ia[beyond]] == 1, TERRAIN, SIDEWALK)
  return out, ia


# Fixed colours appended to the per-render colour table (after col, col2).
_FIXED = np.array([
    (0.95, 1.1, 1.3),     # F_GLASS (x 0.14..0.28)
    (0.25, 0.16, 0.1),    # F_DOOR
    (0.05, 0.05, 0.05),   # F_BLACK
    (0.55, 0.55, 0.55),   # F_HUB
    (0.95, 0.95, 0.85),   # F_HEAD
    (0.8, 0.05, 0.05),    # F_TAIL
    (0.92, 0.92, 0.9),    # F_PLATE
    (0.9, 0.9, 0.85),     # F_BULB
    (0.1, 1.0, 0.3),      # F_TL + 0: green (bottom)
    (1.0, 0.7, 0.1),      # F_TL + 1: amber
    (1.0, 0.1, 0.1),      # F_TL + 2: red (top)
    (0.15, 0.15, 0.15),   # F_TLOFF
    (0.1, 0.12, 0.16),    # F_CGLASS (car glass)
    (1.0, 1.0, 1.05),     # F_ROAD (x grey level)
    (0.85, 0.85, 0.8),    # F_MARK
    (1.0, 0.97, 0.92),    # F_SIDEWALK (x grey level)
    (0.72, 0.7, 0.66),    # F_KERB
    (0.3, 0.43, 0.17),    # F_TERRAIN (x variation)
], np.float32)
(F_GLASS, F_DOOR, F_BLACK, F_HUB, F_HEAD, F_TAIL, F_PLATE, F_BULB, F_TL, _, _,
 F_TLOFF, F_CGLASS, F_ROAD, F_MARK, F_SIDEWALK, F_KERB, F_TERRAIN) = range(len(_FIXED))


def _ground_material(st: Street, a, b, cls, ia, tg, fixed0):
  """Colour-table index and brightness of ground pixels (road markings, kerb,
  sidewalk tiles, grass); texture noise fades with distance."""
  n = len(a)
  idx = np.empty(n, np.int64)
  mult = np.empty(n, np.float32)
  fade = 1.0 / (1.0 + tg / 15.0)
  noise = (_hash(7, np.floor(a * 3.0), np.floor(b * 3.0)) - 0.5) * fade
  ab = np.abs(b)
  rh = st.road_half
  road = cls == ROAD
  mark = road & (ab < 0.08) & (_frac(a, 6.0) < 0.5)
  mark |= road & (ab > rh - 0.35) & (ab < rh - 0.22) & ~st.cross[ia]
  mark |= road & st.zebra[ia] & (ab < rh - 0.4) & (_frac(b, 1.2) < 0.5)
  idx[road] = fixed0 + F_ROAD
  mult[road] = 0.32 + 0.06 * noise[road]
  side = cls == SIDEWALK
  tile = (_frac(a, 1.5) < 0.04) | (_frac(ab, 1.5) < 0.04)
  idx[side] = fixed0 + F_SIDEWALK
  mult[side] = (0.6 + 0.06 * noise - 0.08 * tile * fade)[side]
  kerb = side & (ab < rh + 0.25)
  idx[kerb] = fixed0 + F_KERB
  mult[kerb] = 1.0
  terr = cls == TERRAIN
  idx[terr] = fixed0 + F_TERRAIN
  mult[terr] = 1.0 + 0.4 * noise[terr]
  idx[mark] = fixed0 + F_MARK
  mult[mark] = 1.0
  return idx, mult


def _object_material(P: Prims, pid, s, u, y, trav, L):
  """Colour-table index (col: pid, col2: N + pid, fixed: 2N + F_*), brightness
  and emission (pixel indices, rgb) of object pixels."""
  n = len(pid)
  N = len(P)
  fx0 = 2 * N
  kind = P.kind[pid]
  idx = pid.astype(np.int64)
  mult = np.ones(n, np.float32)
  e_idx, e_rgb = [], []
  seed = P.seed[pid]
  order = np.argsort(kind, kind="stable")
  bounds = np.searchsorted(kind[order], np.arange(17))
  for k in range(16):
    m = order[bounds[k]:bounds[k + 1]]
    if len(m) == 0:
      continue
    pm, sm, um, ym, sd = pid[m], s[m], u[m], y[m], seed[m]
    ci = pm.astype(np.int64)
    mu = np.ones(len(m), np.float32)
    if k == K_FACADE:
      bw, fh, wwf, whf, gft, dbay, hb = np.take(P.tex[:, :7].T, pm, axis=1)
      q = sm / bw
      bay = np.floor(q)
      fx = q - bay
      r = ym / fh
      fl = np.floor(r)
      fy = r - fl
      dxw, dyw = np.abs(fx - 0.5), np.abs(fy - 0.5)
      upper = (fl >= 1) & (ym < hb - 0.7)
      win = upper & (dxw < wwf * 0.5) & (dyw < whf * 0.5)
      frame = upper & (dxw < wwf * 0.5 + 0.05) & (dyw < whf * 0.5 + 0.06)
      shop = (gft == 1) & (fl == 0)
      shopwin = shop & (fy > 0.1) & (fy < 0.72) & (dxw < 0.44)
      sign = shop & (fy > 0.77) & (fy < 0.96)
      door = (gft == 0) & (fl == 0) & (bay == dbay) & (dxw < 0.2) & (ym < 2.2)
      trim = frame | sign | ((ym >= hb - 0.45) & (ym < hb))
      gable = ym >= hb
      h = _hash(sd, bay, fl)
      mu = 0.94 + 0.08 * h
      ci = np.where(trim | gable, N + pm, ci)
      mu = np.where(gable, 0.55, mu)
      glass = win | shopwin
      ci = np.where(glass, fx0 + F_GLASS, ci)
      mu = np.where(glass, 0.14 + 0.14 * h, mu)
      ci = np.where(door, fx0 + F_DOOR, ci)
      if L["lit"] > 0:
        p_lit = np.where(shopwin, min(1.0, 2.0 * L["lit"]), L["lit"])
        lit = glass & (_frac(h * np.float32(97.31) + np.float32((trav % 1000) / 1000.0))
                       < p_lit)
        if lit.any():
          e_idx.append(m[lit])
          e_rgb.append(np.outer(L["emit"] * (0.55 + 0.45 * h[lit]), _WARM))
    elif k == K_WALL:
      panel = (_frac(sm, 5.0) >= 0.5)
      mu = 0.9 + 0.08 * panel + 0.15 * (ym > P.zt[pm] - 0.2)
    elif k == K_FENCE:
      bar = (_frac(sm, 0.22) < 0.35) | (ym > P.zt[pm] - 0.1)
      mu = np.where(bar, 1.0, 0.45)
    elif k in (K_HEDGE, K_CROWN):
      a_ = sm if k == K_HEDGE else um * P.geom[pm, 2]  # metres across
      mu = (0.5 + 0.45 * _hash(sd, np.floor(a_ * 1.2), np.floor(ym * 1.2))
            + 0.4 * _hash(sd, np.floor(a_ * 4.0), np.floor(ym * 4.0), 1))
      if k == K_CROWN:
        mu = mu * (1.0 - 0.25 * np.abs(um))
    elif k == K_POLE:
      mu = 0.75 + 0.45 * (1.0 - np.abs(um))
    elif k == K_LAMP:
      bulb = ym < P.zb[pm] + 0.12
      ci = np.where(bulb, fx0 + F_BULB, ci)
      if L["lamps"] > 0 and bulb.any():
        e_idx.append(m[bulb])
        e_rgb.append(np.tile(_WARM * 1.2 * L["lamps"], (int(bulb.sum()), 1)))
    elif k == K_TLIGHT:
      zb_, zt_ = P.zb[pm], P.zt[pm]
      rel = (ym - zb_) / (zt_ - zb_) * 3.0
      slot = np.clip(np.floor(rel), 0, 2)
      spot = (np.abs(um) < 0.55) & (np.abs(rel - slot - 0.5) < 0.32)
      on = spot & (slot == np.floor(_hash(sd, trav & 0xFF) * 3.0))
      ci = np.where(spot, fx0 + F_TLOFF, ci)
      ci = np.where(on, fx0 + F_TL + slot.astype(np.int64), ci)
      if on.any():
        e_idx.append(m[on])
        e_rgb.append(_FIXED[F_TL + slot[on].astype(np.int64)] * (0.3 + 0.7 * L["lamps"]))
    elif k == K_SIGN:
      zb_, zt_ = P.zb[pm], P.zt[pm]
      border = (np.abs(um) > 0.8) | (ym < zb_ + 0.05) | (ym > zt_ - 0.05)
      symbol = (np.abs(um) < 0.5) & (np.abs(ym - 0.5 * (zb_ + zt_)) < 0.06)
      ci = np.where(border | symbol, N + pm, ci)
    elif k == K_TRUNK:
      mu = 0.8 + 0.35 * _hash(sd, np.floor(ym * 5.0))
    elif k == K_BODY:
      legs = ym < np.where(P.tex[pm, 0] > 0, 1.0, 0.82)
      ci = np.where(legs, N + pm, ci)
      mu = np.where(np.abs(um) > 0.75, 0.8, 1.0)
    elif k == K_HEAD:
      ci = np.where(ym > P.zt[pm] - 0.09, N + pm, ci)
    elif k in (K_CAR, K_BIG):
      hl = P.geom[pm, 2]
      side = np.abs(um) > 0.97
      ends = ~side
      ci = np.where(ym < 0.3, fx0 + F_BLACK, ci)
      wheel_x = np.abs(np.abs(sm) - (hl - (1.3 if k == K_BIG else 0.85)))
      tyre = side & (wheel_x < 0.35) & (ym < 0.64)
      ci = np.where(tyre, fx0 + F_BLACK, ci)
      ci = np.where(tyre & (wheel_x < 0.13) & (np.abs(ym - 0.33) < 0.13), fx0 + F_HUB, ci)
      lights = ends & (ym > 0.6) & (ym < 0.78) & (np.abs(um) > 0.6)
      front = sm > 0
      ci = np.where(lights, np.where(front, fx0 + F_HEAD, fx0 + F_TAIL), ci)
      mu = np.where(ends & (ym < 0.42) & (ym >= 0.3), 0.5, mu)
      ci = np.where(ends & (ym > 0.42) & (ym < 0.55) & (np.abs(um) < 0.25), fx0 + F_PLATE, ci)
      if k == K_BIG:
        bus = P.tex[pm, 0] > 0
        band = (ym > 1.3) & (ym < 2.35)
        wins = band & np.where(side, _frac(sm, 1.4) > 0.11, np.abs(um) < 0.85)
        cab = (sm > hl - 2.2) & (ym > 1.4) & (ym < 2.2)
        glass = np.where(bus, wins, cab & np.where(side, sm < hl - 0.3, np.abs(um) < 0.85))
        cargo = ~bus & (sm < hl - 2.3) & (ym > 0.6)
        ci = np.where(cargo, N + pm, ci)
        ci = np.where(glass, fx0 + F_CGLASS, ci)
      if L["lit"] > 0:
        tail = lights & ~front
        if tail.any():
          e_idx.append(m[tail])
          e_rgb.append(np.tile((0.5 * L["emit"], 0.0, 0.0), (int(tail.sum()), 1)))
    elif k == K_CABIN:
      hl = P.geom[pm, 2]
      inside = (ym > P.zb[pm] + 0.05) & (ym < P.zt[pm] - 0.07)
      glass = inside & np.where(np.abs(um) > 0.97, np.abs(sm) < hl - 0.15, np.abs(um) < 0.85)
      ci = np.where(glass, fx0 + F_CGLASS, ci)
    idx[m] = ci
    mult[m] = mu
  if e_idx:
    e_idx = np.concatenate(e_idx)
    e_rgb = np.concatenate(e_rgb).astype(np.float32)
  else:
    e_idx, e_rgb = np.zeros(0, np.int64), np.zeros((0, 3), np.float32)
  return idx, mult, e_idx, e_rgb



def _lamp_light(st: Street, oa, pa, pb, pz):
  sel = (st.lamps[:, 0] > oa - 5.0) & (st.lamps[:, 0] < oa + 60.0)
  lamps = st.lamps[sel][:8]
  out = np.zeros(len(pa), np.float32)
  pa = pa.astype(np.float32)
  pb = pb.astype(np.float32)
  pz = np.asarray(pz, np.float32)
  for la, lb, lz in lamps:
    d2 = (pa - np.float32(la)) ** 2 + (pb - np.float32(lb)) ** 2 + 0.3 * (pz - np.float32(lz)) ** 2
    w = np.maximum(np.float32(1.0) - d2 * np.float32(1.0 / 110.0), np.float32(0.0))
    out += w * w  # smooth pool of light, ~10 m radius
  return out


def _by_type(P: Prims) -> Prims:
  return P.take(np.argsort(P.ptype, kind="stable"))


def _scene_prims(st: Street, condition: str) -> Prims:
  """Static primitives + one traverse's traffic, sorted by type (cached)."""
  cache = st.__dict__.setdefault("_merged", {})
  if condition not in cache:
    cache[condition] = _by_type(Prims.concat([st.prims, st.traffic[condition]]))
  return cache[condition]


def _cull(P: Prims, oa, ob, yaw, hfov_deg):
  """Primitives (sorted by type) that can be in view: the distance window and,
  for a camera looking roughly along the street, the viewing wedge (exact:
  a box entirely outside the wedge cannot meet any column ray)."""
  back = math.cos(yaw) < 0.5   # looking sideways / backwards: draw behind too
  lo = oa - (VIEW_DISTANCE if back else 15.0)
  hi = oa + (VIEW_DISTANCE if math.cos(yaw) > -0.5 else 15.0)
  half = math.radians(hfov_deg) / 2.0 + abs(yaw)
  m = (P.amax >= lo) & (P.amin <= hi)
  if _WEDGE_CULL and half < math.radians(80.0):
    lateral = np.maximum(0.0, np.maximum(P.bmin - ob, ob - P.bmax))
    m &= lateral <= (P.amax - oa) * math.tan(half) + 0.5
  P = P.take(np.nonzero(m)[0])
  bounds = np.searchsorted(P.ptype, [SEG, CYL, BOX, BOX + 1])
  spans = {SEG: (bounds[0], bounds[1]), CYL: (bounds[1], bounds[2]), BOX: (bounds[2], bounds[3])}
  return P, spans


def render(world: World, pose: Union[Pose, int], condition: str = "day",
           image_size=(120, 160), rng: Optional[np.random.Generator] = None,
           dynamic: str = "auto", hfov_deg: float = HFOV_DEG):
  """Renders one view. Returns (rgb uint8 [H, W, 3], labels uint8 [H, W]).

  Args:
    world: from `make_world` / `make_scene`.
    pose: a `Pose` or a database place index.
    condition: one of `CONDITIONS`.
    image_size: (H, W).
    rng: randomness of this image (lit windows, traffic-light phase, fog
      density, exposure / white balance, sensor noise; the cars / people with
      dynamic="random"). None: derived deterministically from the world, the
      pose and the condition.
    dynamic: "auto" (the cars / people / cyclists of this condition's
      traverse: each traverse has its own, consistent along the traverse),
      "database" (those of the day traverse) or "random" (re-drawn from rng).
    hfov_deg: horizontal field of view; focal f = W/2 / tan(hfov/2), the
      horizon is row H/2 (pixel centres at r + 0.5).
  Labels are exact for the geometry (no corruption; see `corrupt_labels`).
  """
  if condition not in _LIGHT:
    raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
  if isinstance(pose, (int, np.integer)):
    pose = world.poses[int(pose)]
  H, W = int(image_size[0]), int(image_size[1])
  if rng is None:
    rng = np.random.default_rng([world.seed, SPLIT_INDEX.get(world.split, 9),
                                 CONDITIONS.index(condition), pose.street,
                                 int(round(pose.a * 100)) & 0xFFFFFFFF,
                                 int(round(pose.b * 100)) & 0xFFFFFFFF])
  st = world.streets[pose.street]
  L = _LIGHT[condition]
  trav = int(rng.integers(1 << 30))
  f = (W / 2.0) / math.tan(math.radians(hfov_deg) / 2.0)
  cy = H / 2.0
  hc = pose.height
  oa, ob = pose.a, pose.b
  xs = (np.arange(W) + 0.5 - W / 2.0) / f
  cyaw, syaw = math.cos(pose.yaw), math.sin(pose.yaw)
  dx = cyaw + xs * syaw          # ray of column x: forward + x * right
  dy = syaw - xs * cyaw

  if dynamic == "auto":
    P = _scene_prims(st, condition)
  elif dynamic == "database":
    P = _scene_prims(st, DATABASE_CONDITION)
  elif dynamic == "random":
    dyn = (_populate(st, oa - 20.0, oa + _DYNAMIC_DISTANCE, rng) if st.crowd > 0
           else _empty_prims())
    P = _by_type(Prims.concat([st.prims, dyn]))
  else:
    raise ValueError(f"dynamic must be 'auto', 'database' or 'random', got {dynamic!r}")
  P, spans = _cull(P, oa, ob, pose.yaw, hfov_deg)

  # hits: one entry per (primitive, column) the column ray meets
  t = _ray_depths(P, spans, oa, ob, dx, dy)
  hk, hcol = np.nonzero(np.isfinite(t))
  th = t[hk, hcol]
  hdx, hdy = dx[hcol], dy[hcol]
  hx, hy = oa + th * hdx, ob + th * hdy
  hs, hu, hshade, hzb, hzt = _hit_details(P, hk, th, hx, hy, hdx, hdy, oa, ob, st.sun)
  layer_hit, lrt, lrb = _visible_layers(hcol, th, hzb, hzt, hc, f, cy, H, W)

  # paint the visible layers far to near: pixel -> layer
  rows = np.arange(H, dtype=np.int16)[:, None]
  lrt, lrb = lrt.astype(np.int16), lrb.astype(np.int16)
  pix = np.full((H, W), -1, np.int8)
  for l in range(len(layer_hit) - 1, -1, -1):
    pix[(rows >= lrt[l]) & (rows < lrb[l])] = l
  pixf = pix.ravel()
  HW = H * W
  N = len(P)
  fixed0 = 2 * N
  sky0 = fixed0 + len(_FIXED)
  amb = np.array(L["amb"], np.float32)
  sunc = np.array(L["sun"], np.float32)
  wrow = (np.clip((cy - (np.arange(H) + 0.5)) / cy, 0.0, 1.0) ** 0.6).astype(np.float32)
  top, hor = np.array(L["sky_top"], np.float32), np.array(L["sky_hor"], np.float32)
  repaint = condition == "repaint"
  table = np.concatenate([P.rcol if repaint else P.col, P.rcol2 if repaint else P.col2,
                          _FIXED, (hor + wrow[:, None] * (top - hor)) / amb])
  labels = np.full(HW, SKY, np.uint8)
  cidx = np.empty(HW, np.int64)
  mult = np.ones(HW, np.float32)
  lam = np.zeros(HW, np.float32)
  depth = np.full(HW, np.inf, np.float32)
  lamps_on = L["lamps"] > 0 and len(st.lamps) > 0
  lamp = np.zeros(HW, np.float32) if lamps_on else None
  e_idx = np.zeros(0, np.int64)

  # objects
  obj = np.nonzero(pixf >= 0)[0]
  if len(obj):
    orow, ocol = np.divmod(obj, W)
    h = layer_hit[pixf[obj], ocol]
    pid = hk[h]
    to = th[h]
    yo = hc + (cy - (orow + 0.5)) * to / f
    cidx[obj], mult[obj], e_idx, e_rgb = _object_material(P, pid, hs[h], hu[h], yo, trav, L)
    e_idx = obj[e_idx]
    lam[obj] = 0.35 + 0.65 * np.clip(hshade[h], 0.0, 1.0)
    labels[obj] = P.cls[pid]
    depth[obj] = to
    if lamps_on:
      lamp[obj] = _lamp_light(st, oa, hx[h], hy[h], yo)

  # ground (exact ray / plane intersection below the horizon)
  first = int(math.floor(cy - 0.5)) + 1  # first row whose centre is below the horizon
  gnd = first * W + np.nonzero(pixf[first * W:] < 0)[0]
  if len(gnd):
    grow, gcol = np.divmod(gnd, W)
    tg = f * hc / (grow + 0.5 - cy)
    ga, gb = oa + tg * dx[gcol], ob + tg * dy[gcol]
    gcls, ia = _ground_class(st, ga, gb)
    cidx[gnd], mult[gnd] = _ground_material(st, ga, gb, gcls, ia, tg, fixed0)
    lam[gnd] = 0.8
    labels[gnd] = gcls
    depth[gnd] = tg
    if lamps_on:
      lamp[gnd] = _lamp_light(st, oa, ga, gb, 0.0)

  # sky (colour table rows are the sky gradient / ambient, unlit)
  sky = np.nonzero(pixf[:first * W] < 0)[0]
  if len(sky):
    srow, scol = np.divmod(sky, W)
    cidx[sky] = sky0 + srow
    if condition in ("day", "repaint", "dusk"):
      az = np.arctan(xs[scol]) + pose.yaw
      cloud = _hash(11 + pose.street, np.floor(az * 12.0),
                    np.floor(srow * (96.0 / H) * 0.25 + 0.3 * np.floor(az * 6.0)))
      mult[sky] = 1.0 + 0.12 * (cloud > 0.8) * (1.0 - wrow[srow])

  # channel-planar [3, H*W] arithmetic (broadcasting over a trailing 3 is slow)
  gain = np.full(3, 255.0, np.float32)
  if condition != DATABASE_CONDITION:  # exposure / white balance of the traverse
    gain = (gain * rng.uniform(0.88, 1.12) * rng.uniform(0.95, 1.05, 3)).astype(np.float32)
  fog = condition == "fog"
  kf = None
  if fog:
    kf = np.exp(-np.minimum(depth, 1e4) / np.float32(rng.uniform(25.0, 45.0)))
    mult *= kf
  coef = (amb * gain)[:, None] * mult + (sunc * gain)[:, None] * (mult * lam)
  if lamps_on:
    coef += (_WARM * gain * np.float32(0.9 * L["lamps"]))[:, None] * (mult * lamp)
  out = np.take(np.ascontiguousarray(table.T), cidx, axis=1)
  out *= coef
  if len(e_idx):
    out[:, e_idx] += e_rgb.T * gain[:, None] * (kf[e_idx] if fog else 1.0)
  if fog:
    out += (hor * gain)[:, None] * (1.0 - kf)
  if L["noise"]:
    out += rng.integers(-L["noise"], L["noise"] + 1, HW).astype(np.float32)
  np.clip(out, 0, 255, out=out)
  out = out.T.astype(np.uint8, order="C").reshape(H, W, 3)
  return out, labels.reshape(H, W)


# ----------------------------------------------------------------------------
# Label corruption (an imperfect segmenter)
# ----------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------
# Dataset generation
# ----------------------------------------------------------------------------

def _normalise_counts(num_places):
  if isinstance(num_places, int):
    return {s: int(num_places) for s in layout.SPLITS}
  missing = set(layout.SPLITS) - set(num_places)
  if missing:
    raise ValueError(f"num_places needs a count for every split; missing {sorted(missing)}")
  return {s: int(num_places[s]) for s in layout.SPLITS}


def _query_plan(num_places: int, queries_per_place: float, conditions, rng):
  """(place, condition) pairs: about queries_per_place queries per place (at
  least one per condition); conditions are balanced, a place queried several
  times gets different conditions."""
  C = len(conditions)
  total = max(C, int(round(num_places * queries_per_place)))
  if total >= num_places:
    rank = rng.permutation(num_places)
    plan = [(i % num_places, (rank[i % num_places] + i // num_places) % C)
            for i in range(total)]
  else:
    places = np.sort(rng.choice(num_places, size=total, replace=False))
    plan = list(zip(places, rng.permutation(total) % C))
  return [(int(p), conditions[int(c)]) for p, c in plan]


def _params(seed, image_size, num_places, conditions, queries_per_place):
  return {"version": VERSION, "seed": int(seed), "image_size": [int(image_size[0]), int(image_size[1])],
          "num_places": {s: int(num_places[s]) for s in layout.SPLITS},
          "conditions": list(conditions), "queries_per_place": float(queries_per_place)}


def _check_existing(root, params):
  path = os.path.join(root, "synthetic.json")
  if not os.path.isfile(path):
    return False
  with open(path) as fh:
    old = json.load(fh)
  for key, value in params.items():
    if old.get(key) != value:
      raise ValueError(f"{path}: existing synthetic dataset differs in field {key!r}: "
                       f"{old.get(key)!r} != {value!r} (use another --root or delete it)")
  return True


def generate(root: str, seed: int = 0, image_size=(120, 160),
             num_places=None, conditions: Sequence[str] = QUERY_CONDITIONS,
             queries_per_place: float = 1, progress: bool = True) -> str:
  """Writes the synthetic dataset (all three splits) under `root`; returns root.

  Args:
    root: output folder (must not exist, be empty, or hold a matching
      synthetic.json).
    seed: world / traverse seed; same seed -> same bytes.
    image_size: (H, W).
    num_places: database places per split (dict with train/val/test, or int).
    conditions: query conditions (each query's `note`); cycled over the
      queries, so every condition appears (at least once).
    queries_per_place: queries per database place (float: 0.5 -> a random
      half of the places get one; 2 -> every place two, different conditions).
    progress: tqdm bar when stderr is a TTY, else one summary line at the end.

  Database labels get the (light) day corruption, query labels their
  condition's (`corrupt_labels`). Skips when `root/synthetic.json` matches the
  parameters; raises ValueError naming the file and the differing field when it
  does not. Builds into a temporary sibling folder and renames it into place
  when complete.
  """
  if num_places is None:
    num_places = {"train": 200, "val": 60, "test": 100}
  counts = _normalise_counts(num_places)
  conditions = tuple(conditions)
  bad = [c for c in conditions if c not in CONDITIONS]
  if bad or not conditions:
    raise ValueError(f"conditions must be a non-empty subset of {CONDITIONS}, got {conditions}")
  if queries_per_place <= 0:
    raise ValueError(f"queries_per_place must be > 0, got {queries_per_place}")
  params = _params(seed, image_size, counts, conditions, queries_per_place)
  root = os.path.abspath(root)
  if _check_existing(root, params):
    return root
  if os.path.isdir(root) and os.listdir(root):
    raise ValueError(f"{root}: exists, is not empty and has no synthetic.json")
  tmp = f"{root}.tmp-{os.getpid()}"
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  total = sum(counts[s] + max(len(conditions), int(round(counts[s] * queries_per_place)))
              for s in layout.SPLITS)
  bar = None
  if progress and sys.stderr.isatty():
    try:
      from tqdm import tqdm
      bar = tqdm(total=total, desc="synthetic", unit="img")
    except ImportError:
      bar = None
  start = time.time()
  written = 0
  meta = {"params": params, "counts": {}, "regimes": {}}
  try:
    for split in layout.SPLITS:
      world = make_world(seed, split, counts[split])
      img_db, seg_db = layout.split_folders(tmp, split, "database")
      img_q, seg_q = layout.split_folders(tmp, split, "queries")
      for d in (img_db, seg_db, img_q, seg_q):
        os.makedirs(d, exist_ok=True)
      for i, pose in enumerate(world.poses):
        rng = _split_rng(seed, split, 1, i)
        rgb, lab = render(world, pose, DATABASE_CONDITION, image_size, rng=rng)
        lab = corrupt_labels(lab, DATABASE_CONDITION, rng)
        east, north, heading = world.utm(pose)
        name = layout.format_name(east, north, utm_zone_number=UTM_ZONE[0],
                                  utm_zone_letter=UTM_ZONE[1], pano_id=f"{split}{i:05d}",
                                  heading=f"{heading:.1f}", note=DATABASE_CONDITION)
        _write_pair(img_db, seg_db, name, rgb, lab)
        written += 1
        if bar is not None:
          bar.update(1)
      plan = _query_plan(world.num_places, queries_per_place, conditions,
                         _split_rng(seed, split, 2))
      for q, (place, cond) in enumerate(plan):
        rng = _split_rng(seed, split, 3, q)
        pose = query_pose(world, place, rng)
        rgb, lab = render(world, pose, cond, image_size, rng=rng)
        lab = corrupt_labels(lab, cond, rng)
        east, north, heading = world.utm(pose)
        name = layout.format_name(east, north, utm_zone_number=UTM_ZONE[0],
                                  utm_zone_letter=UTM_ZONE[1], pano_id=f"{split}{place:05d}",
                                  heading=f"{heading:.1f}", timestamp=f"q{q:06d}", note=cond)
        _write_pair(img_q, seg_q, name, rgb, lab)
        written += 1
        if bar is not None:
          bar.update(1)
      meta["counts"][split] = {"database": world.num_places, "queries": len(plan)}
      meta["regimes"][split] = [str(r) for r in world.place_regime]
    out = dict(params)
    out.update({"counts": meta["counts"], "regimes": meta["regimes"],
                "classes": list(CLASS_NAMES), "utm_origin": {s: list(UTM_ORIGIN[s]) for s in layout.SPLITS}})
    with open(os.path.join(tmp, "synthetic.json"), "w") as fh:
      json.dump(out, fh, indent=1)
    if os.path.isdir(root):
      os.rmdir(root)  # empty (checked above)
    os.replace(tmp, root)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  finally:
    if bar is not None:
      bar.close()
  elapsed = max(time.time() - start, 1e-9)
  if progress and bar is None:
    print(f"synthetic: wrote {written} images to {root} in {elapsed:.1f} s "
          f"({written / elapsed:.0f} images/s)", file=sys.stderr)
  return root


def _write_pair(img_dir, seg_dir, name, rgb, lab):
  layout.write_image_atomic(os.path.join(img_dir, name), rgb)
  layout.write_image_atomic(os.path.join(seg_dir, os.path.splitext(name)[0] + ".png"), lab)


# ----------------------------------------------------------------------------
# Montage and CLI
# ----------------------------------------------------------------------------

def _pick_montage_place(world: World) -> int:
  """A place whose day view shows facades, trees, cars, people, poles and sky."""
  targets = {BUILDING: 0.3, VEGETATION: 0.06, CAR: 0.04, PERSON: 0.004, POLE: 0.004,
             SKY: 0.1, SIDEWALK: 0.02, TRAFFIC_SIGN: 0.001}
  best, best_score = 0, -1.0
  for i in range(world.num_places):
    _, lab = render(world, i, "day", (60, 80))
    score = sum(min(np.mean(lab == c) / t, 1.0) for c, t in targets.items())
    if score > best_score + 1e-9:
      best, best_score = i, score
  return best


def montage(out: str, seed: int = 0, place: Optional[int] = None, image_size=(120, 160),
            split: str = "test", num_places: int = 60, scale: int = 2) -> str:
  """PNG: one place under every condition; RGB row above the (corrupted)
  Cityscapes-coloured label row."""
  from PIL import Image, ImageDraw
  world = make_world(seed, split, num_places)
  if place is None:
    place = _pick_montage_place(world)
  H, W = image_size
  tiles = []
  for ci, cond in enumerate(CONDITIONS):
    rng = np.random.default_rng([seed, 77, ci])
    pose = world.poses[place] if cond == "day" else query_pose(world, place, rng)
    rgb, lab = render(world, pose, cond, image_size, rng=rng)
    tiles.append((cond, rgb, colorize(corrupt_labels(lab, cond, rng))))
  pad, head = 4, 14
  canvas = Image.new("RGB", (len(tiles) * (W * scale + pad) + pad,
                             2 * (H * scale + pad) + pad + head), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for i, (cond, rgb, col) in enumerate(tiles):
    x = pad + i * (W * scale + pad)
    draw.text((x + 2, 2), f"{cond} ({world.place_regime[place]})" if i == 0 else cond,
              fill=(0, 0, 0))
    for r, img in enumerate((rgb, col)):
      tile = Image.fromarray(img).resize((W * scale, H * scale), Image.NEAREST)
      canvas.paste(tile, (x, head + pad + r * (H * scale + pad)))
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  canvas.save(out)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m structvpr_jax.data.synthetic",
                                   description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  g = sub.add_parser("generate", help="write the synthetic dataset layout")
  g.add_argument("--root", required=True)
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--height", type=int, default=120)
  g.add_argument("--width", type=int, default=160)
  g.add_argument("--train", type=int, default=200)
  g.add_argument("--val", type=int, default=60)
  g.add_argument("--test", type=int, default=100)
  g.add_argument("--queries-per-place", type=float, default=1.0)
  g.add_argument("--conditions", default=",".join(QUERY_CONDITIONS))
  m = sub.add_parser("montage", help="one place under every condition (PNG)")
  m.add_argument("--out", required=True)
  m.add_argument("--seed", type=int, default=0)
  m.add_argument("--place", type=int, default=None)
  m.add_argument("--height", type=int, default=120)
  m.add_argument("--width", type=int, default=160)
  args = parser.parse_args(argv)
  if args.command == "generate":
    root = generate(args.root, seed=args.seed, image_size=(args.height, args.width),
                    num_places={"train": args.train, "val": args.val, "test": args.test},
                    conditions=tuple(c for c in args.conditions.split(",") if c),
                    queries_per_place=args.queries_per_place)
    print(root)
  else:
    print(montage(args.out, seed=args.seed, place=args.place,
                  image_size=(args.height, args.width)))


__all__ = ["render", "corrupt_labels", "make_world", "make_scene", "query_pose", "generate",
           "montage", "colorize", "World", "Street", "Pose", "Prims", "CONDITIONS",
           "QUERY_CONDITIONS", "REGIMES", "PALETTE", "CLASS_NAMES", "PLACE_SPACING"]

if __name__ == "__main__":
  main()
