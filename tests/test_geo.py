"""lat/lon -> UTM against an independent formula (Krüger's n-series, Karney
2011) and hand cases; the CSV converter that uses it."""

import csv
import os

import numpy as np
import pytest

from structvpr_jax import files
from structvpr_jax.data import convert, geo, layout


def kruger(lat, lon, zone):
  """Transverse Mercator by Krüger's series in n (Karney 2011, eqs. 7-11), WGS84."""
  a, f = 6378137.0, 1 / 298.257223563
  n = f / (2 - f)
  big_a = a / (1 + n) * (1 + n ** 2 / 4 + n ** 4 / 64)
  alpha = [n / 2 - 2 * n ** 2 / 3 + 5 * n ** 3 / 16, 13 * n ** 2 / 48 - 3 * n ** 3 / 5,
           61 * n ** 3 / 240]
  phi, lam = np.radians(lat), np.radians(lon - ((zone - 1) * 6 - 180 + 3))
  e = 2 * np.sqrt(n) / (1 + n)
  t = np.sinh(np.arctanh(np.sin(phi)) - e * np.arctanh(e * np.sin(phi)))
  xi, eta = np.arctan2(t, np.cos(lam)), np.arctanh(np.sin(lam) / np.sqrt(1 + t ** 2))
  east = 500000 + 0.9996 * big_a * (eta + sum(al * np.cos(2 * j * xi) * np.sinh(2 * j * eta)
                                              for j, al in enumerate(alpha, 1)))
  north = 0.9996 * big_a * (xi + sum(al * np.sin(2 * j * xi) * np.cosh(2 * j * eta)
                                     for j, al in enumerate(alpha, 1)))
  return east, north + (10000000 if lat < 0 else 0)


def test_matches_kruger_series_within_centimetres():
  rng = np.random.default_rng(0)
  for lat, lon in zip(rng.uniform(-79, 83, 200), rng.uniform(-179, 179, 200)):
    east, north, zone, _ = geo.latlon_to_utm(lat, lon)
    ref = kruger(lat, lon, zone)
    assert abs(east - ref[0]) < 0.05 and abs(north - ref[1]) < 0.05, (lat, lon)


def test_hand_cases_and_zones():
  assert geo.latlon_to_utm(0.0, 3.0) == (500000.0, 0.0, 31, "N")    # equator, central meridian
  east, north, zone, letter = geo.latlon_to_utm(-27.4773, 153.0283)  # Brisbane (Gardens Point)
  assert (zone, letter) == (56, "J") and 502000 < east < 503500 and 6.96e6 < north < 6.97e6
  assert geo.zone_number(60.0, 5.0) == 32                           # Norway exception
  assert geo.zone_number(78.0, 15.0) == 33                          # Svalbard
  assert geo.zone_number(40.0, 180.0) == 1
  with pytest.raises(ValueError, match="latitude 85"):
    geo.latlon_to_utm(85.0, 0.0)
  with pytest.raises(ValueError, match="longitude 200"):
    geo.latlon_to_utm(0.0, 200.0)


def test_convert_csv_writes_a_layout_with_utm_names(tmp_path):
  img = tmp_path / "src"
  os.makedirs(img)
  rows = []
  for i, (split, role) in enumerate([("train", "database"), ("train", "queries"),
                                     ("test", "database"), ("test", "queries")]):
    files.save_image(str(img / f"{i}.jpg"), np.full((8, 10, 3), 40 * i, np.uint8))
    lat, lon = -27.4773 + 1e-4 * i, 153.0283
    rows.append({"path": f"src/{i}.jpg", "lat": f"{lat:.6f}", "lon": f"{lon:.6f}",
                 "split": split, "role": role, "note": "day" if i % 2 == 0 else "night"})
  path = tmp_path / "images.csv"
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  marker = convert.convert_csv(str(path), str(tmp_path / "out"), verbose=False)
  assert marker["utm_zone"] == 56
  assert marker["counts"] == {"train": {"database": 1, "queries": 1},
                              "test": {"database": 1, "queries": 1}}
  sp = layout.read_split(str(tmp_path / "out"), "test")
  east, north, _, _ = geo.latlon_to_utm(float(rows[3]["lat"]), float(rows[3]["lon"]))
  np.testing.assert_allclose(sp.query_utm[0], [east, north], atol=0.01)
  fields = layout.parse_name(sp.query_paths[0])
  assert fields["utm_zone_number"] == "56" and fields["utm_zone_letter"] == "J"
  assert fields["lat"] == rows[3]["lat"] and fields["note"] == "night"
  # 1e-4 degrees of latitude apart: about 11 m
  assert 10.5 < abs(sp.query_utm[0, 1] - sp.database_utm[0, 1]) < 11.6
  # errors name the CSV line
  rows[2]["role"] = "db"
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  with pytest.raises(ValueError, match=r"images.csv:4: split 'test' / role 'db'"):
    convert.convert_csv(str(path), str(tmp_path / "out2"), verbose=False)
  assert not os.path.exists(tmp_path / "out2")
