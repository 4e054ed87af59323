"""MobileNetV2: depthwise conv vs XLA's grouped conv, architecture shape facts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from structvpr_jax.models import mobilenet, native
from structvpr_jax.models.ops import depthwise as depthwise_ops
from structvpr_jax.models.ops import dispatch
from structvpr_jax.models.ops import pointwise as pointwise_ops


def grouped_conv(x, kernel, stride):
  return lax.conv_general_dilated(
      x, kernel[:, :, None, :], (stride, stride), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("hw", [(8, 8), (7, 9), (1, 2)])
def test_depthwise_equals_grouped_conv_values_and_grads(stride, hw):
  kx, kk, kc = jax.random.split(jax.random.PRNGKey(stride), 3)
  x = jax.random.normal(kx, (2,) + hw + (6,))
  kernel = jax.random.normal(kk, (3, 3, 6))
  ours = jax.jit(depthwise_ops.depthwise_conv3x3, static_argnums=2)(x, kernel, stride)
  ref = grouped_conv(x, kernel, stride)
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  cot = jax.random.normal(kc, ref.shape)
  g_ours = jax.grad(lambda x, k: jnp.sum(depthwise_ops.depthwise_conv3x3(x, k, stride) * cot),
                    argnums=(0, 1))(x, kernel)
  g_ref = jax.grad(lambda x, k: jnp.sum(grouped_conv(x, k, stride) * cot), argnums=(0, 1))(
      x, kernel)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_depthwise_hand_case():
  # one channel, 3x3 input of ones, kernel of ones: SAME stride 1 counts the
  # in-image neighbours: corners 4, edges 6, centre 9.
  x = jnp.ones((1, 3, 3, 1))
  out = depthwise_ops.depthwise_conv3x3(x, jnp.ones((3, 3, 1)), 1)[0, :, :, 0]
  np.testing.assert_array_equal(out, [[4, 6, 4], [6, 9, 6], [4, 6, 4]])
  # stride 2 on 4x4: TF SAME pads 0 before / 1 after; outputs at rows/cols 0, 2
  out = depthwise_ops.depthwise_conv3x3(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1)), 2)[0, :, :, 0]
  np.testing.assert_array_equal(out, [[9, 6], [6, 4]])


def count_params(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def test_mobilenet_v2_matches_published_parameter_count():
  # torchvision mobilenet_v2 (1000 classes) has 3,504,872 trainable parameters
  # (BatchNorm scale/shift included, running stats excluded); TF's 1001-class
  # head adds 1281.
  model = mobilenet.mobilenet_v2(num_classes=1000)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  assert count_params(variables["params"]) == 3_504_872


@pytest.mark.parametrize("hw", [(64, 64), (65, 97), (480, 640)])
def test_output_stride_32_and_channels(hw):
  model = mobilenet.mobilenet_v2(width=1.0)
  out = jax.eval_shape(lambda: model.init_with_output(
      jax.random.PRNGKey(0), jnp.zeros((1,) + hw + (3,)))[0])
  assert out.shape == (1, -(-hw[0] // 32), -(-hw[1] // 32), 1280)


def test_width_multiplier_and_input_channels():
  model = mobilenet.mobilenet_v2(width=0.5)
  out, variables = jax.jit(model.init_with_output)(jax.random.PRNGKey(0),
                                                   jnp.zeros((2, 64, 64, 5)))
  assert out.shape == (2, 2, 2, 1280)   # last conv is not narrowed for width < 1
  assert variables["params"]["stem"]["conv"]["kernel"].shape == (3, 3, 5, 16)
  full = mobilenet.mobilenet_v2(width=1.0)
  v_full = jax.eval_shape(full.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  assert count_params(variables["params"]) < count_params(v_full["params"])


def test_light_variant_is_lighter_with_same_stride():
  light = mobilenet.light_mobilenet(width=1.0)
  out, v_light = jax.eval_shape(light.init_with_output, jax.random.PRNGKey(0),
                                jnp.zeros((1, 64, 96, 5)))
  assert out.shape == (1, 2, 3, 512)
  v_full = jax.eval_shape(mobilenet.mobilenet_v2().init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 64, 96, 5)))
  assert count_params(v_light["params"]) < count_params(v_full["params"]) / 3


def test_train_mode_updates_batch_stats_and_relu6_bounds():
  model = mobilenet.mobilenet_v2(width=0.35)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3)) * 5
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  out, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, x)
  assert np.all((np.asarray(out) >= 0) & (np.asarray(out) <= 6))
  before = variables["batch_stats"]["stem"]["bn"]["mean"]
  after = updates["batch_stats"]["stem"]["bn"]["mean"]
  assert not np.allclose(before, after)
  eval_out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert eval_out.shape == out.shape


def test_make_divisible():
  assert mobilenet.make_divisible(32 * 0.35) == 16
  assert mobilenet.make_divisible(24 * 0.5) == 16
  assert mobilenet.make_divisible(1280) == 1280
  assert mobilenet.make_divisible(19) == 24  # 16 would round down by > 10%


def test_unknown_backbone_raises():
  with pytest.raises(ValueError, match="unknown backbone"):
    mobilenet.get_backbone("resnet")


def test_output_stride_16_doubles_the_feature_map_with_the_same_parameters():
  import jax
  import jax.numpy as jnp
  from structvpr_jax.models import mobilenet
  x = jnp.zeros((1, 96, 128, 5))
  coarse = mobilenet.light_mobilenet(width=0.35)
  fine = mobilenet.light_mobilenet(width=0.35, output_stride=16)
  v = coarse.init(jax.random.PRNGKey(0), x)
  assert coarse.apply(v, x).shape[1:3] == (3, 4)
  assert fine.apply(v, x).shape[1:3] == (6, 8)       # same parameters, finer map
  v16 = fine.init(jax.random.PRNGKey(0), x)
  assert jax.tree.map(jnp.shape, v16) == jax.tree.map(jnp.shape, v)


NATIVE = native.load()   # a C++ compiler on this machine
needs_native = pytest.mark.skipif(not NATIVE, reason="native kernels did not build here")


def test_resolve_depthwise():
  cpu_default = "native" if dispatch.native_measured_faster() else "shifted"
  assert dispatch.resolve_depthwise("auto", "cpu") == cpu_default
  assert dispatch.resolve_depthwise("auto", "gpu") == "grouped"
  assert dispatch.resolve_depthwise("auto", "tpu") == "grouped"
  assert dispatch.resolve_depthwise("grouped", "cpu") == "grouped"
  assert dispatch.resolve_depthwise("shifted", "gpu") == "shifted"
  assert dispatch.resolve_depthwise("auto") == cpu_default      # this machine: CPU
  if NATIVE:
    assert dispatch.resolve_depthwise("native", "cpu") == "native"
  else:
    with pytest.raises(ValueError, match="is unavailable"):
      dispatch.resolve_depthwise("native", "cpu")
  with pytest.raises(ValueError, match="CPU backend only"):
    dispatch.resolve_depthwise("native", "gpu")
  with pytest.raises(ValueError, match="depthwise='fast'"):
    dispatch.resolve_depthwise("fast")


def test_auto_takes_native_only_where_it_was_measured_faster(monkeypatch):
  """The rule itself (ops/dispatch.py), not timings: "auto" takes the native
  kernels on the CPU only when they loaded and were built for an
  instruction set in NATIVE_FASTER_ISAS (AVX-512); an AVX2 build, or one of
  unknown target, takes XLA's shifted path; an explicit "native" is honoured
  on any build that loads."""
  assert dispatch.NATIVE_FASTER_ISAS == ("avx512",)
  assert dispatch.auto_takes_native({"ok": True, "isa": "avx512"})
  for status in ({"ok": True, "isa": "avx2"}, {"ok": True, "isa": "unknown"},
                 {"ok": True, "isa": "aarch64"}, {"ok": False, "isa": None}, {}):
    assert not dispatch.auto_takes_native(status), status
  for isa, auto in (("avx512", "native"), ("avx2", "shifted"), ("other", "shifted")):
    monkeypatch.setattr(native, "load", lambda: True)
    monkeypatch.setattr(native, "status", lambda isa=isa: {"ok": True, "isa": isa, "reason": ""})
    assert dispatch.resolve_depthwise("auto", "cpu") == auto
    assert dispatch.resolve_depthwise("native", "cpu") == "native"
    assert dispatch.resolve_depthwise("auto", "gpu") == "grouped"
    # the stem follows the same rule (ConvBN._folded: native 3x3 where "native")
    assert dispatch.folded_native(True, "batch", "auto", False) == (auto == "native")
    assert dispatch.blocks_fuse(True, "batch", "auto", True, jnp.float32, jnp.float32,
                                False) == (auto == "native")


@pytest.mark.parametrize("output_stride", [32, 16])
def test_depthwise_kinds_give_the_same_network_values_and_gradients(output_stride):
  """model.depthwise changes the kernel, not the model: the same parameter tree,
  and equal descriptors and parameter gradients (train mode, batch statistics)."""
  from structvpr_jax.models.branch import Branch
  blocks = ((1, 8, 1, 1), (4, 16, 2, 2), (4, 24, 1, 2))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 40, 56, 3))
  nets = {k: Branch(backbone="mobilenet_light", width=0.5, dim=8, num_clusters=4, blocks=blocks,
                    output_stride=output_stride, depthwise=k)
          for k in ("shifted", "grouped", "auto") + (("native",) if NATIVE else ())}
  variables = {k: n.init(jax.random.PRNGKey(1), x) for k, n in nets.items()}
  assert jax.tree.structure(variables["shifted"]) == jax.tree.structure(variables["grouped"])
  for a, b in zip(jax.tree.leaves(variables["shifted"]), jax.tree.leaves(variables["grouped"])):
    np.testing.assert_array_equal(a, b)
  v = variables["shifted"]
  cot = jax.random.normal(jax.random.PRNGKey(2), (2, nets["shifted"].descriptor_dim))

  def loss(params, net):
    out, _ = net.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"])
    return jnp.sum(out * cot), out

  results = {k: jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)(v["params"], n)
             for k, n in nets.items()}
  for kind in [k for k in nets if k not in ("shifted", "auto")]:
    np.testing.assert_allclose(results[kind][1], results["shifted"][1], rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(results[kind][0]), jax.tree.leaves(results["shifted"][0])):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
  cpu_default = "native" if dispatch.native_measured_faster() else "shifted"
  for a, b in zip(jax.tree.leaves(results["auto"]), jax.tree.leaves(results[cpu_default])):
    np.testing.assert_array_equal(a, b)                       # auto is the CPU default


def perturbed_batchnorm(v):
  """`v` with non-trivial BN statistics and affine parameters."""
  keys = iter(jax.random.split(jax.random.PRNGKey(2), 4 * len(jax.tree.leaves(v))))
  return {"params": jax.tree_util.tree_map_with_path(
              lambda p, a: a * jax.random.uniform(next(keys), a.shape, a.dtype, 0.5, 1.5)
              + (0.1 * jax.random.normal(next(keys), a.shape, a.dtype)
                 if getattr(p[-1], "key", "") == "bias" else 0), v["params"]),
          "batch_stats": jax.tree_util.tree_map_with_path(
              lambda p, a: (jax.random.uniform(next(keys), a.shape, a.dtype, 0.5, 2.0)
                            if getattr(p[-1], "key", "") == "var"
                            else 0.3 * jax.random.normal(next(keys), a.shape, a.dtype)),
              v["batch_stats"])}


@needs_native
def test_folded_native_equals_the_unfolded_shifted_branch_in_float32():
  """The default CPU model (fold_bn, native depthwise with the bias and relu6
  fused) against the unfolded branch with XLA's shifted depthwise: the same
  descriptors and parameter gradients to float32 rounding (frozen BN)."""
  from structvpr_jax.models.branch import Branch
  blocks = ((1, 8, 1, 1), (4, 16, 2, 2), (4, 24, 1, 2))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 40, 56, 3))
  kw = dict(backbone="mobilenet_light", width=0.5, dim=8, num_clusters=4, blocks=blocks)
  plain = Branch(depthwise="shifted", **kw)
  folded = Branch(fold_bn=True, depthwise="native", **kw)
  v = perturbed_batchnorm(plain.init(jax.random.PRNGKey(1), x))
  cot = jax.random.normal(jax.random.PRNGKey(3), (2, plain.descriptor_dim))

  def loss(params, net):
    out = net.apply({**v, "params": params}, x, train=False)
    return jnp.sum(out * cot), out

  g_p, out_p = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)(v["params"], plain)
  g_f, out_f = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)(v["params"], folded)
  np.testing.assert_allclose(out_f, out_p, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_p)):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4)
  dw_bn = g_f["encoder"]["block1"]["depthwise"]["bn"]
  assert float(jnp.abs(dw_bn["bias"]).max()) > 0          # the fused bias gets its gradient
  # Evaluation (nothing differentiated) runs each block as one native pass
  # (`fused_inverted_residual`): the same descriptors to float32 rounding.
  apply = jax.jit(lambda v: folded.apply(v, x, train=False))
  assert apply.lower(v).as_text().count("structvpr_inverted_residual_forward") == 4
  np.testing.assert_allclose(apply(v), out_p, rtol=1e-4, atol=1e-5)
  # model.fused_blocks=False: the separate layers (the native depthwise
  # kernel, no fused block), the same descriptors to float32 rounding.
  layers = Branch(fold_bn=True, depthwise="native", fused_blocks=False, **kw)
  apply_layers = jax.jit(lambda v: layers.apply(v, x, train=False))
  text = apply_layers.lower(v).as_text()
  assert "structvpr_inverted_residual_forward" not in text
  assert "structvpr_depthwise" in text
  np.testing.assert_allclose(apply_layers(v), out_p, rtol=1e-4, atol=1e-5)


@needs_native
def test_micro_batch_chunks_only_the_half_resolution_layers_bitwise():
  """Evaluation with fused blocks and `micro_batch`: the stem and the blocks
  reading its output run in chunks (one lax.map), the rest on the whole
  batch; the descriptors equal the unchunked call's bit for bit."""
  from structvpr_jax.models.branch import Branch
  # Blocks 0-1 read the stem's (stride 2) output; block 1 has stride 2,
  # block 2 reads stride 4: two blocks go in the chunks.
  blocks = ((1, 8, 1, 1), (4, 16, 1, 2), (4, 16, 1, 1), (4, 24, 1, 2))
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 40, 56, 3))
  kw = dict(backbone="mobilenet_light", width=0.5, dim=8, num_clusters=4, blocks=blocks)
  net = Branch(fold_bn=True, depthwise="native", **kw)
  v = jax.jit(net.init)(jax.random.PRNGKey(1), x[:1])
  assert net.fuses_blocks() and not net.fuses_blocks(train=True)
  whole = jax.jit(lambda v, x: net.apply(v, x, train=False))
  chunked = jax.jit(lambda v, x: net.apply(v, x, train=False, micro_batch=2))
  text = chunked.lower(v, x).as_text()
  assert text.count("stablehlo.while") == 1                     # one lax.map
  assert text.count("structvpr_inverted_residual_forward") == 4   # each block once
  assert np.array_equal(np.asarray(chunked(v, x)), np.asarray(whole(v, x)))
  # micro_batch >= the batch: the plain call.
  assert "stablehlo.while" not in jax.jit(
      lambda v, x: net.apply(v, x, train=False, micro_batch=6)).lower(v, x).as_text()
  # model.trainable_from inside the chunks: block 1 trains, the stem and
  # block 0 get no gradient, as without chunks.
  frozen = Branch(fold_bn=True, depthwise="native", trainable_from=1, **kw)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(frozen.apply(
      {**v, "params": p}, x, train=False, micro_batch=2))))(v["params"])["encoder"]
  assert all(float(jnp.abs(g).max()) == 0
             for g in jax.tree.leaves((grads["stem"], grads["block0"])))
  assert float(jnp.abs(grads["block1"]["expand"]["conv"]["kernel"]).max()) > 0
  with pytest.raises(ValueError, match="micro_batch=4 must divide the batch"):
    net.apply(v, x, train=False, micro_batch=4)
  layers = Branch(fold_bn=True, depthwise="native", fused_blocks=False, **kw)
  assert not layers.fuses_blocks()
  with pytest.raises(ValueError, match="micro_batch needs fused blocks"):
    layers.apply(v, x, train=False, micro_batch=2)
  assert not Branch(fold_bn=True, depthwise="native", remat=True, **kw).fuses_blocks()


def test_folded_batchnorm_equals_the_unfolded_frozen_branch_in_float64():
  """model.fold_bn: the same parameter tree, and (train=False, i.e. frozen BN)
  the same descriptors and gradients for every parameter, incl. BN scale/bias."""
  from structvpr_jax.models.branch import Branch
  blocks = ((1, 8, 1, 1), (4, 16, 2, 2), (4, 24, 1, 2))
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 40, 56, 3), jnp.float64)
    kw = dict(backbone="mobilenet_light", width=0.5, dim=8, num_clusters=4, blocks=blocks,
              dtype=jnp.float64, param_dtype=jnp.float64)
    plain, folded = Branch(**kw), Branch(fold_bn=True, **kw)
    v = plain.init(jax.random.PRNGKey(1), x)
    assert jax.tree.structure(folded.init(jax.random.PRNGKey(1), x)) == jax.tree.structure(v)
    v = perturbed_batchnorm(v)
    cot = jax.random.normal(jax.random.PRNGKey(3), (2, plain.descriptor_dim), jnp.float64)

    def loss(params, net):
      out = net.apply({**v, "params": params}, x, train=False)
      return jnp.sum(out * cot), out

    (g_p, out_p) = jax.grad(loss, has_aux=True)(v["params"], plain)
    (g_f, out_f) = jax.grad(loss, has_aux=True)(v["params"], folded)
    np.testing.assert_allclose(out_f, out_p, rtol=1e-10, atol=1e-12)
    for a, b in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_p)):
      np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)
    assert float(jnp.abs(jax.tree.leaves(g_p["encoder"]["stem"]["bn"])[0]).max()) > 0
    # in training mode (batch statistics) nothing is folded: identical programs
    out_t, _ = folded.apply(v, x, train=True, mutable=["batch_stats"])
    ref_t, _ = plain.apply(v, x, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(out_t, ref_t)


def shifted_autodiff_reference(x, kernel, stride):
  """The shifted multiply-adds with no custom VJP (plain autodiff)."""
  b, h, w, c = x.shape
  ho, top, bottom = depthwise_ops.same_padding(h, stride)
  wo, left, right = depthwise_ops.same_padding(w, stride)
  xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  out = 0.0
  for i in range(3):
    for j in range(3):
      out = out + lax.slice(xp, (0, i, j, 0),
                            (b, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
                            (1, stride, stride, 1)) * kernel[i, j]
  return out


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("hw", [(8, 8), (7, 9), (1, 2), (2, 1), (5, 6), (33, 32), (64, 64)])
def test_depthwise_custom_vjp_equals_autodiff_in_float64(stride, hw):
  # (33, 32) at stride 1 and (64, 64) at stride 2 have >= 1024 output pixels:
  # the one-pass kernel gradient; the others the 9 reductions.
  with jax.enable_x64():
    rng = np.random.default_rng(stride * 100 + hw[0] * 10 + hw[1])
    x = jnp.asarray(rng.normal(size=(2,) + hw + (3,)))
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3)))
    y, vjp = jax.vjp(lambda x, k: depthwise_ops.depthwise_conv3x3(x, k, stride), x, kernel)
    y_ref, vjp_ref = jax.vjp(lambda x, k: shifted_autodiff_reference(x, k, stride), x, kernel)
    assert y.dtype == jnp.float64
    np.testing.assert_allclose(y, y_ref, rtol=1e-13, atol=1e-13)
    cot = jnp.asarray(rng.normal(size=y.shape))
    for a, b in zip(vjp(cot), vjp_ref(cot)):
      assert a.dtype == jnp.float64 and a.shape == b.shape
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_depthwise_vjp_hand_case():
  # 1 channel, 3x3 image, stride 1, kernel of ones, cotangent 1 at the centre
  # output only: the centre output reads all 9 inputs once (dx = 1
  # everywhere) and tap (i, j) of it reads x[i, j] (dk = x).
  x = jnp.arange(9.0).reshape(1, 3, 3, 1)
  cot = jnp.zeros((1, 3, 3, 1)).at[0, 1, 1, 0].set(1.0)
  _, vjp = jax.vjp(lambda x, k: depthwise_ops.depthwise_conv3x3(x, k, 1), x, jnp.ones((3, 3, 1)))
  dx, dk = vjp(cot)
  np.testing.assert_array_equal(dx[0, :, :, 0], np.ones((3, 3)))
  np.testing.assert_array_equal(dk[:, :, 0], np.arange(9.0).reshape(3, 3))
  # stride 2 on 4x4 (pads 0 before, 1 after): output (1, 1) reads rows/cols
  # 2..4, of which 4 is padding; cotangent 1 there.
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  cot = jnp.zeros((1, 2, 2, 1)).at[0, 1, 1, 0].set(1.0)
  _, vjp = jax.vjp(lambda x, k: depthwise_ops.depthwise_conv3x3(x, k, 2), x, jnp.ones((3, 3, 1)))
  dx, dk = vjp(cot)
  expect_dx = np.zeros((4, 4))
  expect_dx[2:, 2:] = 1.0
  np.testing.assert_array_equal(dx[0, :, :, 0], expect_dx)
  np.testing.assert_array_equal(dk[:, :, 0], [[10, 11, 0], [14, 15, 0], [0, 0, 0]])


def test_pointwise_custom_vjp_equals_autodiff_in_float64():
  with jax.enable_x64():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 3, 4)))
    kernel = jnp.asarray(rng.normal(size=(4, 6)))
    y, vjp = jax.vjp(pointwise_ops.pointwise, x, kernel)
    cot = jnp.asarray(rng.normal(size=y.shape))
    dx, dk = vjp(cot)
    # numpy from the definitions: y = x @ K, dx = g K^T, dK = sum over rows x^T g
    xn, kn, gn = np.asarray(x), np.asarray(kernel), np.asarray(cot)
    np.testing.assert_allclose(y, xn @ kn, rtol=1e-13)
    np.testing.assert_allclose(dx, gn @ kn.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dk, xn.reshape(-1, 4).T @ gn.reshape(-1, 6), rtol=1e-12,
                               atol=1e-12)
    assert dx.dtype == dk.dtype == jnp.float64


def test_relu6_values_and_derivative_with_ties():
  x = jnp.array([-1.0, 0.0, 0.5, 3.0, 6.0, 7.5])
  np.testing.assert_array_equal(pointwise_ops.relu6(x), [0.0, 0.0, 0.5, 3.0, 6.0, 6.0])
  # derivative 1 strictly inside (0, 6), 0 at the ties and outside (PyTorch's)
  np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(pointwise_ops.relu6(x)))(x),
                                [0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
  # the same as jnp.clip's derivative away from the ties
  inside = jnp.array([-2.0, 0.25, 5.0, 9.0])
  np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(pointwise_ops.relu6(x) * x))(inside),
                                jax.grad(lambda x: jnp.sum(jnp.clip(x, 0, 6) * x))(inside))
