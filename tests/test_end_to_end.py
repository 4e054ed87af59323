"""The whole StructVPR pipeline on the smoke config, through the CLI.

Runs `python -m structvpr_jax.main` in subprocesses (as a user would):
stage 1 RGB and seg separately, then the distill pipeline (which must skip
them), evaluation from the checkpoint alone, a rerun that skips everything,
and the same pipeline on 8 simulated devices.
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 8 triplets per step so the global batch divides by 8 devices too.
COMMON = ["--config.train.batch_size=8", "--config.train.refresh_every=8",
          "--config.train.log_every=1"]

pytestmark = pytest.mark.slow


def main(config, workdir, *extra, devices=1, cache=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, "-m", "structvpr_jax.main", f"--config={config}",
         f"--workdir={workdir}", *COMMON, *extra]
  if cache:
    cmd.append(f"--config.compilation_cache={cache}")
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return proc.stdout


def tree_hash(folder):
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(folder)):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      h.update(os.path.relpath(path, folder).encode())
      with open(path, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def run1(tmp_path_factory, cache):
  workdir = str(tmp_path_factory.mktemp("smoke1"))
  logs = {}
  logs["rgb"] = main("configs/rgb.py:smoke", workdir, cache=cache)
  logs["seg"] = main("configs/seg.py:smoke", workdir, cache=cache)
  logs["seg_hash"] = tree_hash(os.path.join(workdir, "seg"))
  logs["distill"] = main("configs/distill.py:smoke", workdir, cache=cache)
  return workdir, logs


def test_artifacts_exist_and_parse(run1):
  workdir, logs = run1
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["mode"] == "structvpr"
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  stages = {r["stage"] for r in records}
  assert stages == {"rgb", "seg", "distill"}
  train = [r for r in records if "loss" in r]
  assert all(np.isfinite(r["loss"]) and r["img_s"] > 0 and "lr" in r for r in train)
  assert any(r.get("event") == "val" and "val_R@5" in r for r in records)
  assert any("kd" in r for r in train if r["stage"] == "distill")
  for stage in ("rgb", "seg", "distill"):
    with open(os.path.join(workdir, stage, "done.json")) as f:
      done = json.load(f)
    assert os.path.isdir(done["checkpoint"])
  part = np.load(os.path.join(workdir, "partition", "partition.npz"))
  assert set(part.files) == {"groups", "weights", "teacher_margin", "student_margin",
                             "teacher_rank", "student_rank"}
  assert part["groups"].dtype == np.int8 and part["weights"].dtype == np.float32
  assert np.all((part["weights"] >= 0) & (part["weights"] <= 1))
  assert np.all(part["weights"][part["groups"] >= 3] == 0)   # teacher wrong -> weight 0
  with open(os.path.join(workdir, "partition", "summary.json")) as f:
    summary = json.load(f)
  assert sum(summary[g]["count"] for g in ("excluded", "D1", "D2", "D3", "D4")) == \
      len(part["groups"])
  Image.open(os.path.join(workdir, "partition", "groups.png")).verify()
  with open(os.path.join(workdir, "eval", "test", "recalls.json")) as f:
    rec = json.load(f)
  for key in ("R@1", "R@5", "R@10", "R@20", "num_queries", "num_database", "branch",
              "checkpoint"):
    assert key in rec
  assert 0 <= rec["R@1"] <= rec["R@5"] <= rec["R@10"] <= rec["R@20"] <= 100
  with open(os.path.join(workdir, "eval", "summary.json")) as f:
    table = json.load(f)["branches"]
  assert set(table) == {"rgb", "seg", "distill"}
  assert set(table["rgb"]["per_condition"]) == {"dusk", "night", "fog", "repaint"}
  assert "| StructVPR-distilled RGB |" in logs["distill"]


def test_report_artifacts_are_valid(run1):
  """report.md and every picture it links exist and decode."""
  import re
  workdir, _ = run1
  for rel in ("eval/recall_at_n.png", "eval/examples.png", "training_curves.png",
              "partition/groups.png", "data/montage.png"):
    with Image.open(os.path.join(workdir, rel)) as im:
      im.verify()
    with Image.open(os.path.join(workdir, rel)) as im:
      assert im.size[0] > 200 and im.size[1] > 100, rel
  with open(os.path.join(workdir, "report.md")) as f:
    md = f.read()
  assert "| StructVPR-distilled RGB |" in md and "| D2 |" in md
  links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
  assert set(links) == {"eval/recall_at_n.png", "eval/examples.png", "partition/groups.png",
                        "training_curves.png", "data/montage.png"}


def test_extract_and_localize(run1, tmp_path, cache):
  workdir, _ = run1
  db = os.path.join(workdir, "data", "images", "test", "database")
  out = str(tmp_path / "extract")
  main("configs/extract.py", out, f"--config.checkpoint={workdir}/distill/checkpoints",
       f"--config.extract.images={db}", cache=cache)
  desc = np.load(os.path.join(out, "descriptors", "descriptors.npy"))
  names = open(os.path.join(out, "descriptors", "names.txt")).read().split()
  assert desc.shape[0] == len(names) == len(os.listdir(db))
  np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1.0, rtol=1e-5)
  # Localise a test query: the first run describes the database, the second reuses it.
  qdir = os.path.join(workdir, "data", "images", "test", "queries")
  query = os.path.join(qdir, sorted(os.listdir(qdir))[0])
  loc = str(tmp_path / "loc")
  args = ["configs/localize.py", loc, f"--config.checkpoint={workdir}/distill/checkpoints",
          f"--config.localize.database={workdir}/data", f"--config.localize.query={query}",
          "--config.localize.top_k=3"]
  first = main(*args, cache=cache)
  again = main(*args, cache=cache)
  assert "described in" in first and "cached in" in again
  jsons = [n for n in os.listdir(loc) if n.startswith("localize_") and n.endswith(".json")]
  assert len(jsons) == 1
  with open(os.path.join(loc, jsons[0])) as f:
    result = json.load(f)
  assert result["query"] == os.path.abspath(query)
  assert [m["rank"] for m in result["matches"]] == [1, 2, 3]
  row = desc[names.index(os.path.basename(result["matches"][0]["image"]))]
  assert np.isfinite(row).all()
  pngs = [n for n in os.listdir(loc) if n.startswith("localize_") and n.endswith(".png")]
  assert len(pngs) == 1
  Image.open(os.path.join(loc, pngs[0])).verify()


def test_distill_skips_finished_stage1_and_leaves_teacher_untouched(run1):
  workdir, logs = run1
  assert "[rgb] already finished" in logs["distill"]
  assert "[seg] already finished" in logs["distill"]
  assert tree_hash(os.path.join(workdir, "seg")) == logs["seg_hash"]


def test_eval_from_checkpoint_alone_reproduces_recall(run1, tmp_path, cache):
  workdir, _ = run1
  out = str(tmp_path / "eval_only")
  main("configs/eval.py", out, f"--config.checkpoint={workdir}/distill/checkpoints",
       f"--config.data.root={workdir}/data", cache=cache)
  with open(os.path.join(out, "eval", "test", "recalls.json")) as f:
    again = json.load(f)
  with open(os.path.join(workdir, "eval", "test", "recalls.json")) as f:
    recorded = json.load(f)
  for k in ("R@1", "R@5", "R@10", "num_queries", "num_database"):
    assert again[k] == recorded[k], k
  assert again["descriptor_dim"] == recorded["descriptor_dim"] == 64   # 4 clusters x 16
  # per-query hits of the checkpoint: the pipeline's own file for the branch
  with open(os.path.join(out, "eval", "test", "per_query_distill.json")) as f:
    hits_again = json.load(f)
  with open(os.path.join(workdir, "eval", "test", "per_query_distill.json")) as f:
    hits_recorded = json.load(f)
  assert hits_again == hits_recorded
  assert 100 * np.mean(hits_again["hits"]["R@1"]) == pytest.approx(again["R@1"])
  # the same evaluation with PCA-whitening to 8 dims, fitted on the train split
  pca = str(tmp_path / "eval_pca")
  main("configs/eval.py", pca, f"--config.checkpoint={workdir}/distill/checkpoints",
       f"--config.data.root={workdir}/data", "--config.eval.pca_dim=8", cache=cache)
  with open(os.path.join(pca, "eval", "test", "recalls.json")) as f:
    whitened = json.load(f)
  assert whitened["descriptor_dim"] == 8
  assert whitened["num_queries"] == recorded["num_queries"]
  assert 0.0 <= whitened["R@1"] <= whitened["R@5"] <= whitened["R@10"] <= 100.0


def test_eval_streams_descriptors_to_disk_and_searches_in_blocks(run1, tmp_path, cache):
  """eval.descriptors=disk: descriptors stream to .npy files (float32: the
  recalls of the in-memory evaluation exactly, with the database searched 5
  rows at a time; float16: half the bytes, recalls still reported)."""
  workdir, _ = run1
  with open(os.path.join(workdir, "eval", "test", "recalls.json")) as f:
    recorded = json.load(f)
  for dtype in ("float32", "float16"):
    out = str(tmp_path / dtype)
    main("configs/eval.py", out, f"--config.checkpoint={workdir}/distill/checkpoints",
         f"--config.data.root={workdir}/data", "--config.eval.descriptors=disk",
         f"--config.eval.descriptor_dtype={dtype}", "--config.eval.search_block_rows=5",
         cache=cache)
    with open(os.path.join(out, "eval", "test", "recalls.json")) as f:
      again = json.load(f)
    store = os.path.join(out, "eval", "test", "descriptors", "distill")
    assert sorted(os.listdir(store)) == ["database.npy", "queries.npy"]   # no temporaries
    db = np.load(os.path.join(store, "database.npy"), mmap_mode="r")
    assert db.dtype == np.dtype(dtype) and db.shape == (recorded["num_database"], 64)
    assert again["num_queries"] == recorded["num_queries"]
    if dtype == "float32":
      for k in ("R@1", "R@5", "R@10", "R@20"):
        assert again[k] == recorded[k], k
    else:
      assert abs(again["R@5"] - recorded["R@5"]) <= 100.0 / recorded["num_queries"] + 1e-9


def test_two_folder_evaluation_as_vpr_users_type_it(run1, tmp_path, cache):
  """configs/eval.py on two plain folders: the count and recall lines, the same
  recalls as the layout form on the same images, preds/ and descriptors; and
  predictions only for unlabelled queries."""
  workdir, _ = run1
  test = os.path.join(workdir, "data", "images", "test")
  folders = {}
  for role in ("database", "queries"):      # plain folders (links), outside any layout
    folders[role] = str(tmp_path / f"{role}_plain")
    os.makedirs(folders[role])
    for name in os.listdir(os.path.join(test, role)):
      os.symlink(os.path.join(test, role, name), os.path.join(folders[role], name))
  out = str(tmp_path / "two_folders")
  log = main("configs/eval.py", out, f"--config.checkpoint={workdir}/distill/checkpoints",
             f"--config.eval.database_folder={folders['database']}",
             f"--config.eval.queries_folder={folders['queries']}",
             "--config.eval.num_preds_to_save=2", "--config.eval.save_descriptors=True",
             cache=cache)
  with open(os.path.join(workdir, "eval", "test", "recalls.json")) as f:
    recorded = json.load(f)
  q, n = recorded["num_queries"], recorded["num_database"]
  assert f"< #queries: {q}; #database: {n} >" in log
  line = ", ".join(f"R@{k}: {recorded[f'R@{k}']:.1f}" for k in (1, 5, 10, 20))
  assert line in log
  with open(os.path.join(out, "eval", "folders", "recalls.json")) as f:
    rec = json.load(f)
  assert rec["R@1"] == recorded["R@1"] and rec["radius"] == 25.0
  assert rec["image_size"] == rec["trained_image_size"] and len(rec["files_sha256"]) == 64
  preds = os.path.join(out, "eval", "folders", "preds")
  assert sorted(os.listdir(preds))[:2] == ["000.jpg", "000.txt"]
  assert len(os.listdir(preds)) == 2 * q
  img = np.asarray(Image.open(os.path.join(preds, "000.jpg")))
  h, w = rec["image_size"]
  assert img.shape == (h + 8, 3 * (w + 8), 3)                     # query + top-2, framed
  txt = open(os.path.join(preds, "000.txt")).read().splitlines()
  assert txt[0] == "query:" and txt[1].startswith(folders["queries"])
  assert len(txt[txt.index("predictions (nearest first):") + 1:][:2]) == 2
  db = np.load(os.path.join(out, "eval", "folders", "database_descriptors.npy"))
  assert db.shape == (n, rec["descriptor_dim"]) and db.dtype == np.float32
  # queries without UTM: predictions only
  nolabel = str(tmp_path / "nolabel_q")
  os.makedirs(nolabel)
  os.symlink(os.path.join(folders["queries"], sorted(os.listdir(folders["queries"]))[0]),
             os.path.join(nolabel, "photo.jpg"))
  log = main("configs/eval.py", str(tmp_path / "nolabels"),
             f"--config.checkpoint={workdir}/distill/checkpoints",
             f"--config.eval.database_folder={folders['database']}",
             f"--config.eval.queries_folder={nolabel}", "--config.eval.no_labels=True",
             "--config.eval.num_preds_to_save=3", cache=cache)
  assert f"< #queries: 1; #database: {n} >" in log and "predictions only" in log
  assert os.path.isfile(str(tmp_path / "nolabels" / "eval" / "folders" / "preds" / "000.txt"))
  # one folder alone is refused naming both fields
  proc = subprocess.run([sys.executable, "-m", "structvpr_jax.main", "--config=configs/eval.py",
                         f"--workdir={tmp_path / 'bad'}",
                         f"--config.checkpoint={workdir}/distill/checkpoints",
                         f"--config.eval.database_folder={folders['database']}"],
                        cwd=REPO, capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2 and "eval.queries_folder" in proc.stderr


def test_rerun_skips_every_stage(run1, cache):
  workdir, _ = run1
  lines = sum(1 for _ in open(os.path.join(workdir, "metrics.jsonl")))
  out = main("configs/distill.py:smoke", workdir, cache=cache)
  for stage in ("rgb", "seg", "distill"):
    assert f"[{stage}] already finished" in out
  assert "[partition] already finished" in out
  assert sum(1 for _ in open(os.path.join(workdir, "metrics.jsonl"))) == lines


def test_eight_devices_match_one_device(run1, tmp_path, cache):
  """Same command on 8 simulated devices.

  Initialisation, k-means, mining and data order are identical (extraction
  runs the same per-device program on any mesh), so the first step's loss
  and gradient norm agree to float32 rounding. After that, float32
  trajectories drift: the summation order of 8 shards differs, and Adam's
  first step moves every parameter by ~lr*sign(g), including entries whose
  gradient is rounding noise or a hinge at its kink. The step's maths is
  proved exact in float64 by test_parallel.py; here the final tables must
  exist and stay in the same range.
  """
  workdir, _ = run1
  eight = str(tmp_path / "eight")
  out = main("configs/distill.py:smoke", eight, devices=8, cache=cache)
  assert "on 8 device(s)" in out
  a = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  b = [json.loads(l) for l in open(os.path.join(eight, "metrics.jsonl"))]
  for stage in ("rgb", "seg"):
    first_a = next(r for r in a if r["stage"] == stage and r.get("step") == 1 and "loss" in r)
    first_b = next(r for r in b if r["stage"] == stage and r.get("step") == 1 and "loss" in r)
    np.testing.assert_allclose(first_b["loss"], first_a["loss"], rtol=1e-4, err_msg=stage)
    np.testing.assert_allclose(first_b["grad_norm"], first_a["grad_norm"], rtol=5e-3,
                               err_msg=stage)
  with open(os.path.join(eight, "eval", "summary.json")) as f:
    eight_table = json.load(f)["branches"]
  assert set(eight_table) == {"rgb", "seg", "distill"}
  for branch, rec in eight_table.items():
    assert 0 <= rec["R@1"] <= rec["R@5"] <= 100 and rec["num_queries"] > 0, branch


def test_other_settings_stop_and_rerun_from_redoes_stale_stages(run1, tmp_path, cache):
  """A command with other distill settings on a finished workdir stops before any
  compute naming each field; with rerun_from=partition the partition and stage 2
  are redone, stage 1 is kept, and the report states the settings of the results."""
  import shutil
  workdir, _ = run1
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy, symlinks=True)
  before = [json.loads(l) for l in open(os.path.join(copy, "metrics.jsonl"))]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  new = ["--config.distill.weighting=uniform", "--config.distill.lambda_kd=0.1",
         "--config.distill.kd=adaptor"]
  proc = subprocess.run([sys.executable, "-m", "structvpr_jax.main",
                         "--config=configs/distill.py:smoke", f"--workdir={copy}", *COMMON,
                         *new, f"--config.compilation_cache={cache}"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr[-3000:]
  err = proc.stderr.strip().splitlines()[-1]
  assert err.startswith("error: ")
  assert "distill.weighting: recorded 'sigmoid', now 'uniform'" in err
  assert "distill.lambda_kd: recorded 1.0, now 0.1" in err
  assert "distill.kd: recorded 'feature', now 'adaptor'" in err
  assert "rerun_from=partition" in err
  with open(os.path.join(copy, "config.json")) as f:     # the refused command left no trace
    assert json.load(f)["distill"]["weighting"] == "sigmoid"
  out = main("configs/distill.py:smoke", copy, *new, "--config.rerun_from=partition",
             cache=cache)
  assert "[rgb] already finished" in out and "[seg] already finished" in out
  assert "[partition] already finished" not in out and "[distill] already finished" not in out
  with open(os.path.join(copy, "partition", "summary.json")) as f:
    assert json.load(f)["config"]["distill.weighting"] == "uniform"
  with open(os.path.join(copy, "distill", "done.json")) as f:
    done = json.load(f)
  assert done["config"]["distill.lambda_kd"] == 0.1
  # the adaptor head trained with the student but is not part of its checkpoint:
  # it is kept beside the optimizer state (resume) only
  best = os.path.join(copy, "distill", "checkpoints", str(done["best_step"]))
  assert "kd_adaptor" not in open(os.path.join(best, "variables", "_METADATA")).read()
  assert "kd_adaptor" in open(os.path.join(best, "opt", "_METADATA")).read()
  from structvpr_jax import checkpoint
  spec, variables, _, _ = checkpoint.restore_variables(os.path.join(copy, "distill"))
  assert "kd_adaptor" not in variables["params"] and spec["view"] == "rgb"
  after = [json.loads(l) for l in open(os.path.join(copy, "metrics.jsonl"))]
  count = lambda recs, s: sum(r["stage"] == s for r in recs)
  assert count(after, "distill") == count(before, "distill")    # old stage-2 lines removed
  assert count(after, "rgb") == count(before, "rgb")
  with open(os.path.join(copy, "report.md")) as f:
    md = f.read()
  assert "weighting `uniform` (beta 10.0, lambda 0.1)" in md
  # report mode with the default command reads the records, not the command
  main("configs/distill.py:smoke", copy, "--config.mode=report", cache=cache)
  with open(os.path.join(copy, "report.md")) as f:
    assert "weighting `uniform` (beta 10.0, lambda 0.1)" in f.read()


def test_crossfit_partition_judges_each_fold_by_the_other(run1, tmp_path, cache):
  """distill.partition=crossfit trains stage 1 on each spatial fold and
  partitions every training query with the branches of the fold it is not in;
  the partition records the fold runs it read; a second command skips all."""
  import shutil
  from structvpr_jax import partition as partition_lib
  from structvpr_jax.data import layout
  workdir, _ = run1
  copy = str(tmp_path / "crossfit")
  shutil.copytree(workdir, copy, symlinks=True)
  flags = ["--config.distill.partition=crossfit", "--config.rerun_from=partition"]
  out = main("configs/distill.py:smoke", copy, *flags, cache=cache)
  assert "[rgb] already finished" in out and "cross-fitted" in out
  split = layout.read_split(os.path.join(copy, "data"), "train")
  q_fold, db_fold = partition_lib.crossfit_folds(split.query_utm, split.database_utm)
  for k in (0, 1):
    fold = layout.read_split(os.path.join(copy, "crossfit", f"fold{k}", "data"), "train",
                             require_segmentations=True)
    assert fold.num_queries == int(np.sum(q_fold == k)) > 0
    assert fold.num_database == int(np.sum(db_fold == k)) > 0
    assert layout.read_split(os.path.join(copy, "crossfit", f"fold{k}", "data"), "val") \
        .num_queries == layout.read_split(os.path.join(copy, "data"), "val").num_queries
    for branch in ("rgb", "seg"):
      assert os.path.exists(os.path.join(copy, "crossfit", f"fold{k}", branch, "done.json"))
  with open(os.path.join(copy, "partition", "summary.json")) as f:
    summary = json.load(f)
  assert summary["partition"] == "crossfit"
  assert summary["config"]["distill.partition"] == "crossfit"
  assert sorted(summary["consumed"]) == sorted(
      f"crossfit/fold{k}/{b}" for k in (0, 1) for b in ("rgb", "seg"))
  npz = np.load(os.path.join(copy, "partition", "partition.npz"))
  np.testing.assert_array_equal(npz["fold"], q_fold)
  assert len(npz["weights"]) == split.num_queries
  # the fold-0 branches rank the fold-1 queries against the fold-1 database only
  assert npz["teacher_rank"][q_fold == 1].max() <= 1 + np.sum(db_fold == 1)
  with open(os.path.join(copy, "distill", "done.json")) as f:
    assert json.load(f)["config"]["distill.partition"] == "crossfit"
  again = main("configs/distill.py:smoke", copy, "--config.distill.partition=crossfit",
               cache=cache)
  assert "[partition] already finished" in again and "[distill] already finished" in again


def test_teacher_at_chance_is_named_in_one_warning(tmp_path, cache):
  """A teacher forced to chance (every label map blank, as from a segmenter
  that fails on the images) against a student that cannot miss (each val
  query is a copy of its place's database image): the partition stage
  prints one warning line naming both branches' val R@1, and summary.json
  and report.md carry it."""
  import glob
  import shutil
  from structvpr_jax.data import layout, synthetic
  root = str(tmp_path / "data")
  synthetic.generate(root, seed=0, image_size=(64, 80),
                     num_places={"train": 24, "val": 12, "test": 12}, queries_per_place=1)
  db = {layout.parse_name(p)["pano_id"]: p
        for p in glob.glob(os.path.join(root, "images", "val", "database", "*.jpg"))}
  for q in glob.glob(os.path.join(root, "images", "val", "queries", "*.jpg")):
    shutil.copyfile(db[layout.parse_name(q)["pano_id"]], q)
  for png in glob.glob(os.path.join(root, "segmentations", "*", "*", "*.png")):
    blank = np.zeros_like(np.asarray(Image.open(png)))
    Image.fromarray(blank).save(png)
  work = str(tmp_path / "w")
  data = ["--config.data.name=folder", f"--config.data.root={root}"]
  outs = {mode: main("configs/distill.py:smoke", work, *data, f"--config.mode={mode}",
                     cache=cache)
          for mode in ("train_rgb", "train_seg", "partition", "report")}
  with open(os.path.join(work, "partition", "summary.json")) as f:
    summary = json.load(f)
  cmp = summary["val_teacher_vs_student"]
  # constant teacher descriptors: the search returns the first database rows,
  # right only where they lie within 25 m (a few neighbouring places)
  assert cmp["student"]["all"] == 100.0, cmp
  assert all(cmp["teacher"][k] < cmp["student"][k] for k in cmp["teacher"]), cmp
  assert cmp["teacher_better_on"] == []
  warning = summary["teacher_warning"]
  assert warning.startswith("warning: the seg teacher is not better than the RGB student")
  assert f"all {cmp['teacher']['all']:.1f} / 100.0" in warning
  with open(os.path.join(work, "report.md")) as f:
    assert warning in f.read()
  assert outs["partition"].count("[partition] warning: the seg teacher") == 1


def test_rerank_in_the_pipeline_eval_mode_and_localize(run1, tmp_path, cache):
  """eval.rerank=rss: every branch row gets a "+R" row (recalls, per-query
  hits, report.md) while the global rows keep their recalls; eval mode prints
  one line per stage, writes the +R hits and marks the re-ranked preds/ with
  the global rank; localize shows both ranks."""
  import shutil
  workdir, _ = run1
  copy = str(tmp_path / "rerank_run")
  shutil.copytree(workdir, copy, symlinks=True)
  main("configs/distill.py:smoke", copy, "--config.eval.rerank=rss", "--config.rerun_from=eval",
       cache=cache)
  with open(os.path.join(copy, "eval", "summary.json")) as f:
    table = json.load(f)["branches"]
  with open(os.path.join(workdir, "eval", "summary.json")) as f:
    recorded = json.load(f)["branches"]
  assert sorted(table) == ["distill", "distill+R", "rgb", "rgb+R", "seg", "seg+R"]
  for b in ("rgb", "seg", "distill"):
    assert table[b]["R@1"] == recorded[b]["R@1"]
    assert table[f"{b}+R"]["label"].endswith("+R")
    assert table[f"{b}+R"]["rerank"]["method"] == "rss"
    assert table[f"{b}+R"]["num_queries"] == recorded[b]["num_queries"]
    with open(os.path.join(copy, "eval", "test", f"per_query_{b}+R.json")) as f:
      hits = json.load(f)
    assert 100 * np.mean(hits["hits"]["R@1"]) == pytest.approx(table[f"{b}+R"]["R@1"])
  report = open(os.path.join(copy, "report.md")).read()
  assert "| StructVPR-distilled RGB +R |" in report
  # eval mode, layout form
  out = str(tmp_path / "eval_rerank")
  log = main("configs/eval.py", out, f"--config.checkpoint={workdir}/distill/checkpoints",
             f"--config.data.root={workdir}/data", "--config.eval.rerank=rss", cache=cache)
  line = ", ".join(f"R@{k}: {recorded['distill'][f'R@{k}']:.1f}" for k in (1, 5, 10, 20))
  assert f"{line} (global retrieval)" in log
  plus = ", ".join(f"R@{k}: {table['distill+R'][f'R@{k}']:.1f}" for k in (1, 5, 10, 20))
  assert f"{plus} (+R: rss re-ranking of the top 100" in log
  with open(os.path.join(out, "eval", "test", "recalls.json")) as f:
    rec = json.load(f)
  assert rec["rerank"]["R@1"] == table["distill+R"]["R@1"]
  assert os.path.isfile(os.path.join(out, "eval", "test", "per_query_distill+R.json"))
  # two folders, preds of the re-ranked top-2 marked with their global rank
  test = os.path.join(workdir, "data", "images", "test")
  out = str(tmp_path / "eval_rerank_folders")
  log = main("configs/eval.py", out, f"--config.checkpoint={workdir}/distill/checkpoints",
             f"--config.eval.database_folder={os.path.join(test, 'database')}",
             f"--config.eval.queries_folder={os.path.join(test, 'queries')}",
             "--config.eval.rerank=ransac", "--config.eval.num_preds_to_save=2", cache=cache)
  assert "(global retrieval)" in log and "(+R: ransac re-ranking" in log
  txt = open(os.path.join(out, "eval", "folders", "preds", "000.txt")).read().splitlines()
  first = txt.index("predictions (re-ranked top-K, best first; [global rank]):")
  assert all(t.endswith("]") for t in txt[first + 1:first + 3])
  # localize: the re-ranked top-3 with each one's global rank
  qdir = os.path.join(test, "queries")
  query = os.path.join(qdir, sorted(os.listdir(qdir))[0])
  loc = str(tmp_path / "loc_rerank")
  log = main("configs/localize.py", loc, f"--config.checkpoint={workdir}/distill/checkpoints",
             f"--config.localize.database={workdir}/data", f"--config.localize.query={query}",
             "--config.localize.top_k=3", "--config.eval.rerank=rss", cache=cache)
  assert "+R: rss re-ranking" in log and "global" in log
  jsons = [n for n in os.listdir(loc) if n.startswith("localize_") and n.endswith(".json")]
  with open(os.path.join(loc, jsons[0])) as f:
    result = json.load(f)
  assert [m["rank"] for m in result["matches"]] == [1, 2, 3]
  assert all(m["global_rank"] >= 1 for m in result["matches"])
