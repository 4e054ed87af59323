"""Training until validation stops improving (the VPR convention).

As the deep-visual-geo-localization-benchmark and pytorch-NetVlad train: an
epoch is a set number of training queries (`train.epoch_queries`), the model
is validated after every epoch, the best epoch's checkpoint is kept, and
training stops after `train.patience` epochs without improvement of the
selection score, or at `train.max_epochs`.

The selection score of a validation is its `train.select_metric` (val R@5 by
default, as the benchmark) with the other of R@1 / R@5 as a tie-break
(`selection_score`): small val splits saturate R@5, and a tie must not count
as an improvement unless the tie-break improves.

`EarlyStopping` is plain Python state (no JAX): `update(epoch, score)` after
each validation returns the reason to stop or None; `state_dict()` goes into
every checkpoint's meta so a run resumed mid-patience makes the same decision.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

SELECT_METRICS = ("R@5", "R@1")
TIE_BREAK = {"R@5": "R@1", "R@1": "R@5"}
TIE_BREAK_WEIGHT = 1e-6      # recalls are percent (0-100): the tie-break stays below 1e-4


def selection_score(val: dict, metric: str = "R@5") -> float:
  """`val["val_<metric>"] + 1e-6 * val["val_<tie-break>"]` (keys as the fit loop
  writes them, e.g. "val_R@5"; plain "R@5" keys are accepted too)."""
  if metric not in SELECT_METRICS:
    raise ValueError(f"train.select_metric={metric!r}; expected one of {SELECT_METRICS}")

  def get(name):
    for key in (f"val_{name}", name):
      if key in val:
        return float(val[key])
    raise KeyError(f"validation record has no {name} (keys: {sorted(val)})")

  return get(metric) + TIE_BREAK_WEIGHT * get(TIE_BREAK[metric])


@dataclasses.dataclass
class EarlyStopping:
  """Stop after `patience` validations without a better score, or at `max_epochs`.

  `patience` 0: never stop early. `max_epochs` 0: no cap here (the caller's
  step budget ends the run). Epochs are counted from 1; a validation of the
  starting weights (`train.eval_at_start`) is epoch 0 and competes for best.
  """
  patience: int = 0
  max_epochs: int = 0
  best: float = -math.inf
  best_epoch: int = -1
  last_epoch: int = -1
  stop_reason: Optional[str] = None

  @property
  def epochs_without_improvement(self) -> int:
    return 0 if self.best_epoch < 0 else self.last_epoch - self.best_epoch

  def update(self, epoch: int, score: float) -> Optional[str]:
    """Records the validation of `epoch`; returns "patience", "max_epochs" or None."""
    if epoch <= self.last_epoch:
      raise ValueError(f"epoch {epoch} validated after epoch {self.last_epoch}")
    self.last_epoch = int(epoch)
    if score > self.best:
      self.best, self.best_epoch = float(score), int(epoch)
    if self.patience and self.epochs_without_improvement >= self.patience:
      self.stop_reason = "patience"
    elif self.max_epochs and epoch >= self.max_epochs:
      self.stop_reason = "max_epochs"
    return self.stop_reason

  def describe(self, metric: str = "R@5") -> str:
    """One line for the log: why the stage stopped (or where it stands)."""
    if self.stop_reason == "patience":
      return (f"stopped after epoch {self.last_epoch}: val {metric} has not improved for "
              f"{self.patience} epochs (best {self.best:.2f} at epoch {self.best_epoch})")
    if self.stop_reason == "max_epochs":
      return (f"stopped at the cap of {self.max_epochs} epochs (train.max_epochs; best val "
              f"{metric} {self.best:.2f} at epoch {self.best_epoch}, "
              f"{self.epochs_without_improvement} epochs since)")
    return (f"epoch {self.last_epoch}: best val {metric} {self.best:.2f} at epoch "
            f"{self.best_epoch}, {self.epochs_without_improvement}/{self.patience or '-'} "
            f"epochs without improvement")

  def state_dict(self) -> dict:
    """JSON-plain state for a checkpoint's meta."""
    return {"patience": self.patience, "max_epochs": self.max_epochs,
            "best": None if self.best == -math.inf else self.best,
            "best_epoch": self.best_epoch, "last_epoch": self.last_epoch,
            "stop_reason": self.stop_reason}

  @classmethod
  def from_state(cls, state: dict, patience: int, max_epochs: int) -> "EarlyStopping":
    """The stopper of a resumed run: the checkpoint's record with this run's
    patience and cap (a resumed run with a larger cap or patience goes on)."""
    best = state.get("best")
    out = cls(patience=int(patience), max_epochs=int(max_epochs),
              best=-math.inf if best is None else float(best),
              best_epoch=int(state.get("best_epoch", -1)),
              last_epoch=int(state.get("last_epoch", -1)))
    # re-decide with this run's settings (the recorded reason may not hold)
    if out.patience and out.best_epoch >= 0 and out.epochs_without_improvement >= out.patience:
      out.stop_reason = "patience"
    elif out.max_epochs and out.last_epoch >= out.max_epochs:
      out.stop_reason = "max_epochs"
    return out
