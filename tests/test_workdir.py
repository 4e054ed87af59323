"""Stage records: a rerun with other settings stops naming each field; rerun_from redoes."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import distill  # noqa: E402
from structvpr_jax import config_lib, files  # noqa: E402
from structvpr_jax.workdir import Workdir  # noqa: E402


def finished(wd, stage, fields, consumed=None):
  wd.begin(stage, fields, consumed or {})
  return wd.finish(stage, {"best_step": 4}, fields, consumed or {})


def test_stage_fields_name_what_each_stage_depends_on():
  c = distill.get_config("smoke")
  rgb = config_lib.stage_fields(c, "rgb")
  assert rgb["rgb.width"] == 0.35 and rgb["train.num_steps"] == 4 and rgb["seed"] == 0
  assert "distill.weighting" not in rgb and "seg.slme" not in rgb
  seg = config_lib.stage_fields(c, "seg")
  assert seg["seg.slme"] == "slme" and seg["seg.learning_rate"] == 3e-4   # the override
  assert seg["seg.blocks"] is None and seg["seg.norm"] == "batch"   # () = default table
  assert rgb["rgb.init_resolved"] == "random" and seg["seg.init_resolved"] == "random"
  assert "train.learning_rate" not in seg
  part = config_lib.stage_fields(c, "partition")
  assert part["distill.weighting"] == "sigmoid" and "distill.lambda_kd" not in part
  dist = config_lib.stage_fields(c, "distill")
  assert dist["distill.lambda_kd"] == 1.0 and dist["rgb.dim"] == 16
  assert config_lib.stage_fields(c, "eval")["eval.ns"] == [1, 5, 10, 20]
  json.dumps(dist)     # JSON-plain: tuples became lists
  c.train.log_every = 7          # logging does not change results
  c.data.cache_gb = 0.5          # nor does the decoded-image cache
  c.data.format = "array_record"  # nor where the same pixels are read from
  c.eval.descriptors = "disk"     # nor where the descriptors are kept
  c.eval.search_block_rows = 100  # nor a blocked exact search
  c.eval.micro_batch = 2          # nor extracting in smaller chunks (float rounding)
  assert config_lib.stage_fields(c, "rgb") == rgb
  assert config_lib.stage_fields(c, "eval")["eval.descriptor_dtype"] == "float32"
  # settings added since that do change results are recorded
  assert rgb["model.fold_bn"] is True and rgb["train.augment"] == ""   # the default
  assert rgb["train.trainable_from"] == 0 and rgb["train.dtype"] == "float32"
  assert rgb["train.remat"] is False          # same values, other float rounding
  assert part["distill.partition"] == "stage1" and dist["distill.partition"] == "stage1"
  c.model.fold_bn = False
  assert config_lib.stage_fields(c, "rgb")["model.fold_bn"] is False


def test_check_stage_statuses(tmp_path):
  wd = Workdir(str(tmp_path))
  c = distill.get_config("smoke")
  fields = config_lib.stage_fields(c, "rgb")
  assert wd.begin("rgb", fields, {}) == "new"
  assert files.read_json(wd.stage_json("rgb"))["config"] == fields
  assert wd.check_stage("rgb", fields, {}) == "resume"
  done = wd.finish("rgb", {"best_step": 4}, fields, {})
  assert wd.check_stage("rgb", fields, {}) == "done"
  assert wd.run_id("rgb") == done["run_id"]
  c.rgb.width = 0.5
  c.train.num_steps = 9
  other = config_lib.stage_fields(c, "rgb")
  with pytest.raises(ValueError) as e:
    wd.check_stage("rgb", other, {})
  msg = str(e.value)
  assert "rgb.width: recorded 0.35, now 0.5" in msg
  assert "train.num_steps: recorded 4, now 9" in msg and "rerun_from=rgb" in msg
  assert wd.check_stage("rgb", other, {}, rerun_from="rgb") == "new"
  assert not os.path.exists(wd.stage_dir("rgb"))


def test_consumed_inputs_are_checked(tmp_path):
  wd = Workdir(str(tmp_path))
  c = distill.get_config("smoke")
  rgb = finished(wd, "rgb", config_lib.stage_fields(c, "rgb"))
  seg = finished(wd, "seg", config_lib.stage_fields(c, "seg"))
  part_fields = config_lib.stage_fields(c, "partition")
  consumed = wd.consumed(("rgb", "seg"))
  assert consumed == {"rgb": rgb["run_id"], "seg": seg["run_id"]}
  wd.finish("partition", {"D1": {"count": 1}}, part_fields, consumed,
            path=wd.partition_summary)
  files.save_npz(wd.partition_npz, weights=[1.0])
  assert wd.check_stage("partition", part_fields, consumed) == "done"
  # stage 1 seg redone: the partition read the old one
  seg2 = finished(wd, "seg", config_lib.stage_fields(c, "seg"))
  with pytest.raises(ValueError, match=f"input seg: read run {seg['run_id']}, now run "
                                       f"{seg2['run_id']}"):
    wd.check_stage("partition", part_fields, wd.consumed(("rgb", "seg")))
  with pytest.raises(ValueError, match="stage 'distill' has not finished"):
    wd.consumed(("distill",))


def test_preflight_names_every_stage_and_field_and_rerun_from_covers_later_stages(tmp_path):
  wd = Workdir(str(tmp_path))
  c = distill.get_config("smoke")
  for stage in ("rgb", "seg"):
    finished(wd, stage, config_lib.stage_fields(c, stage))
  finished(wd, "distill", config_lib.stage_fields(c, "distill"))
  c.distill.lambda_kd = 0.1
  c.seg.slme = "onehot"
  fields = {s: config_lib.stage_fields(c, s) for s in ("rgb", "seg", "distill")}
  with pytest.raises(ValueError) as e:
    wd.preflight(fields)
  msg = str(e.value)
  assert "stage 'seg'" in msg and "seg.slme: recorded 'slme', now 'onehot'" in msg
  assert "stage 'distill'" in msg and "distill.lambda_kd: recorded 1.0, now 0.1" in msg
  assert "stage 'rgb'" not in msg and "rerun_from=seg" in msg
  wd.preflight(fields, rerun_from="seg")          # covers seg and every later stage
  with pytest.raises(ValueError, match="stage 'seg'"):
    wd.preflight(fields, rerun_from="distill")


def test_remove_stage_drops_its_metrics_lines(tmp_path):
  wd = Workdir(str(tmp_path))
  writer = files.MetricsWriter(wd.metrics)
  for stage in ("rgb", "distill", "rgb"):
    writer.write({"stage": stage, "step": 1, "loss": 0.5})
  os.makedirs(wd.stage_dir("distill"))
  wd.remove_stage("distill")
  assert [r["stage"] for r in files.read_jsonl(wd.metrics)] == ["rgb", "rgb"]
  assert not os.path.exists(wd.stage_dir("distill"))


def test_stage_lock_makes_a_second_process_wait(tmp_path, capsys):
  """Another process holding a stage's lock: this one says it waits, and
  enters once the other releases it; a different stage is not blocked."""
  import subprocess
  import sys
  import time
  from structvpr_jax.workdir import Workdir
  wd = Workdir(str(tmp_path / "w"))
  with wd.stage_lock("rgb"):
    pass                                   # creates the lock file
  holder = subprocess.Popen(
      [sys.executable, "-c",
       "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
       "print('held', flush=True); time.sleep(2); print('releasing', flush=True); "
       "fcntl.flock(f, fcntl.LOCK_UN); time.sleep(1)", wd.path(".rgb.lock")],
      stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  with wd.stage_lock("seg"):
    pass                                   # not blocked by rgb's lock
  assert "waiting" not in capsys.readouterr().out
  t0 = time.monotonic()
  with wd.stage_lock("rgb"):
    waited = time.monotonic() - t0
    assert holder.stdout.readline().strip() == "releasing"
  out = capsys.readouterr().out
  # entered after the holder's 2 s (a lower bound: an ordering, not a speed check)
  assert "[rgb] waiting: another process is running stage rgb" in out and waited > 1.0
  holder.wait()


def test_rerun_of_a_linked_stage_drops_the_link_and_keeps_the_others_files(tmp_path):
  """An experiment links one workdir's stage into another (a shared stage 2).
  When the linking workdir reruns that stage with other settings, it must
  start empty (not resume the other's checkpoints through the link), and the
  other workdir keeps its results."""
  c = distill.get_config("smoke")
  owner, user = Workdir(str(tmp_path / "owner")), Workdir(str(tmp_path / "user"))
  fields = config_lib.stage_fields(c, "distill")
  finished(owner, "distill", fields)
  ckpt = os.path.join(owner.stage_dir("distill"), "checkpoints", "625")
  os.makedirs(ckpt)
  os.makedirs(user.root, exist_ok=True)
  os.symlink(owner.stage_dir("distill"), user.stage_dir("distill"))
  assert user.check_stage("distill", fields, {}) == "done"     # read through the link
  c.distill.lambda_kd = 0.0
  changed = config_lib.stage_fields(c, "distill")
  assert user.check_stage("distill", changed, {}, rerun_from="partition") == "new"
  assert not os.path.lexists(user.stage_dir("distill"))
  assert os.path.isdir(ckpt) and owner.check_stage("distill", fields, {}) == "done"
