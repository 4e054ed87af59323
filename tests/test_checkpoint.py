"""Checkpoint preservation and best-step selection."""

import numpy as np

from structvpr_jax import checkpoint


def test_best_by_r5_then_r1_and_latest_kept(tmp_path):
  mngr = checkpoint.manager(str(tmp_path / "ckpt"))
  runs = {10: {"val_R@5": 90.0, "val_R@1": 60.0},
          20: {"val_R@5": 95.0, "val_R@1": 70.0},    # best: R@5 tie with 30, higher R@1
          30: {"val_R@5": 95.0, "val_R@1": 62.5},
          40: {"val_R@5": 80.0, "val_R@1": 50.0}}    # latest: kept for resume
  for step, metrics in runs.items():
    variables = {"params": {"w": np.full((2,), step, np.float32)}, "batch_stats": {}}
    checkpoint.save(mngr, step, variables, {"step": step, "metrics": metrics}, metrics=metrics)
  mngr.wait_until_finished()
  assert sorted(mngr.all_steps()) == [20, 40]
  assert checkpoint.best_step(mngr) == 20
  again = checkpoint.manager(str(tmp_path / "ckpt"), read_only=True)
  assert checkpoint.best_step(again) == 20


def test_selection_score_and_earliest_of_equal_scores(tmp_path):
  """With the fit loop's selection score recorded, it decides (here R@1
  selection, recorded as "select_score"); among equal scores the earliest step
  is the best, kept on disk and returned (a tie is no improvement, as for
  early stopping)."""
  from structvpr_jax import early_stopping
  mngr = checkpoint.manager(str(tmp_path / "ckpt"))
  runs = {4: {"val_R@5": 90.0, "val_R@1": 70.0},
          8: {"val_R@5": 99.0, "val_R@1": 60.0},
          12: {"val_R@5": 90.0, "val_R@1": 70.0},     # ties with step 4
          16: {"val_R@5": 50.0, "val_R@1": 10.0}}     # latest
  for step, metrics in runs.items():
    metrics = dict(metrics, select_score=early_stopping.selection_score(metrics, "R@1"))
    variables = {"params": {"w": np.full((2,), step, np.float32)}, "batch_stats": {}}
    checkpoint.save(mngr, step, variables, {"step": step, "metrics": metrics}, metrics=metrics)
  mngr.wait_until_finished()
  assert sorted(mngr.all_steps()) == [4, 16]
  assert checkpoint.best_step(mngr) == 4


def test_a_reopened_manager_keeps_the_best_checkpoint(tmp_path):
  """A resumed run reopens the manager: its next saves must still keep the
  best earlier checkpoint (ties: the earliest), as an uninterrupted run does.
  (Orbax does not read a BestN policy's metrics back: before the fix the
  first save after reopening deleted every earlier checkpoint.)"""
  def save(mngr, step, score):
    checkpoint.save(mngr, step, {"params": {"w": np.ones(2, np.float32)}, "batch_stats": {}},
                    {"step": step, "metrics": {"select_score": score}},
                    metrics={"select_score": score})

  for later, kept in ((80.0, [4, 8]), (83.0, [4, 8]), (90.0, [8])):
    d = str(tmp_path / f"later{later}")
    mngr = checkpoint.manager(d)
    save(mngr, 4, 83.0)
    save(mngr, 6, 75.0)
    reopened = checkpoint.manager(d)
    save(reopened, 8, later)
    assert reopened.all_steps() == kept, (later, reopened.all_steps())
    assert checkpoint.best_step(reopened) == kept[0]
    # and again after a second reopening
    again = checkpoint.manager(d)
    save(again, 10, 70.0)
    assert again.all_steps() == [kept[0], 10], (later, again.all_steps())
