"""Early stopping on hand-made validation curves (structvpr_jax/early_stopping.py)."""

import math

import pytest

from structvpr_jax import early_stopping
from structvpr_jax.early_stopping import EarlyStopping

# val R@5 per epoch 1..8: best 61 at epoch 4, then 3 epochs without improvement
CURVE = [50.0, 60.0, 58.0, 61.0, 60.0, 61.0, 57.0, 70.0]


def run(stopper, curve, first_epoch=1):
  for epoch, score in enumerate(curve, start=first_epoch):
    reason = stopper.update(epoch, score)
    if reason:
      return epoch, reason
  return None, None


def test_stops_at_the_right_epoch_with_the_reason():
  s = EarlyStopping(patience=3, max_epochs=100)
  epoch, reason = run(s, CURVE)
  # a tie (61 at epoch 6) is not an improvement: epochs 5, 6, 7 without -> stop after 7
  assert (epoch, reason) == (7, "patience")
  assert s.best == 61.0 and s.best_epoch == 4 and s.epochs_without_improvement == 3
  assert "has not improved for 3 epochs" in s.describe("R@5") and "epoch 4" in s.describe()


def test_cap_and_no_patience():
  s = EarlyStopping(patience=0, max_epochs=5)
  assert run(s, CURVE) == (5, "max_epochs")
  assert "cap of 5 epochs" in s.describe()
  s = EarlyStopping(patience=10, max_epochs=0)
  assert run(s, CURVE) == (None, None) and s.stop_reason is None


def test_resumes_mid_patience_with_the_same_decision():
  """The state saved after each epoch, restored into a fresh stopper, gives the
  same stop epoch as the uninterrupted run, from any interruption point."""
  reference = EarlyStopping(patience=3, max_epochs=100)
  want = run(reference, CURVE)
  for cut in range(1, 7):
    first = EarlyStopping(patience=3, max_epochs=100)
    assert run(first, CURVE[:cut]) == (None, None)
    saved = first.state_dict()
    resumed = EarlyStopping.from_state(saved, patience=3, max_epochs=100)
    assert resumed.epochs_without_improvement == first.epochs_without_improvement
    assert run(resumed, CURVE[cut:], first_epoch=cut + 1) == want
    assert resumed.best_epoch == reference.best_epoch


def test_a_stopped_state_stays_stopped_and_a_larger_patience_goes_on():
  s = EarlyStopping(patience=3, max_epochs=100)
  run(s, CURVE)
  again = EarlyStopping.from_state(s.state_dict(), patience=3, max_epochs=100)
  assert again.stop_reason == "patience"
  more = EarlyStopping.from_state(s.state_dict(), patience=5, max_epochs=100)
  assert more.stop_reason is None
  assert run(more, [59.0, 58.0], first_epoch=8) == (9, "patience")


def test_epoch_zero_competes_and_order_is_checked():
  s = EarlyStopping(patience=2, max_epochs=10)
  s.update(0, 80.0)                      # the starting weights (train.eval_at_start)
  assert s.update(1, 70.0) is None
  assert s.update(2, 75.0) == "patience" and s.best_epoch == 0
  with pytest.raises(ValueError, match="epoch 2 validated after epoch 2"):
    s.update(2, 1.0)
  assert EarlyStopping().state_dict()["best"] is None
  assert EarlyStopping.from_state({}, 3, 10).best == -math.inf


def test_selection_score_and_its_tie_break():
  val = {"val_R@1": 40.0, "val_R@5": 90.0}
  assert early_stopping.selection_score(val) == pytest.approx(90.0 + 1e-6 * 40.0)
  assert early_stopping.selection_score(val, "R@1") == pytest.approx(40.0 + 1e-6 * 90.0)
  assert early_stopping.selection_score({"R@1": 1.0, "R@5": 2.0}) == pytest.approx(2.000001)
  # equal R@5, better R@1 -> a higher score; an R@5 gain of one query in
  # 100,000 (0.001 points) outweighs any R@1
  assert early_stopping.selection_score({"val_R@1": 41.0, "val_R@5": 90.0}) > \
      early_stopping.selection_score(val)
  assert early_stopping.selection_score({"val_R@1": 0.0, "val_R@5": 90.001}) > \
      early_stopping.selection_score({"val_R@1": 100.0, "val_R@5": 90.0})
  with pytest.raises(ValueError, match="train.select_metric"):
    early_stopping.selection_score(val, "R@10")


def test_stopping_extension_only_for_a_more_patient_rule():
  """config_lib.stopping_extension: which field changes let a stopped stage go
  on from its latest checkpoint."""
  from structvpr_jax.config_lib import stopping_extension
  base = {"data.image_size": [64, 80], "train.epoch_queries": 100, "train.patience": 3,
          "train.max_epochs": 30, "train.lr_schedule": "constant", "train.learning_rate": 1e-4}
  stopped = {"stop_reason": "patience", "epochs": 18}
  more = dict(base, **{"train.patience": 8})
  assert stopping_extension(base, more, stopped) == "patience 3 -> 8"
  assert stopping_extension(base, more, None) == "patience 3 -> 8"        # unfinished
  # the stage's own override counts as the field ("rgb.patience" over "train.")
  override = {k: v for k, v in base.items() if k != "train.patience"}
  override["rgb.patience"] = 8
  assert stopping_extension(base, override, stopped) == "patience 3 -> 8"
  assert stopping_extension(base, dict(base, **{"train.patience": 0}), stopped) == "patience 3 -> 0"
  assert stopping_extension(base, dict(more, **{"train.max_epochs": 60}), stopped) == (
      "patience 3 -> 8, max_epochs 30 -> 60")
  # not: a less patient rule, the same rule, another field, a cap under cosine,
  # a step budget, a stage that stopped otherwise
  assert stopping_extension(base, dict(base, **{"train.patience": 2}), stopped) is None
  assert stopping_extension(base, dict(base, **{"train.max_epochs": 20}), stopped) is None
  assert stopping_extension(base, base, stopped) is None
  assert stopping_extension(base, dict(more, **{"train.learning_rate": 3e-4}), stopped) is None
  cosine = dict(base, **{"train.lr_schedule": "cosine"})
  assert stopping_extension(cosine, dict(cosine, **{"train.max_epochs": 60}), stopped) is None
  assert stopping_extension(cosine, dict(cosine, **{"train.patience": 8}), stopped) == (
      "patience 3 -> 8")
  steps = dict(base, **{"train.epoch_queries": 0})
  assert stopping_extension(steps, dict(steps, **{"train.patience": 8}), stopped) is None
  assert stopping_extension(base, more, {"stop_reason": "num_steps"}) is None
  assert stopping_extension({**base, "train.patience": 0}, more, stopped) is None
