"""The ablation report's targets table, on hand-made per-query hits."""

import importlib.util
import os


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_ablation():
  spec = importlib.util.spec_from_file_location(
      "synthetic_structure", os.path.join(REPO, "experiments", "synthetic_structure.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def hits(night_right: int, day_right: int, n: int = 50) -> list:
  """n night queries then n day queries; the first k of each right."""
  return [1] * night_right + [0] * (n - night_right) + [1] * day_right + [0] * (n - day_right)


def record(seg_day: int, gate_val: float) -> dict:
  per_query = {
      "rgb": hits(25, 45),
      "seg": hits(45, seg_day),
      "triplet_only": hits(26, 45),      # +1 query over stage 1: converged
      "uniform": hits(26, 45),
      "sigmoid": hits(46, 45),           # +20 night queries over the control
      "gate": hits(50, 50),              # better on test, but worse on val
  }
  stages = {m: {"best_val": {"val_R@1": v}} for m, v in
            (("sigmoid", 90.0), ("gate", gate_val), ("triplet_only", 80.0))}
  return {"per_query": per_query, "conditions": ["night"] * 50 + ["day"] * 50,
          "stages": stages}



def test_targets_measure_each_claim_and_choose_the_weighting_on_val():
  ablation = load_ablation()
  records = {0: record(seg_day=40, gate_val=85.0), 1: record(seg_day=20, gate_val=88.0)}
  checks = ablation.target_checks(records, resamples=500)
  targets = {c["target"]: c for c in checks}
  assert len(targets) == 7
  converged = next(c for c in checks if c["target"].startswith("converged"))
  assert converged["met"] is True and converged["measured"].startswith("control − RGB +1.0")
  # teacher: (45 + 40) / 100 and (45 + 20) / 100 -> 85, 65: std 10
  stable = next(c for c in checks if "std of the teacher" in c["target"])
  assert stable["met"] is False and stable["measured"].startswith("std 10.0 over 2 seeds")
  native = next(c for c in checks if "NATIVE=0" in c["target"])
  assert native["met"] is None
  night = next(c for c in checks if c["target"].startswith("teacher beats"))
  assert night["met"] is True and night["measured"].count("seed") == 2
  # sigmoid is chosen on val (90 vs 86.5) although gate is better on test
  best = next(c for c in checks if c["target"].startswith("the best weighting (chosen"))
  assert best["measured"].startswith("sigmoid (best val R@1 sigmoid 90.0, gate 86.5): +20.0")
  assert best["met"] is True
  vs_uniform = next(c for c in checks if "uniform KD" in c["target"])
  assert vs_uniform["met"] is True and "+20.0" in vs_uniform["measured"]
  distilled_night = next(c for c in checks if c["target"].startswith("distilled night"))
  assert distilled_night["met"] is True and "+40.0" in distilled_night["measured"]


def test_targets_that_one_seed_or_an_equal_method_cannot_meet():
  ablation = load_ablation()
  rec = record(seg_day=40, gate_val=95.0)       # gate is chosen now, and it is the control + 0
  rec["per_query"]["gate"] = list(rec["per_query"]["triplet_only"])
  rec["per_query"]["seg"] = hits(25, 40)        # teacher no better than the student at night
  checks = ablation.target_checks({3: rec}, resamples=500)
  stable = next(c for c in checks if "std of the teacher" in c["target"])
  assert stable["met"] is None                  # one seed: no spread to measure
  night = next(c for c in checks if c["target"].startswith("teacher beats"))
  assert night["met"] is False and "seed 3 +0.0" in night["measured"]
  best = next(c for c in checks if c["target"].startswith("the best weighting (chosen"))
  assert best["measured"].startswith("gate") and best["met"] is False
  assert next(c for c in checks if c["target"].startswith("distilled night"))["met"] is False


def test_robustness_target_reads_the_largest_gap():
  ablation = load_ablation()
  records = {0: record(seg_day=40, gate_val=85.0)}
  robustness = {"rgb": {"this": {"0": 70.0}, "other": {"0": 73.5}},
                "seg": {"this": {"0": 85.0}, "other": {"0": 84.0}}}
  checks = ablation.target_checks(records, resamples=200, robustness=robustness)
  native = next(c for c in checks if "NATIVE=0" in c["target"])
  assert native["met"] is False and native["measured"] == "largest gap 3.5 (rgb, seed 0)"
  robustness["rgb"]["other"]["0"] = 72.0
  native = next(c for c in ablation.target_checks(records, 200, robustness)
                if "NATIVE=0" in c["target"])
  assert native["met"] is True


def test_val_curve_reads_each_epoch_once_and_only_the_recorded_run(tmp_path):
  from structvpr_jax import files
  from structvpr_jax.workdir import Workdir
  ablation = load_ablation()
  wd = Workdir(str(tmp_path))
  writer = files.MetricsWriter(wd.metrics)
  for epoch, r1 in ((0, 92.2), (1, 90.0), (2, 88.0), (2, 89.0), (3, 91.0)):   # 2 again: a resume
    writer.write({"event": "val", "stage": "distill", "epoch": epoch, "val_R@1": r1})
  writer.write({"event": "val", "stage": "rgb", "epoch": 1, "val_R@1": 50.0})
  writer.write({"stage": "distill", "epoch": 1, "loss": 0.1})
  curve = [[0, 92.2], [1, 90.0], [2, 89.0], [3, 91.0]]
  assert ablation.val_curve(wd, "distill") == curve
  same_run = {"epochs": 3, "best_epoch": 0, "best_val": {"val_R@1": 92.2}}
  assert ablation.recorded_curve(same_run, wd) == curve
  # a record of another run in that workdir (another stopping epoch) gets none
  assert ablation.recorded_curve({**same_run, "epochs": 16}, wd) == []
  assert ablation.recorded_curve({**same_run, "val_curve": [[0, 1.0]]}, wd) == [[0, 1.0]]


def test_a_val_tie_is_broken_by_the_trained_epochs_mean_on_val():
  """Every variant kept its start (the same best val): the weighting whose
  trained epochs read higher on val is the one tested, never test's."""
  ablation = load_ablation()
  records = {0: record(seg_day=40, gate_val=90.0)}          # sigmoid 90.0 = gate 90.0
  curves = {0: {"sigmoid": [[0, 90.0], [1, 88.0], [2, 86.0]],
                "gate": [[0, 90.0], [1, 89.0], [2, 88.0]]}}
  best = next(c for c in ablation.target_checks(records, 200, curves=curves)
              if c["target"].startswith("the best weighting (chosen"))
  assert best["measured"].startswith(
      "gate (best val R@1 sigmoid 90.0, gate 90.0; mean over trained epochs sigmoid 87.0, "
      "gate 88.5): +29.0")
  curves[0]["sigmoid"] = [[0, 90.0], [1, 89.5], [2, 89.0]]
  best = next(c for c in ablation.target_checks(records, 200, curves=curves)
              if c["target"].startswith("the best weighting (chosen"))
  assert best["measured"].startswith("sigmoid")


def test_val_curve_of_a_linked_stage_reads_the_workdir_it_belongs_to(tmp_path):
  from structvpr_jax import files
  from structvpr_jax.workdir import Workdir
  ablation = load_ablation()
  owner, user = Workdir(str(tmp_path / "select")), Workdir(str(tmp_path / "sigmoid"))
  os.makedirs(owner.stage_dir("distill"))
  os.makedirs(user.root)
  os.symlink(owner.stage_dir("distill"), user.stage_dir("distill"))
  files.MetricsWriter(owner.metrics).write({"event": "val", "stage": "distill", "epoch": 0,
                                            "val_R@1": 50.0})
  assert ablation.val_curve(user, "distill") == [[0, 50.0]]
