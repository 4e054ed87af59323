"""Training augmentation: crop-resize against a numpy reference, the same box
for RGB and label maps, colour-jitter invariants, and the train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structvpr_jax import augment, parallel, train_lib
from structvpr_jax.models import spec as model_spec


def ref_bilinear(img, box):
  """Plain-numpy bilinear resampling of a box back to the full size."""
  h, w = img.shape[:2]
  y0, x0, ch, cw = box
  out = np.zeros_like(img, dtype=np.float64)
  for i in range(h):
    for j in range(w):
      y = min(max(y0 + (i + 0.5) * ch / h - 0.5, 0), h - 1)
      x = min(max(x0 + (j + 0.5) * cw / w - 0.5, 0), w - 1)
      ya, xa = int(np.floor(y)), int(np.floor(x))
      yb, xb = min(ya + 1, h - 1), min(xa + 1, w - 1)
      fy, fx = y - ya, x - xa
      out[i, j] = ((1 - fy) * ((1 - fx) * img[ya, xa] + fx * img[ya, xb])
                   + fy * ((1 - fx) * img[yb, xa] + fx * img[yb, xb]))
  return out


def test_full_box_is_identity_and_crop_matches_numpy():
  rng = np.random.default_rng(0)
  img = rng.uniform(0, 255, (6, 8, 3)).astype(np.float32)
  labels = rng.integers(0, 19, (6, 8)).astype(np.uint8)
  full = jnp.array([0.0, 0.0, 6.0, 8.0])
  np.testing.assert_allclose(augment.crop_resize_bilinear(jnp.asarray(img), full), img, atol=1e-4)
  np.testing.assert_array_equal(augment.crop_resize_nearest(jnp.asarray(labels), full), labels)
  box = np.array([1.25, 2.5, 3.5, 4.0], np.float32)
  np.testing.assert_allclose(augment.crop_resize_bilinear(jnp.asarray(img), jnp.asarray(box)),
                             ref_bilinear(img, box), rtol=1e-5, atol=1e-3)
  # hand case: a 2x crop of the top-left quarter of a 2x2-block image
  blocks = np.kron(np.array([[1, 2], [3, 4]], np.uint8), np.ones((4, 4), np.uint8))
  quarter = augment.crop_resize_nearest(jnp.asarray(blocks), jnp.array([0.0, 0.0, 4.0, 4.0]))
  np.testing.assert_array_equal(quarter, np.ones((8, 8)))


def test_rgb_and_labels_share_the_crop_box_and_keys_are_per_image():
  keys = augment.image_keys(jnp.array([7, 8], jnp.uint32), 3)
  assert keys.shape[0] == 6
  rng = np.random.default_rng(1)
  rgb = rng.integers(0, 255, (6, 12, 16, 3)).astype(np.uint8)
  seg = rng.integers(0, 19, (6, 12, 16)).astype(np.uint8)
  out_rgb = augment.augment_images(keys, jnp.asarray(rgb), "rgb", ("crop",), (0.3, 0.6))
  out_seg = augment.augment_images(keys, jnp.asarray(seg), "seg", ("crop", "color"), (0.3, 0.6))
  assert out_seg.dtype == jnp.uint8 and out_rgb.dtype == jnp.float32
  for i in range(6):
    box = augment.crop_box(jax.random.fold_in(keys[i], 0), 12, 16, (0.3, 0.6))
    assert 0.3 * 12 * 16 - 1e-3 <= float(box[2] * box[3]) <= 0.6 * 12 * 16 + 1e-3
    np.testing.assert_array_equal(out_seg[i], augment.crop_resize_nearest(jnp.asarray(seg[i]), box))
    np.testing.assert_allclose(out_rgb[i], augment.crop_resize_bilinear(
        jnp.asarray(rgb[i], jnp.float32), box), atol=1e-3)
  assert not np.array_equal(np.asarray(out_seg[0]), np.asarray(out_seg[1]))
  # the same seeds give the same augmentation
  again = augment.augment_images(augment.image_keys(jnp.array([7, 8], jnp.uint32), 3),
                                 jnp.asarray(seg), "seg", ("crop",), (0.3, 0.6))
  np.testing.assert_array_equal(again, out_seg)


def test_color_jitter_invariants():
  rng = np.random.default_rng(2)
  img = jnp.asarray(rng.uniform(40, 200, (5, 7, 3)).astype(np.float32))
  key = jax.random.PRNGKey(3)
  np.testing.assert_allclose(augment.color_jitter(key, img, (0, 0, 0, 0)), img, atol=1e-3)
  hue = augment.color_jitter(key, img, (0, 0, 0, 0.1))
  assert float(jnp.abs(hue - img).max()) > 1.0                      # the colours turned
  np.testing.assert_allclose(hue @ augment._GREY, img @ augment._GREY, atol=0.05)  # luma kept
  bright = augment.color_jitter(key, img, (0.5, 0, 0, 0))
  ratio = np.asarray(bright / img)
  assert np.allclose(ratio, ratio.flat[0], atol=1e-4)               # one factor per image
  jittered = augment.color_jitter(key, img * 2, (0.3, 0.3, 0.3, 0.05))
  assert float(jittered.min()) >= 0 and float(jittered.max()) <= 255


def test_parse_ops():
  assert augment.parse_ops("") == () and augment.parse_ops("none") == ()
  assert augment.parse_ops("crop, color") == ("crop", "color")
  with pytest.raises(ValueError, match="train.augment='flip'"):
    augment.parse_ops("flip")


SPEC = {"branch": "rgb", "view": "rgb", "backbone": "mobilenet_v2", "width": 0.35, "dim": 8,
        "num_clusters": 4, "blocks": [[1, 8, 1, 1], [2, 8, 1, 2]], "slme": "slme",
        "normalization": "imagenet", "image_size": [32, 32], "init": ""}
TC = {"num_steps": 5, "learning_rate": 1e-2, "warmup_steps": 0, "margin": 0.5,
      "grad_clip": 1.0, "batchnorm": "frozen"}


def test_train_step_with_augmentation_is_seeded_by_query_and_step():
  mesh = parallel.make_mesh(jax.devices()[:1])
  variables = model_spec.init_variables(SPEC, 0)
  tx, _ = train_lib.make_optimizer(TC)
  rgb = np.random.default_rng(0).integers(0, 255, (2, 3, 32, 32, 3)).astype(np.uint8)
  seeds = train_lib.augment_seeds(0, 5, np.array([3, 9]))
  assert seeds.dtype == np.uint32
  np.testing.assert_array_equal(seeds, train_lib.augment_seeds(0, 5, np.array([3, 9])))
  assert not np.array_equal(seeds, train_lib.augment_seeds(0, 6, np.array([3, 9])))
  losses = {}
  for name, tc, batch_seeds in (("off", TC, seeds), ("on", dict(TC, augment="crop,color"), seeds),
                                ("on_again", dict(TC, augment="crop,color"), seeds),
                                ("on_other", dict(TC, augment="crop,color"), seeds + 1)):
    state = parallel.replicate(train_lib.new_state(variables, tx), mesh)
    step = train_lib.make_train_step(SPEC, tc, mesh)
    _, metrics = step(state, parallel.shard_batch({"rgb": rgb, "augment_seed": batch_seeds},
                                                  mesh), jax.random.PRNGKey(0))
    losses[name] = float(metrics["triplet"])
  assert np.isfinite(list(losses.values())).all()
  assert losses["on"] == losses["on_again"]
  assert losses["on"] != losses["off"] and losses["on"] != losses["on_other"]


@pytest.mark.parametrize("kd", ["feature", "relational"])
def test_stage2_step_crops_the_teachers_label_maps_too(kd):
  teacher_spec = dict(SPEC, branch="seg", view="seg", backbone="mobilenet_light")
  student_spec = dict(SPEC, branch="distill")
  mesh = parallel.make_mesh(jax.devices()[:1])
  student = model_spec.init_variables(student_spec, 0)
  teacher = parallel.replicate(model_spec.init_variables(teacher_spec, 1), mesh)
  tx, _ = train_lib.make_optimizer(TC)
  rng = np.random.default_rng(0)
  batch = {"rgb": rng.integers(0, 255, (2, 4, 32, 32, 3)).astype(np.uint8),
           "seg": rng.integers(0, 19, (2, 4, 32, 32)).astype(np.uint8),
           "weight": np.ones(2, np.float32), "augment_seed": np.array([1, 2], np.uint32)}
  out = {}
  for aug in ("", "crop"):
    state = parallel.replicate(train_lib.new_state(student, tx), mesh)
    step = train_lib.make_train_step(student_spec, dict(TC, augment=aug), mesh, teacher_spec,
                                     kd=kd)
    _, m = step(state, parallel.shard_batch(batch, mesh), jax.random.PRNGKey(0), teacher)
    out[aug] = (float(m["triplet"]), float(m["kd"]))
  assert np.all(np.isfinite(out["crop"])) and out["crop"] != out[""]
