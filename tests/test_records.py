"""Pre-resized ArrayRecord input (data.format="array_record") and the Grain
triplet stream: same bytes as the folder, checkpointable position, clear
errors, nothing half-written."""

import dataclasses
import os

import numpy as np
import pytest

from structvpr_jax import files, mining
from structvpr_jax.data import input_pipeline, layout, records
from test_input_pipeline import describe_by_mean, write_layout

SIZE = (16, 16)


def miner_of(split, seed=5, refresh_every=4):
  return mining.NegativeMiner(split.query_utm, split.database_utm, num_negatives=2,
                              refresh_every=refresh_every, seed=seed)


def batches(split, *, seed=5, cache_bytes=None, batch_size=2, rows=(0, 1), prefetch=2,
            epoch=0, start=0):
  images = input_pipeline.SplitImages(split, SIZE, views=("rgb", "seg"), num_classes=19,
                                      cache=cache_bytes != 0, cache_bytes=cache_bytes)
  images.prepare()
  batcher = input_pipeline.TripletBatcher(miner_of(split, seed), images, batch_size,
                                          prefetch=prefetch, num_threads=2,
                                          process_index=rows[0], process_count=rows[1])
  return batcher, list(batcher.epoch(epoch, describe_by_mean(images), start))


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_export_holds_the_folder_bytes_and_is_reused(tmp_path, capsys):
  split = write_layout(tmp_path / "data")
  root = str(tmp_path / "data")
  out = records.export(root, SIZE, progress=False)
  assert out == records.default_dir(root, SIZE) == os.path.join(root, "records", "16x16")
  manifest = records.read_manifest(out)
  assert manifest["splits"]["train_database"]["count"] == 12
  assert manifest["splits"]["train_queries"]["seg"] is True
  recs = records.open_split(split, out, SIZE)
  for role, paths, segs in (("database", split.database_paths, split.database_seg_paths),
                            ("queries", split.query_paths, split.query_seg_paths)):
    for i in (0, len(paths) - 1):
      rgb, seg = recs[role].read(i)
      np.testing.assert_array_equal(rgb, input_pipeline.read_rgb(paths[i], SIZE))
      np.testing.assert_array_equal(seg, input_pipeline.read_labels(segs[i], SIZE, 19))
  # a second export of the same files is reused, not rewritten
  mtime = os.path.getmtime(os.path.join(out, "manifest.json"))
  assert records.export(root, SIZE, progress=False) == out
  assert "reused" in capsys.readouterr().out
  assert os.path.getmtime(os.path.join(out, "manifest.json")) == mtime


@pytest.mark.parametrize("cache_bytes", [None, 0])
def test_records_folder_cached_and_streamed_batches_are_identical(tmp_path, cache_bytes):
  split = write_layout(tmp_path / "data")
  _, ref = batches(split)                                     # folder, decoded up front
  out = records.export(str(tmp_path / "data"), SIZE, progress=False)
  from_records = dataclasses.replace(split, records=out)
  _, got = batches(from_records, cache_bytes=cache_bytes)     # records, cached or streamed
  assert_same(ref, got)
  _, streamed = batches(split, cache_bytes=0, prefetch=0)     # folder, no cache, no threads
  assert_same(ref, streamed)


def test_records_that_no_longer_match_the_layout_are_refused(tmp_path):
  root = str(tmp_path / "data")
  split = write_layout(root)
  out = records.export(root, SIZE, progress=False)
  with pytest.raises(ValueError, match="16x16 but data.image_size is 8x8"):
    records.open_split(split, out, (8, 8))
  # a label map rewritten under the same name (e.g. the segmenter run again)
  seg = split.database_seg_paths[3]
  files.save_image(seg, np.full((20, 24), 7, np.uint8))
  st = os.stat(seg)
  os.utime(seg, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
  with pytest.raises(ValueError, match="or its files changed"):
    records.open_split(split, out, SIZE)
  with pytest.raises(ValueError, match="exists and is not an export"):
    records.export(root, SIZE, progress=False)
  import shutil
  shutil.rmtree(out)
  out = records.export(root, SIZE, progress=False)           # exported again: accepted
  records.open_split(split, out, SIZE)
  extra = layout.format_name(0.0, 500.0)
  files.save_image(os.path.join(root, "images", "train", "database", extra),
                   np.zeros((20, 24, 3), np.uint8))
  files.save_image(os.path.join(root, "segmentations", "train", "database",
                                extra[:-4] + ".png"), np.zeros((20, 24), np.uint8))
  changed = layout.read_split(root, "train")
  with pytest.raises(ValueError, match="hold 12 images but the layout folder now lists 13"):
    input_pipeline.SplitImages(dataclasses.replace(changed, records=out), SIZE)
  with pytest.raises(ValueError, match="exists and is not an export"):
    records.export(root, SIZE, progress=False)
  with pytest.raises(ValueError, match="no manifest.json"):
    records.read_manifest(str(tmp_path))


def test_an_export_that_fails_names_the_file_and_leaves_nothing(tmp_path):
  root = str(tmp_path / "data")
  split = write_layout(root)
  with open(split.query_paths[2], "wb") as f:
    f.write(b"broken")
  with pytest.raises(ValueError, match=os.path.basename(split.query_paths[2])):
    records.export(root, SIZE, progress=False)
  assert not os.path.exists(os.path.join(root, "records", "16x16"))
  assert os.listdir(os.path.join(root, "records")) == []


def test_records_without_label_maps_refuse_the_seg_view(tmp_path):
  root = str(tmp_path / "data")
  split = write_layout(root, labels=False)
  out = records.export(root, SIZE, progress=False)
  assert records.read_manifest(out)["splits"]["train_database"]["seg"] is False
  images = input_pipeline.SplitImages(dataclasses.replace(split, records=out), SIZE,
                                      views=("rgb",), cache=False)
  assert images.get("database", [0])["rgb"].shape == (1, 16, 16, 3)
  with pytest.raises(ValueError, match="records hold none"):
    images.sources["database"].get("seg", [0])


def test_iterator_position_round_trips_mid_chunk(tmp_path):
  """Stop after k batches (inside a chunk), keep `state()`, start a new
  batcher there (mining state restored as a checkpoint would): the remaining
  batches equal the uninterrupted epoch's, for every k."""
  split = write_layout(tmp_path / "data", n_db=16, n_q=10)
  batcher, full = batches(split)
  per_epoch = batcher.steps_per_epoch()
  assert len(full) == per_epoch == 4                     # chunks of 4, 4, 2 queries
  for k in range(1, per_epoch):
    images = input_pipeline.SplitImages(split, SIZE, views=("rgb", "seg"), num_classes=19)
    first = input_pipeline.TripletBatcher(miner_of(split), images, 2, prefetch=2, num_threads=2)
    stream = first.epoch(0, describe_by_mean(images))
    for _ in range(k):
      next(stream)
    state = first.state()
    assert state == first.position_of(k), (k, state)
    saved_mining = first.miner.state_dict()
    stream.close()
    second = input_pipeline.TripletBatcher(miner_of(split), images, 2, prefetch=2,
                                           num_threads=2)
    second.miner.load_state_dict(saved_mining)
    rest = list(second.epoch(0, describe_by_mean(images), start_step=k))
    assert_same(full[k:], rest)
  assert batcher.state() == batcher.position_of(per_epoch) == {"epoch": 1, "chunk": 0,
                                                               "next_index": 0}


def test_processes_read_disjoint_rows_that_make_up_the_global_batch(tmp_path):
  split = write_layout(tmp_path / "data", n_db=16, n_q=10)
  _, whole = batches(split, batch_size=4)
  parts = [batches(split, batch_size=4, rows=(p, 2))[1] for p in range(2)]
  assert len(whole) == len(parts[0]) == len(parts[1]) > 0
  for w, p0, p1 in zip(whole, *parts):
    for k in w:
      np.testing.assert_array_equal(w[k], np.concatenate([p0[k], p1[k]]), err_msg=k)
  with pytest.raises(ValueError, match="does not divide by the 3 processes"):
    input_pipeline.local_rows(4, 0, 3)


def test_a_train_only_export_serves_train_and_leaves_val_to_the_files(tmp_path):
  """`export-records --splits train`: the run reads train from records and
  decodes val from the files; the data stage reuses the partial export."""
  import ml_collections
  from structvpr_jax import config_lib
  from structvpr_jax.data import convert
  from structvpr_jax.stages import data as data_stage
  root = str(tmp_path / "data")
  write_layout(root)
  val = write_layout(tmp_path / "valroot")            # a val split: copy train's files
  import shutil
  for tree in ("images", "segmentations"):
    shutil.copytree(os.path.join(tmp_path, "valroot", tree, "train"),
                    os.path.join(root, tree, "val"))
  assert convert.main(["export-records", "--root", root, "--image-size", "16,16",
                       "--splits", "train"]) == 0
  config = ml_collections.ConfigDict({"data": {"format": "array_record", "image_size": SIZE,
                                               "num_threads": 1}})
  assert config_lib.read_split(config, root, "train").records == records.default_dir(root, SIZE)
  assert config_lib.read_split(config, root, "val").records is None
  data_stage.ensure_records(config, root)                   # reused, not refused
  assert sorted(records.read_manifest(records.default_dir(root, SIZE))["splits"]) == [
      "train_database", "train_queries"]
  assert val.num_database == 12


@pytest.mark.slow
def test_pitts30k_config_runs_the_pipeline_from_records(tmp_path):
  """configs/pitts30k.py:smoke on a layout folder (the smoke synthetic city
  standing in for datasets/pitts30k): the data stage exports the records,
  every stage reads them, the test descriptors stream to disk."""
  import json
  import subprocess
  import sys
  from structvpr_jax.data import synthetic
  root = str(tmp_path / "pitts30k")
  synthetic.generate(root, seed=0, image_size=(64, 80),
                     num_places={"train": 24, "val": 12, "test": 12}, queries_per_place=1)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  work = str(tmp_path / "run")
  proc = subprocess.run([sys.executable, "-m", "structvpr_jax.main",
                         "--config=configs/pitts30k.py:smoke", f"--workdir={work}",
                         f"--config.data.root={root}"], cwd=repo, capture_output=True, text=True,
                        timeout=1200, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "export-records:" in proc.stdout
  manifest = records.read_manifest(os.path.join(root, "records", "64x80"))
  assert sorted(manifest["splits"]) == sorted(f"{s}_{r}" for s in layout.SPLITS
                                              for r in layout.ROLES)
  with open(os.path.join(work, "eval", "test", "recalls.json")) as f:
    rec = json.load(f)
  store = os.path.join(work, "eval", "test", "descriptors", "distill")
  db = np.load(os.path.join(store, "database.npy"), mmap_mode="r")
  assert db.shape == (rec["num_database"], rec["descriptor_dim"])
  assert 0.0 <= rec["R@1"] <= rec["R@5"] <= 100.0
