"""The renderer of the synthetic city: one street view, RGB and exact labels.

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

Conditions: ``day`` (the database traverse); ``dusk`` (warm, darker, some
lit windows), ``night`` (dark; random lit windows and shops, street lamps with
pools of light, traffic lights, tail lights), ``fog`` (contrast falls as
exp(-depth / 25..45 m)) and ``repaint`` (day light, every facade in another
building's colours, see `world`). Query traverses get an exposure /
white-balance jitter and sensor noise.

Limitations: camera pitch / roll are 0; no cast shadows; primitives more than
170 m ahead are not drawn.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np

from structvpr_jax.data.synthetic.world import (
    BOX, CONDITIONS, CYL, DATABASE_CONDITION, K_BIG, K_BODY, K_CABIN, K_CAR, K_CROWN,
    K_FACADE, K_FENCE, K_HEAD, K_HEDGE, K_LAMP, K_POLE, K_SIGN, K_TLIGHT, K_TRUNK, K_WALL,
    ROAD, SEG, SIDEWALK, SKY, SPLIT_INDEX, TERRAIN, VIEW_DISTANCE, Pose, Prims, Street,
    World, _ROUNDED, _empty_prims, _populate)

HFOV_DEG = 90.0
_WEDGE_CULL = True         # skip primitives outside the viewing wedge (exact)
_DYNAMIC_DISTANCE = 110.0  # query traverses re-draw cars / people this far ahead
MAX_LAYERS = 16            # visible depth layers painted per column
_NEAR = 0.05


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
