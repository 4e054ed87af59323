"""SLME encoding vs a plain-numpy reference and hand-computed cases."""

import jax
import numpy as np
import pytest

from structvpr_jax import slme


def numpy_encode(labels, class_to_group, group_values):
  """out[..., g] = group_values[g] * (class_to_group[labels] == g), from docs/design.md ("SLME")."""
  labels = np.asarray(labels).astype(np.int64)
  out = np.zeros(labels.shape + (len(group_values),), np.float32)
  for idx in np.ndindex(labels.shape):
    c = labels[idx]
    if 0 <= c < len(class_to_group) and class_to_group[c] >= 0:
      g = class_to_group[c]
      out[idx + (g,)] = group_values[g]
  return out


@pytest.mark.parametrize("kind", slme.GROUPINGS)
def test_encode_matches_numpy_reference(kind):
  table, values = slme.grouping(kind)
  rng = np.random.default_rng(0)
  labels = rng.integers(-2, 22, size=(2, 7, 9)).astype(np.int32)  # includes out-of-range
  got = np.asarray(jax.jit(slme.encode)(labels, table, values))
  np.testing.assert_array_equal(got, numpy_encode(labels, table, values))
  assert got.dtype == np.float32 and got.shape == (2, 7, 9, slme.num_channels(kind))


def test_default_grouping_hand_case():
  # road, building, pole, vegetation, sky, car, 255 (ignore)
  labels = np.array([[0, 2, 5, 8, 10, 13, 255]], np.uint8)
  out = np.asarray(slme.encode(labels, *slme.grouping("slme")))[0]
  expected = np.array([
      [0.5, 0, 0, 0, 0],     # road -> flat 0.5
      [0, 1.0, 0, 0, 0],     # building -> construction 1.0
      [0, 0, 1.0, 0, 0],     # pole -> object 1.0
      [0, 0, 0, 0.5, 0],     # vegetation -> nature 0.5
      [0, 0, 0, 0, 0.25],    # sky 0.25
      [0, 0, 0, 0, 0],       # car: dynamic, dropped
      [0, 0, 0, 0, 0],       # 255: outside [0, C)
  ], np.float32)
  np.testing.assert_array_equal(out, expected)


def test_onehot_alternatives():
  labels = np.array([[1, 18]], np.int32)
  onehot = np.asarray(slme.encode(labels, *slme.grouping("onehot")))[0]
  assert onehot.shape == (2, 19)
  assert onehot[0, 1] == 1 and onehot[1, 18] == 1 and onehot.sum() == 2
  groups = np.asarray(slme.encode(labels, *slme.grouping("group_onehot")))[0]
  np.testing.assert_array_equal(groups, [[1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])


def test_default_tables_cover_cityscapes():
  table, values = slme.grouping()
  assert table.shape == (19,) and values.shape == (5,)
  assert set(table[:11]) == {0, 1, 2, 3, 4} and np.all(table[11:] == -1)


def test_unknown_grouping_raises():
  with pytest.raises(ValueError, match="unknown SLME grouping"):
    slme.grouping("nope")
