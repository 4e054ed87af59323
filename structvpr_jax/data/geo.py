"""WGS84 latitude/longitude -> UTM, for datasets that come with GPS.

`latlon_to_utm` is the usual series expansion of the transverse Mercator
projection (Snyder, "Map Projections: A Working Manual", USGS 1987, p. 61;
the same as the `utm` package), accurate to well under a centimetre within a
zone. The zone number comes from the longitude (with the Norway and Svalbard
exceptions), the letter from the latitude (C..X, 8 degrees each).
"""

from __future__ import annotations

import math

K0 = 0.9996
R = 6378137.0                    # WGS84 semi-major axis (m)
E = 0.00669438                   # WGS84 first eccentricity squared
E2, E3 = E * E, E * E * E
E_P2 = E / (1.0 - E)
M1 = 1 - E / 4 - 3 * E2 / 64 - 5 * E3 / 256
M2 = 3 * E / 8 + 3 * E2 / 32 + 45 * E3 / 1024
M3 = 15 * E2 / 256 + 45 * E3 / 1024
M4 = 35 * E3 / 3072
ZONE_LETTERS = "CDEFGHJKLMNPQRSTUVWXX"


def zone_number(lat: float, lon: float) -> int:
  """UTM zone of a point (1..60), with the Norway (32V) and Svalbard exceptions."""
  if 56 <= lat < 64 and 3 <= lon < 12:
    return 32
  if 72 <= lat <= 84 and lon >= 0:
    if lon < 9:
      return 31
    if lon < 21:
      return 33
    if lon < 33:
      return 35
    if lon < 42:
      return 37
  return int((lon + 180) // 6) % 60 + 1


def zone_letter(lat: float) -> str:
  if not -80 <= lat <= 84:
    raise ValueError(f"latitude {lat} is outside the UTM range [-80, 84]")
  return ZONE_LETTERS[int((lat + 80) // 8)]


def latlon_to_utm(lat: float, lon: float, force_zone: int | None = None):
  """(easting m, northing m, zone number, zone letter) of a WGS84 point.

  `force_zone` projects into a given zone (to keep one dataset in one zone).
  Raises ValueError for a latitude outside [-80, 84] or a longitude outside
  [-180, 180].
  """
  if not -180 <= lon <= 180:
    raise ValueError(f"longitude {lon} is outside [-180, 180]")
  letter = zone_letter(lat)
  number = force_zone or zone_number(lat, lon)
  lat_rad = math.radians(lat)
  lat_sin, lat_cos = math.sin(lat_rad), math.cos(lat_rad)
  lat_tan = lat_sin / lat_cos
  lat_tan2, lat_tan4 = lat_tan ** 2, lat_tan ** 4
  central = math.radians((number - 1) * 6 - 180 + 3)
  dlon = (math.radians(lon) - central + math.pi) % (2 * math.pi) - math.pi
  n = R / math.sqrt(1 - E * lat_sin ** 2)
  c = E_P2 * lat_cos ** 2
  a = lat_cos * dlon
  m = R * (M1 * lat_rad - M2 * math.sin(2 * lat_rad) + M3 * math.sin(4 * lat_rad)
           - M4 * math.sin(6 * lat_rad))
  easting = K0 * n * (a + a ** 3 / 6 * (1 - lat_tan2 + c)
                      + a ** 5 / 120 * (5 - 18 * lat_tan2 + lat_tan4 + 72 * c - 58 * E_P2)
                      ) + 500000.0
  northing = K0 * (m + n * lat_tan * (a ** 2 / 2 + a ** 4 / 24 * (5 - lat_tan2 + 9 * c + 4 * c ** 2)
                                      + a ** 6 / 720 * (61 - 58 * lat_tan2 + lat_tan4
                                                        + 600 * c - 330 * E_P2)))
  if lat < 0:
    northing += 10000000.0
  return easting, northing, number, letter
