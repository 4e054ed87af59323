"""Input pipeline: decoding, label checks, reproducible triplet batches."""

import os

import numpy as np
import pytest

from structvpr_jax import files, mining
from structvpr_jax.data import input_pipeline, layout
from structvpr_jax.models import spec as model_spec


def write_layout(root, n_db=12, n_q=6, hw=(20, 24), labels=True, seed=0):
  rng = np.random.default_rng(seed)
  for role, n, offset in (("database", n_db, 0.0), ("queries", n_q, 1.0)):
    img_dir, seg_dir = layout.split_folders(root, "train", role)
    for i in range(n):
      north = (i * 5.0 if role == "database" else i * 10.0) + offset
      name = layout.format_name(0.0, north, note="day" if role == "database" else "night")
      files.save_image(os.path.join(img_dir, name),
                       rng.integers(0, 255, hw + (3,), dtype=np.uint8))
      if labels:
        files.save_image(os.path.join(seg_dir, name[:-4] + ".png"),
                         rng.integers(0, 19, hw, dtype=np.uint8))
  return layout.read_split(str(root), "train")


def describe_by_mean(images):
  def describe(role, idx):
    x = images.get(role, idx, views=("rgb",))["rgb"].astype(np.float32)
    return x.reshape(len(x), -1)[:, :64] / 255.0
  return describe


def make_batcher(split, seed, views=("rgb", "seg"), size=(16, 16)):
  images = input_pipeline.SplitImages(split, size, views=views, num_classes=19)
  miner = mining.NegativeMiner(split.query_utm, split.database_utm, num_negatives=2,
                               refresh_every=4, seed=seed)
  return input_pipeline.TripletBatcher(miner, images, batch_size=2), images


def test_triplet_batches_shapes_and_reproducible(tmp_path):
  split = write_layout(tmp_path)
  runs = []
  for _ in range(2):
    batcher, images = make_batcher(split, seed=7)
    runs.append(list(batcher.epoch(0, describe_by_mean(images))))
  a, b = runs
  assert len(a) == batcher.steps_per_epoch() == 3 and len(a) == len(b)  # chunks of 4 + 2
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  batch = a[0]
  assert batch["rgb"].shape == (2, 4, 16, 16, 3) and batch["rgb"].dtype == np.uint8
  assert batch["seg"].shape == (2, 4, 16, 16) and batch["seg"].max() < 19
  # the rows are the query, its positive and its negatives, from the files
  q_img = input_pipeline.read_rgb(split.query_paths[batch["query_index"][0]], (16, 16))
  np.testing.assert_array_equal(batch["rgb"][0, 0], q_img)
  p_img = input_pipeline.read_rgb(split.database_paths[batch["positive_index"][0]], (16, 16))
  np.testing.assert_array_equal(batch["rgb"][0, 1], p_img)
  geo = np.abs(split.database_utm[batch["negative_index"][0], 1]
               - split.query_utm[batch["query_index"][0], 1])
  assert np.all(geo > 25)
  other, images = make_batcher(split, seed=8)
  c = list(other.epoch(0, describe_by_mean(images)))
  assert not np.array_equal(c[0]["query_index"], a[0]["query_index"]) or \
      not np.array_equal(c[1]["query_index"], a[1]["query_index"])


def test_resume_mid_epoch_gives_the_same_batches(tmp_path):
  split = write_layout(tmp_path)
  batcher, images = make_batcher(split, seed=1)
  full = list(batcher.epoch(0, describe_by_mean(images)))
  resumed_batcher, images2 = make_batcher(split, seed=1)
  resumed_batcher.miner.load_state_dict(batcher.miner.state_dict())
  tail = list(resumed_batcher.epoch(0, describe_by_mean(images2), start_step=1))
  assert len(tail) == len(full) - 1
  for x, y in zip(full[1:], tail):
    np.testing.assert_array_equal(x["rgb"], y["rgb"])


def test_last_chunk_shorter_than_a_batch_is_dropped_not_mined(tmp_path):
  # 5 usable queries, refresh every 4, batches of 2 -> chunks of 4 + 1: the
  # 1-query chunk makes no batch and must not reach the miner (it used to be
  # mined as an empty chunk, which failed)
  split = write_layout(tmp_path, n_q=5)
  batcher, images = make_batcher(split, seed=3)
  assert len(batcher.miner.train_queries) == 5
  mined = []
  describe = describe_by_mean(images)

  def counting(role, idx):
    mined.append((role, len(idx)))
    return describe(role, idx)

  batches = list(batcher.epoch(0, counting))
  assert len(batches) == batcher.steps_per_epoch() == 2
  assert [n for role, n in mined if role == "queries"] == [4]


def test_normalize_rgb():
  x = np.array([[0, 128, 255]], np.uint8)
  np.testing.assert_allclose(model_spec.normalize_rgb(x, "tflite"), [[-1, 128 / 127.5 - 1, 1]], atol=1e-6,
                             rtol=1e-6)
  out = np.asarray(model_spec.normalize_rgb(np.full((1, 3), 255, np.uint8), "imagenet"))
  np.testing.assert_allclose(out, [(1 - model_spec.IMAGENET_MEAN) / model_spec.IMAGENET_STD],
                             rtol=1e-6)


def test_bad_inputs_name_the_file(tmp_path):
  split = write_layout(tmp_path, labels=False)
  with pytest.raises(ValueError, match="needs label maps"):
    input_pipeline.SplitImages(split, (16, 16), views=("seg",))
  broken = tmp_path / "broken.jpg"
  broken.write_bytes(open(split.query_paths[0], "rb").read()[:100])
  with pytest.raises(ValueError, match="broken.jpg: cannot decode"):
    input_pipeline.read_rgb(str(broken), (16, 16))
  bad = tmp_path / "bad.png"
  files.save_image(str(bad), np.full((4, 4), 30, np.uint8))
  with pytest.raises(ValueError, match="bad.png: label id 30 >= number of classes 19"):
    input_pipeline.read_labels(str(bad), (4, 4), num_classes=19)
  with pytest.raises(ValueError, match="missing label map"):
    input_pipeline.read_labels(str(tmp_path / "nope.png"), (4, 4))
  rgb = tmp_path / "rgb.png"
  files.save_image(str(rgb), np.zeros((4, 4, 3), np.uint8))
  with pytest.raises(ValueError, match="single-channel"):
    input_pipeline.read_labels(str(rgb), (4, 4))


def test_lru_cache_stays_under_its_budget_least_recent_out():
  cache = input_pipeline.LruCache(max_bytes=300)
  a, b, c = (np.zeros(100, np.uint8) + i for i in range(3))
  for k, v in (("a", a), ("b", b), ("c", c)):
    cache.put(k, v)
  assert cache.bytes == 300 and len(cache) == 3
  cache.get("a")                                     # a is now the most recent
  cache.put("d", np.zeros(100, np.uint8))
  assert cache.get("b") is None and cache.get("a") is not None and cache.bytes == 300
  assert cache.evictions == 1
  cache.put("huge", np.zeros(301, np.uint8))         # larger than the budget: not kept
  assert cache.get("huge") is None and cache.bytes == 300
  unbounded = input_pipeline.LruCache()
  for i in range(50):
    unbounded.put(i, np.zeros(1000, np.uint8))
  assert len(unbounded) == 50 and unbounded.evictions == 0
  with pytest.raises(ValueError, match="budget"):
    input_pipeline.LruCache(-1)


@pytest.mark.parametrize("cache_bytes", [None, 2000, 0])
def test_bounded_and_no_cache_give_the_same_batches(tmp_path, cache_bytes):
  split = write_layout(tmp_path)
  ref_batcher, ref_images = make_batcher(split, seed=5)
  ref = list(ref_batcher.epoch(0, describe_by_mean(ref_images)))
  images = input_pipeline.SplitImages(split, (16, 16), views=("rgb", "seg"), num_classes=19,
                                      cache=cache_bytes != 0, cache_bytes=cache_bytes)
  how = images.prepare()
  assert how == ("decoded" if cache_bytes is None else "headers")
  miner = mining.NegativeMiner(split.query_utm, split.database_utm, num_negatives=2,
                               refresh_every=4, seed=5)
  batcher = input_pipeline.TripletBatcher(miner, images, batch_size=2)
  got = list(batcher.epoch(0, describe_by_mean(images)))
  assert len(got) == len(ref)
  for x, y in zip(ref, got):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  if cache_bytes:
    assert images.cache.bytes <= cache_bytes and images.cache.evictions > 0
  assert images.decoded_bytes() == 18 * 16 * 16 * 4


def test_header_check_names_bad_files_and_a_bad_body_is_named_when_used(tmp_path):
  split = write_layout(tmp_path)
  images = input_pipeline.SplitImages(split, (16, 16), views=("rgb", "seg"), num_classes=19,
                                      cache_bytes=1)
  # a file that is not an image at all fails the up-front header check
  not_image = split.database_paths[3]
  original = open(not_image, "rb").read()
  with open(not_image, "wb") as f:
    f.write(b"not a jpeg")
  with pytest.raises(ValueError, match=os.path.basename(not_image) + ": cannot decode"):
    images.prepare()
  # a JPEG cut short keeps a valid header: it passes, and is named when decoded
  with open(not_image, "wb") as f:
    f.write(original[:len(original) - 120])
  assert images.prepare() == "headers"
  with pytest.raises(ValueError, match=os.path.basename(not_image) + ": cannot decode"):
    images.get("database", [3])
  os.remove(split.database_seg_paths[0])
  with pytest.raises(ValueError, match="missing label map"):
    images.prepare()
