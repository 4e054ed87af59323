"""The world model of the synthetic city: streets, blocks, traffic and poses.

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

Traversals (conditions): ``day`` is the database traverse; queries are
``dusk``, ``night``, ``fog`` and ``repaint`` (their looks: `render`). For
``repaint`` every facade's colours are *swapped with another building of the
district* (`_assign_repaint`), so appearance points to a wrong place. Every
traverse has its own parked cars / people / cyclists / oncoming traffic (so
in queries they are moved w.r.t. the database, consistently along a
traverse); query poses are jittered (+-2 m along, +-0.7 m lateral, +-7 deg
yaw, +-0.15 m height; every query is <= 2.2 m from its place, `query_pose`).

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

Limitations: 2.5-D (vertical extrusions only: no overhangs, roofs seen from
above, or transparency -- fences are drawn solid); a street's corridor is all
that is drawn, so a camera looking across a street's end sees empty sky
beyond it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

# Cityscapes trainIds (names and colours: labels.py).
(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN,
 VEGETATION, TERRAIN, SKY, PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE,
 BICYCLE) = range(19)

DATABASE_CONDITION = "day"
QUERY_CONDITIONS = ("dusk", "night", "fog", "repaint")
CONDITIONS = (DATABASE_CONDITION,) + QUERY_CONDITIONS
REGIMES = ("structure", "repetitive", "mixed")

PLACE_SPACING = 5.0        # metres between consecutive database images
CAMERA_HEIGHT = 1.8
VIEW_DISTANCE = 170.0      # primitives farther ahead are not drawn

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
