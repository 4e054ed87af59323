"""Paired comparisons of two methods on the same queries (pure numpy).

An ablation's claim is a difference of recall between two variants on the
same test queries, over several seeds. `paired_bootstrap` estimates it as
the mean over seeds of the per-seed difference of hit rates, with a
percentile bootstrap confidence interval that resamples queries within each
seed (the seeds are kept: each is a separately trained pair of models).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np


def paired_bootstrap(base: Mapping, other: Mapping, num_resamples: int = 10000,
                     confidence: float = 0.95, seed: int = 0) -> dict:
  """Difference `other - base` of hit rates in percentage points.

  Args:
    base, other: {seed: 0/1 hits [Q_seed]} of two methods, the same queries in
      the same order per seed (e.g. R@1 hits of each test query).
    num_resamples: bootstrap resamples.
    confidence: two-sided interval level.
    seed: RNG seed of the resampling.

  Returns:
    {"diff": mean over seeds of 100 * (mean(other_s) - mean(base_s)),
     "ci_low", "ci_high": percentile interval of the same statistic over
     resamples (queries drawn with replacement within each seed),
     "num_seeds", "num_queries" (total), "wins", "losses" (queries where only
     `other`, or only `base`, is right)}.
  """
  seeds = sorted(base)
  if sorted(other) != seeds or not seeds:
    raise ValueError(f"both methods need the same seeds; got {sorted(base)} vs {sorted(other)}")
  rng = np.random.default_rng(seed)
  point, boot = [], np.zeros(num_resamples)
  wins = losses = total = 0
  for s in seeds:
    a = np.asarray(base[s], np.float64)
    b = np.asarray(other[s], np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
      raise ValueError(f"seed {s}: hits of different or empty shapes {a.shape} vs {b.shape}")
    d = b - a
    point.append(d.mean())
    idx = rng.integers(0, len(d), size=(num_resamples, len(d)))
    boot += d[idx].mean(axis=1)
    wins += int(np.sum(d > 0))
    losses += int(np.sum(d < 0))
    total += len(d)
  boot = 100.0 * boot / len(seeds)
  alpha = (1.0 - confidence) / 2
  return {"diff": float(100.0 * np.mean(point)),
          "ci_low": float(np.quantile(boot, alpha)), "ci_high": float(np.quantile(boot, 1 - alpha)),
          "num_seeds": len(seeds), "num_queries": total, "wins": wins, "losses": losses}
