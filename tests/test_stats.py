"""Paired bootstrap: hand cases and a plain-loop reference."""

import numpy as np
import pytest

from structvpr_jax import stats


def test_identical_methods_differ_by_zero():
  hits = {0: [1, 0, 1, 1], 1: [0, 0, 1, 0]}
  out = stats.paired_bootstrap(hits, hits, num_resamples=200)
  assert out["diff"] == out["ci_low"] == out["ci_high"] == 0.0
  assert out["wins"] == out["losses"] == 0 and out["num_queries"] == 8


def test_hand_case_two_seeds():
  """seed 0: other wins 2 of 4 queries (+50 points); seed 1: loses 1 of 2 (-50):
  mean over seeds 0; every query flipped one way -> CI at +-100 bounds."""
  base = {0: [0, 0, 1, 1], 1: [1, 1]}
  other = {0: [1, 1, 1, 1], 1: [1, 0]}
  out = stats.paired_bootstrap(base, other, num_resamples=2000)
  assert out["diff"] == pytest.approx(0.0)
  assert out["wins"] == 2 and out["losses"] == 1
  assert -100 <= out["ci_low"] < 0 < out["ci_high"] <= 100
  always = stats.paired_bootstrap({0: [0, 0, 0]}, {0: [1, 1, 1]}, num_resamples=100)
  assert always["diff"] == always["ci_low"] == always["ci_high"] == 100.0


def test_matches_a_plain_loop():
  rng = np.random.default_rng(5)
  base = {s: rng.integers(0, 2, 30) for s in range(3)}
  other = {s: np.where(rng.random(30) < 0.2, 1, base[s]) for s in range(3)}
  out = stats.paired_bootstrap(base, other, num_resamples=500, seed=7)
  draw = np.random.default_rng(7)
  boot = np.zeros(500)
  for s in range(3):
    d = other[s].astype(float) - base[s]
    idx = draw.integers(0, 30, size=(500, 30))
    for r in range(500):
      boot[r] += d[idx[r]].mean()
  boot = 100 * boot / 3
  expected = 100 * np.mean([np.mean(other[s] - base[s]) for s in range(3)])
  assert out["diff"] == pytest.approx(expected)
  assert out["ci_low"] == pytest.approx(np.quantile(boot, 0.025))
  assert out["ci_high"] == pytest.approx(np.quantile(boot, 0.975))
  assert out["ci_low"] <= out["diff"] <= out["ci_high"]


def test_mismatched_inputs_are_refused():
  with pytest.raises(ValueError, match="same seeds"):
    stats.paired_bootstrap({0: [1]}, {1: [1]})
  with pytest.raises(ValueError, match="seed 0"):
    stats.paired_bootstrap({0: [1, 0]}, {0: [1]})
