"""ImageNet MobileNetV2 from the quantised TFLite file vs the TFLite interpreter."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structvpr_jax.models import mobilenet, pretrained

MODELS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "models")
TFLITE = os.path.normpath(os.path.join(MODELS, "mobilenet_v2_1.0_224_quant.tflite"))
IMAGES = ("cat", "bird", "grace_hopper")

litert = pytest.importorskip("ai_edge_litert", reason="pip install ai-edge-litert")
needs_model = pytest.mark.skipif(not os.path.isfile(TFLITE), reason=f"{TFLITE} missing")


def _load_image(name):
  from PIL import Image
  with Image.open(os.path.join(MODELS, f"{name}.bmp")) as im:
    return np.asarray(im.convert("RGB").resize(pretrained.INPUT_SIZE[::-1], Image.BILINEAR))


@pytest.fixture(scope="module")
def variables():
  return pretrained.load_mobilenet_v2_tflite(TFLITE)


@needs_model
def test_input_quantisation_and_preprocess():
  assert pretrained.input_quantization(TFLITE) == (pretrained.INPUT_SCALE,
                                                   pretrained.INPUT_ZERO_POINT)
  x = pretrained.preprocess_imagenet(np.array([[[0, 128, 255]]], np.uint8))
  np.testing.assert_array_equal(x, np.array([[[-1.0, 0.0, 127 / 128]]], np.float32))
  assert x.dtype == np.float32
  big = np.zeros((2, 300, 200, 3), np.uint8)
  assert pretrained.preprocess_imagenet(big, size=(224, 224)).shape == (2, 224, 224, 3)


@needs_model
def test_logits_match_tflite(variables):
  model = mobilenet.MobileNetV2(width=1.0, num_classes=pretrained.NUM_CLASSES)
  images = np.stack([_load_image(n) for n in IMAGES])
  ours = np.asarray(jax.jit(lambda x: model.apply(variables, x, False))(
      pretrained.preprocess_imagenet(images)))
  with open(os.path.join(MODELS, "imagenet_labels.txt")) as f:
    labels = f.read().splitlines()
  for name, image, logits in zip(IMAGES, images, ours):
    ref_logits, ref_probs = pretrained.tflite_classify(TFLITE, image)
    corr = np.corrcoef(logits, ref_logits)[0, 1]
    print(f"{name}: ours top-1 {labels[logits.argmax()]!r}, tflite top-1 "
          f"{labels[ref_probs.argmax()]!r}, logit Pearson r {corr:.4f}")
    assert logits.argmax() == ref_probs.argmax() == ref_logits.argmax()
    assert corr >= 0.99
    if name == "cat":
      assert labels[logits.argmax()] == "Egyptian cat"


@needs_model
def test_identity_batchnorm_and_tree(variables):
  p, s = variables["params"], variables["batch_stats"]
  assert sorted(k for k in p if k.startswith("block")) == sorted(f"block{i}" for i in range(17))
  assert "expand" not in p["block0"] and "expand" in p["block1"]
  assert p["stem"]["conv"]["kernel"].shape == (3, 3, 3, 32)
  assert p["block1"]["depthwise"]["conv"]["kernel"].shape == (3, 3, 96)
  assert p["head"]["kernel"].shape == (1280, 1001)
  bn = mobilenet.ConvBN(8, "pointwise")
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 5)) * 3
  bias = np.arange(8, dtype=np.float32)
  bn_params, bn_stats = pretrained.identity_batchnorm(bias)
  kernel = jax.random.normal(jax.random.PRNGKey(1), (5, 8))
  y = bn.apply({"params": {"conv": {"kernel": kernel}, "bn": bn_params},
                "batch_stats": {"bn": bn_stats}}, x, False)
  np.testing.assert_array_equal(y, jnp.clip(x @ kernel + bias, 0, 6))
  back = pretrained.backbone_variables(variables)
  assert "head" not in back["params"] and "stem" in back["params"]
  assert set(back["batch_stats"]) == set(s)


def _zeros_like_init(module, x):
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x))
  return jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.5, s.dtype), shapes)


@needs_model
def test_init_branch_from_tflite(variables):
  from structvpr_jax.models.branch import Branch
  branch = Branch(backbone="mobilenet_v2", width=1.0, dim=8, num_clusters=2)
  x = jnp.zeros((1, 64, 64, 3))
  init = _zeros_like_init(branch, x)
  loaded = pretrained.init_branch_from_tflite(init, TFLITE)
  # Non-encoder params untouched, encoder = the ImageNet backbone, same structure.
  assert loaded["params"]["projection"] is init["params"]["projection"]
  assert loaded["params"]["netvlad"] is init["params"]["netvlad"]
  back = pretrained.backbone_variables(variables)
  for collection in ("params", "batch_stats"):
    got, want = loaded[collection]["encoder"], back[collection]
    assert (jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
            == jax.tree_util.tree_structure(init[collection]["encoder"]))
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
      np.testing.assert_array_equal(a, b)
  assert init["params"]["encoder"]["stem"]["conv"]["kernel"][0, 0, 0, 0] == 0.5  # not mutated
  small = Branch(backbone="mobilenet_v2", width=0.35, dim=8, num_clusters=2)
  with pytest.raises(ValueError, match="width"):
    pretrained.init_branch_from_tflite(_zeros_like_init(small, x), TFLITE)


def test_parse_init(tmp_path):
  assert pretrained.parse_init("") == (None, None)
  f = tmp_path / "m.tflite"
  f.write_bytes(b"x")
  assert pretrained.parse_init(f"imagenet_tflite:{f}") == ("imagenet_tflite", str(f))
  with pytest.raises(ValueError, match=r"rgb\.init.*unknown"):
    pretrained.parse_init(f"imagenet_torch:{f}")
  with pytest.raises(ValueError, match=r"rgb\.init.*no such file"):
    pretrained.parse_init(f"imagenet_tflite:{tmp_path / 'missing.tflite'}")
  with pytest.raises(ValueError, match=r"rgb\.init"):
    pretrained.parse_init("imagenet_tflite:")
  with pytest.raises(ValueError, match=r"seg\.init"):
    pretrained.parse_init("bogus", field="seg.init")
