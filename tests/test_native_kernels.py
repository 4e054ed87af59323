"""The native (C++, XLA FFI) kernels: the depthwise convolution and the
stem's full 3x3 convolution, values and gradients against plain-numpy
convolutions written from the definition and against XLA's convolutions;
hand cases; determinism; the build cache. (The fallbacks when no library
can be had: tests/test_native_fallback.py, which runs where this module is
skipped.)"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from structvpr_jax.models import native
from structvpr_jax.models.ops import conv as conv_ops
from structvpr_jax.models.ops import depthwise as depthwise_ops
from structvpr_jax.models.ops import dispatch, fused
from test_native_fallback import run_python

pytestmark = pytest.mark.skipif(not native.load(), reason="native kernels did not build")


def same_pad(size, stride):
  out = -(-size // stride)
  total = max((out - 1) * stride + 3 - size, 0)
  return out, total // 2


def numpy_depthwise(x, k, stride):
  """y[b, p, q, c] = sum_ij x[b, p*s + i - top, q*s + j - left, c] k[i, j, c], x = 0 outside."""
  b, h, w, c = x.shape
  ho, top = same_pad(h, stride)
  wo, left = same_pad(w, stride)
  y = np.zeros((b, ho, wo, c), np.float64)
  for p in range(ho):
    for q in range(wo):
      for i in range(3):
        for j in range(3):
          r, s = p * stride + i - top, q * stride + j - left
          if 0 <= r < h and 0 <= s < w:
            y[:, p, q, :] += x[:, r, s, :].astype(np.float64) * k[i, j].astype(np.float64)
  return y


def numpy_depthwise_vjp(x, k, dy, stride):
  """(dx, dk) by scattering each output's cotangent back to its 9 reads."""
  b, h, w, c = x.shape
  ho, top = same_pad(h, stride)
  wo, left = same_pad(w, stride)
  dx = np.zeros(x.shape, np.float64)
  dk = np.zeros(k.shape, np.float64)
  for p in range(ho):
    for q in range(wo):
      for i in range(3):
        for j in range(3):
          r, s = p * stride + i - top, q * stride + j - left
          if 0 <= r < h and 0 <= s < w:
            dx[:, r, s, :] += dy[:, p, q, :] * k[i, j]
            dk[i, j, :] += np.sum(dy[:, p, q, :] * x[:, r, s, :], axis=0)
  return dx, dk


def grouped(x, k, stride):
  return lax.conv_general_dilated(x, k[:, :, None, :], (stride, stride), "SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  feature_group_count=x.shape[-1])


# Channel counts cover every code path: < 16 (scalar), 16-lane vectors, the
# 64-channel register block, and remainders after each; sizes odd and even,
# 1-pixel rows and columns; batch x rows above the 32 kernel-gradient chunks.
# Below 64 channels the interior pixels of a row take their own path (taps
# held in registers, 32 then 16 channels, 4 pixels at a time): rows wide
# enough for groups of 4 and a remainder, at 32 (MobileNetV2's first
# block), 48 and 40 (8 channels past the vectors).
SHAPES = [(2, 7, 9, 3), (1, 1, 2, 5), (2, 2, 1, 16), (3, 8, 8, 70), (1, 5, 6, 85),
          (2, 6, 5, 64), (40, 3, 4, 17), (1, 13, 11, 200), (2, 5, 13, 32),
          (1, 4, 16, 48), (2, 3, 11, 40), (1, 3, 14, 16)]


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_native_equals_numpy_definition_values_and_gradients(shape, stride):
  rng = np.random.default_rng(sum(shape) * 10 + stride)
  x = rng.standard_normal(shape).astype(np.float32)
  k = rng.standard_normal((3, 3, shape[-1])).astype(np.float32)
  y, vjp = jax.vjp(lambda a, b: depthwise_ops.native_depthwise_conv3x3(a, b, stride), x, k)
  assert y.dtype == jnp.float32
  ref = numpy_depthwise(x, k, stride)
  assert y.shape == ref.shape
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  dy = rng.standard_normal(ref.shape).astype(np.float32)
  dx, dk = vjp(dy)
  dx_ref, dk_ref = numpy_depthwise_vjp(x, k, dy, stride)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dk, dk_ref, rtol=1e-5, atol=2e-5 * np.sqrt(dy.size / shape[-1]))
  # and XLA's own grouped convolution, under jit
  y_xla, vjp_xla = jax.vjp(lambda a, b: grouped(a, b, stride), x, k)
  np.testing.assert_allclose(jax.jit(depthwise_ops.native_depthwise_conv3x3, static_argnums=2)(
      x, k, stride), y_xla, rtol=1e-5, atol=1e-5)
  for a, b in zip((dx, dk), vjp_xla(dy)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
# (2, 37, 5, 20): many rows per thread's chunk, odd height: the kernels'
# row caches (input rows, masked cotangent rows) are reused across rows
# and images.
@pytest.mark.parametrize("shape", [(2, 7, 9, 3), (3, 8, 8, 70), (1, 13, 11, 200), (40, 3, 4, 17),
                                   (2, 37, 5, 20)])
def test_fused_bias_relu6_equals_numpy_definition(shape, stride, activation):
  """z = relu6(depthwise(x, k) + bias) in one pass; its VJP passes dz where
  0 < z < 6 (PyTorch's ReLU6 derivative) and gives the bias the sum of that."""
  rng = np.random.default_rng(sum(shape) + 7 * stride + activation)
  x = (3 * rng.standard_normal(shape)).astype(np.float32)   # about a fifth above 6
  k = rng.standard_normal((3, 3, shape[-1])).astype(np.float32)
  bias = rng.standard_normal(shape[-1]).astype(np.float32)
  z, vjp = jax.vjp(lambda a, b, c: depthwise_ops.native_depthwise_bias_relu6(a, b, c, stride,
                                                                          activation), x, k, bias)
  pre = numpy_depthwise(x, k, stride) + bias
  assert 0.1 < np.mean(pre > 6) and 0.3 < np.mean(pre < 0)              # both bounds bite
  np.testing.assert_allclose(z, np.clip(pre, 0, 6) if activation else pre, rtol=1e-5, atol=1e-5)
  dz = rng.standard_normal(pre.shape).astype(np.float32)
  passed = dz * ((pre > 0) & (pre < 6)) if activation else dz
  dx, dk, dbias = vjp(dz)
  dx_ref, dk_ref = numpy_depthwise_vjp(x, k, passed, stride)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dk, dk_ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dbias, passed.sum(axis=(0, 1, 2)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("stride", [1, 2])
# (2, 37, 5, 20): many rows per thread's chunk, odd height: the kernels'
# row caches (input rows, masked cotangent rows) are reused across rows
# and images.
@pytest.mark.parametrize("shape", [(2, 7, 9, 3), (3, 8, 8, 70), (1, 13, 11, 200), (40, 3, 4, 17),
                                   (2, 37, 5, 20)])
def test_fused_prologue_equals_numpy_definition(shape, stride):
  """The expand layer's bias and relu6 inside the depthwise kernel: the input
  read is relu6(m + pbias); the VJP gives m the gradient passed where
  0 < m + pbias < 6 and pbias its sum."""
  rng = np.random.default_rng(sum(shape) + 11 * stride)
  m = (6 * rng.standard_normal(shape)).astype(np.float32)
  pbias = rng.standard_normal(shape[-1]).astype(np.float32)
  k = rng.standard_normal((3, 3, shape[-1])).astype(np.float32)
  bias = rng.standard_normal(shape[-1]).astype(np.float32)
  z, vjp = jax.vjp(lambda a, b, c, d: depthwise_ops.native_depthwise_bias_relu6(
      a, b, c, stride, True, d), m, k, bias, pbias)
  a_in = np.clip(m.astype(np.float64) + pbias, 0, 6)
  gate_in = (m.astype(np.float64) + pbias > 0) & (m.astype(np.float64) + pbias < 6)
  assert 0.05 < np.mean(a_in == 6) and 0.2 < np.mean(a_in == 0)         # both bounds bite
  pre = numpy_depthwise(a_in, k, stride) + bias
  np.testing.assert_allclose(z, np.clip(pre, 0, 6), rtol=1e-5, atol=2e-5)
  dz = rng.standard_normal(pre.shape).astype(np.float32)
  passed = dz * ((pre > 0) & (pre < 6))
  dm, dk, dbias, dpbias = vjp(dz)
  da_ref, dk_ref = numpy_depthwise_vjp(a_in, k, passed, stride)
  np.testing.assert_allclose(dm, da_ref * gate_in, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dk, dk_ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dbias, passed.sum(axis=(0, 1, 2)), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dpbias, (da_ref * gate_in).sum(axis=(0, 1, 2)), rtol=1e-5,
                             atol=1e-4)


def test_fused_hand_case():
  # 3x3 image of ones, kernel of ones, bias -5: pre-activations corners -1,
  # edges 1, centre 4 -> relu6 0 / 1 / 4; bias 0: 4 / 6 / 9 -> 4 / 6 / 6.
  ones = jnp.ones((1, 3, 3, 1))
  z = depthwise_ops.native_depthwise_bias_relu6(ones, jnp.ones((3, 3, 1)), jnp.full((1,), -5.0))
  np.testing.assert_array_equal(z[0, :, :, 0], [[0, 1, 0], [1, 4, 1], [0, 1, 0]])
  z, vjp = jax.vjp(lambda b: depthwise_ops.native_depthwise_bias_relu6(
      ones, jnp.ones((3, 3, 1)), b), jnp.zeros((1,)))
  np.testing.assert_array_equal(z[0, :, :, 0], [[4, 6, 4], [6, 6, 6], [4, 6, 4]])
  # only the 4 corners (0 < 4 < 6) pass the cotangent: dbias = 4 x 1
  np.testing.assert_array_equal(vjp(jnp.ones_like(z))[0], [4.0])


def numpy_conv(x, w, stride):
  """z[b, p, q, o] = sum_ijc x[b, p*s + i - top, q*s + j - left, c] w[i, j, c, o], x = 0 outside."""
  b, h, wd, _ = x.shape
  ho, top = same_pad(h, stride)
  wo, left = same_pad(wd, stride)
  y = np.zeros((b, ho, wo, w.shape[-1]), np.float64)
  for p in range(ho):
    for q in range(wo):
      for i in range(3):
        for j in range(3):
          r, s = p * stride + i - top, q * stride + j - left
          if 0 <= r < h and 0 <= s < wd:
            y[:, p, q, :] += x[:, r, s, :].astype(np.float64) @ w[i, j].astype(np.float64)
  return y


def numpy_conv_kernel_gradient(x, dy, stride):
  b, h, wd, cin = x.shape
  ho, top = same_pad(h, stride)
  wo, left = same_pad(wd, stride)
  dw = np.zeros((3, 3, cin, dy.shape[-1]), np.float64)
  for p in range(ho):
    for q in range(wo):
      for i in range(3):
        for j in range(3):
          r, s = p * stride + i - top, q * stride + j - left
          if 0 <= r < h and 0 <= s < wd:
            dw[i, j] += x[:, r, s, :].astype(np.float64).T @ dy[:, p, q, :]
  return dw


# RGB (the registers path) and other input channel counts; output channels
# in 16-lane blocks, pairs of them, and remainders.
@pytest.mark.parametrize("activation", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape,cout", [((2, 7, 9, 3), 32), ((3, 8, 8, 3), 20), ((1, 13, 11, 5), 16),
                                        ((2, 6, 5, 3), 37), ((1, 2, 1, 1), 8), ((33, 4, 5, 3), 48)])
def test_native_stem_conv_equals_numpy_definition(shape, cout, stride, activation):
  rng = np.random.default_rng(sum(shape) + cout + 7 * stride + activation)
  x = (3 * rng.standard_normal(shape)).astype(np.float32)
  w = rng.standard_normal((3, 3, shape[-1], cout)).astype(np.float32)
  bias = rng.standard_normal(cout).astype(np.float32)
  z, vjp = jax.vjp(lambda a, b, c: conv_ops.native_conv3x3_bias_relu6(a, b, c, stride,
                                                                        activation), x, w, bias)
  pre = numpy_conv(x, w, stride) + bias
  np.testing.assert_allclose(z, np.clip(pre, 0, 6) if activation else pre, rtol=1e-5, atol=2e-5)
  dz = rng.standard_normal(pre.shape).astype(np.float32)
  passed = dz * ((pre > 0) & (pre < 6)) if activation else dz
  dx, dw, dbias = vjp(dz)
  np.testing.assert_allclose(dw, numpy_conv_kernel_gradient(x, passed, stride), rtol=1e-5,
                             atol=1e-3)
  np.testing.assert_allclose(dbias, passed.sum(axis=(0, 1, 2)), rtol=1e-5, atol=1e-4)
  # the input gradient is XLA's transposed convolution of the passed cotangent
  _, conv_vjp = jax.vjp(lambda a: lax.conv_general_dilated(
      a, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")), x)
  np.testing.assert_allclose(dx, conv_vjp(passed.astype(np.float32))[0], rtol=1e-5, atol=1e-4)


def test_native_stem_hand_case():
  # 1 input channel of ones on 3x3, two output channels with kernels of ones
  # and of twos, bias (0, -10), stride 1: counts of in-image neighbours
  # (4 / 6 / 9), doubled and shifted by -10 in the second channel, relu6.
  w = jnp.stack([jnp.ones((3, 3, 1)), 2 * jnp.ones((3, 3, 1))], axis=-1)
  z = conv_ops.native_conv3x3_bias_relu6(jnp.ones((1, 3, 3, 1)), w, jnp.array([0.0, -10.0]))
  np.testing.assert_array_equal(z[0, :, :, 0], [[4, 6, 4], [6, 6, 6], [4, 6, 4]])
  np.testing.assert_array_equal(z[0, :, :, 1], [[0, 2, 0], [2, 6, 2], [0, 2, 0]])


def test_native_hand_cases():
  # ones everywhere, stride 1 on 3x3: each output counts its in-image neighbours
  ones = jnp.ones((3, 3, 1))
  out = depthwise_ops.native_depthwise_conv3x3(jnp.ones((1, 3, 3, 1)), ones, 1)[0, :, :, 0]
  np.testing.assert_array_equal(out, [[4, 6, 4], [6, 9, 6], [4, 6, 4]])
  # stride 2 on 4x4: SAME pads 0 before / 1 after; outputs at rows/cols 0, 2
  out = depthwise_ops.native_depthwise_conv3x3(jnp.ones((1, 4, 4, 1)), ones, 2)[0, :, :, 0]
  np.testing.assert_array_equal(out, [[9, 6], [6, 4]])
  # cotangent 1 at the centre of a 3x3 image: dx = 1 everywhere, dk = x
  x = jnp.arange(9.0).reshape(1, 3, 3, 1)
  cot = jnp.zeros((1, 3, 3, 1)).at[0, 1, 1, 0].set(1.0)
  dx, dk = jax.vjp(lambda a, b: depthwise_ops.native_depthwise_conv3x3(a, b, 1), x, ones)[1](cot)
  np.testing.assert_array_equal(dx[0, :, :, 0], np.ones((3, 3)))
  np.testing.assert_array_equal(dk[:, :, 0], np.arange(9.0).reshape(3, 3))
  # stride 2 on 4x4, cotangent 1 at output (1, 1): it reads rows/cols 2..4, 4 is padding
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  cot = jnp.zeros((1, 2, 2, 1)).at[0, 1, 1, 0].set(1.0)
  dx, dk = jax.vjp(lambda a, b: depthwise_ops.native_depthwise_conv3x3(a, b, 2), x, ones)[1](cot)
  expect_dx = np.zeros((4, 4))
  expect_dx[2:, 2:] = 1.0
  np.testing.assert_array_equal(dx[0, :, :, 0], expect_dx)
  np.testing.assert_array_equal(dk[:, :, 0], [[10, 11, 0], [14, 15, 0], [0, 0, 0]])


def test_native_gradients_are_bitwise_repeatable():
  # The kernel gradient is summed in a fixed chunk order whatever thread ran
  # which chunk: two runs agree bit for bit (bitwise resume relies on it).
  rng = np.random.default_rng(0)
  x = rng.standard_normal((16, 28, 28, 96)).astype(np.float32)
  k = rng.standard_normal((3, 3, 96)).astype(np.float32)
  dy = rng.standard_normal((16, 14, 14, 96)).astype(np.float32)
  grad = jax.jit(lambda a, b, g: jax.vjp(
      lambda u, v: depthwise_ops.native_depthwise_conv3x3(u, v, 2), a, b)[1](g))
  first = [np.asarray(t) for t in grad(x, k, dy)]
  for _ in range(5):
    for a, b in zip(first, grad(x, k, dy)):
      np.testing.assert_array_equal(a, b)


def test_other_dtypes_take_the_xla_kernel():
  with jax.enable_x64():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 6, 4)))
    k = jnp.asarray(np.random.default_rng(2).standard_normal((3, 3, 4)))
    y = depthwise_ops.native_depthwise_conv3x3(x, k, 2)
    assert y.dtype == jnp.float64
    np.testing.assert_array_equal(y, depthwise_ops.depthwise_conv3x3(x, k, 2))


def test_vmap_over_an_extra_axis_equals_a_loop():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((3, 2, 6, 7, 5)).astype(np.float32)
  k = rng.standard_normal((3, 3, 5)).astype(np.float32)
  out = jax.vmap(lambda a: depthwise_ops.native_depthwise_conv3x3(a, k, 1))(x)
  for n in range(3):
    np.testing.assert_array_equal(out[n], depthwise_ops.native_depthwise_conv3x3(x[n], k, 1))


SHARD_MAP = """
  import jax, jax.numpy as jnp, numpy as np
  from jax import lax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from structvpr_jax.models.ops import depthwise as depthwise_ops, dispatch, fused
  from structvpr_jax.models.ops import pointwise as pointwise_ops
  mesh = jax.make_mesh((4,), ("data",))
  rng = np.random.default_rng(0)
  xs = rng.standard_normal((8, 9, 10, 20)).astype(np.float32)
  ks = rng.standard_normal((3, 3, 20)).astype(np.float32)
  bs = rng.standard_normal((20,)).astype(np.float32)
  x = jax.device_put(xs, NamedSharding(mesh, P("data")))
  k, b = (jax.device_put(a, NamedSharding(mesh, P())) for a in (ks, bs))

  def loss(k, b, x):
    return jnp.sum(depthwise_ops.native_depthwise_bias_relu6(x, k, b, 2) ** 2)

  def per_shard(k, b, x):   # replicated k, b: their gradients are summed over devices
    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(k, b, x)
    return lax.psum(value, "data"), grads

  value, (dk, db) = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), P(), P("data")),
                                          out_specs=(P(), P())))(k, b, x)
  ref_value, (ref_dk, ref_db) = jax.value_and_grad(
      lambda k, b: jnp.sum(pointwise_ops.relu6(depthwise_ops.depthwise_conv3x3(xs, k, 2) + b) ** 2),
      argnums=(0, 1))(ks, bs)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  np.testing.assert_allclose(dk, ref_dk, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(db, ref_db, rtol=1e-4, atol=1e-3)
  y = jax.jit(jax.shard_map(lambda k, x: depthwise_ops.native_depthwise_conv3x3(x, k, 1), mesh=mesh,
                            in_specs=(P(), P("data")), out_specs=P("data")))(k, x)
  np.testing.assert_allclose(y, depthwise_ops.depthwise_conv3x3(xs, ks, 1), rtol=1e-5, atol=1e-5)

  # The expand + depthwise backward in one pass (`_expand_depthwise_native`)
  # inside shard_map, the weights cast to per-device as the train step does
  # (`parallel.to_varying`; the project 1x1's custom VJP needs it), their
  # gradients summed over devices.
  from structvpr_jax import parallel
  dispatch.JOINT_EXPAND_BACKWARD_MIN_WIDTH = 8
  xb = rng.standard_normal((8, 5, 9, 8)).astype(np.float32)
  ws = ((rng.standard_normal((8, 48)) / 3, rng.standard_normal(48)),
        (rng.standard_normal((3, 3, 48)) / 3, rng.standard_normal(48)),
        (rng.standard_normal((48, 8)) / 7, rng.standard_normal(8)))
  ws = jax.tree.map(lambda a: np.asarray(a, np.float32), ws)

  def block_loss(w, x):
    return jnp.sum(fused.inverted_residual_layers(x, w, 1, True) ** 2)

  def block_shard(w, x):
    value, grads = jax.value_and_grad(block_loss)(parallel.to_varying(w, "data"), x)
    return lax.psum(value, "data"), lax.psum(grads, "data")

  step = jax.jit(jax.shard_map(block_shard, mesh=mesh, in_specs=(P(), P("data")),
                               out_specs=(P(), P())))
  args = (jax.device_put(ws, NamedSharding(mesh, P())),
          jax.device_put(xb, NamedSharding(mesh, P("data"))))
  assert "structvpr_expand_depthwise_backward" in step.lower(*args).as_text()
  value, grads = step(*args)
  dispatch.JOINT_EXPAND_BACKWARD_MIN_WIDTH = 10 ** 9
  ref_value, ref_grads = jax.value_and_grad(block_loss)(ws, xb)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for a, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-3 * np.abs(r).max())
  print("OK")
"""


def test_inside_shard_map_with_replicated_weights():
  """A replicated kernel on a per-device batch (evaluation; or a gradient
  taken w.r.t. replicated weights, summed over devices by the transpose)."""
  proc = run_python(SHARD_MAP, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  assert "OK" in proc.stdout


SHARDED_JIT = """
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  from structvpr_jax.models import mobilenet, native
  from structvpr_jax.models.branch import Branch
  assert native.load() and jax.device_count() == 8
  blocks = ((1, 8, 1, 1), (4, 16, 2, 2), (4, 24, 1, 2))
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (16, 40, 56, 3)))

  def compare(net, mesh, bitwise):
    v = net.init(jax.random.PRNGKey(1), x[:1])
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    fwd = jax.jit(lambda v, x: net.apply(v, x, train=False))
    ref, out = np.asarray(fwd(v, x)), fwd(v, xs)
    assert out.sharding.spec[0] == "data"
    if bitwise:
      np.testing.assert_array_equal(np.asarray(out), ref)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)
    cot = np.asarray(jax.random.normal(jax.random.PRNGKey(2), ref.shape))
    grad = jax.jit(jax.grad(lambda p, x, c: jnp.sum(net.apply({**v, "params": p}, x,
                                                              train=False) * c)))
    cs = jax.device_put(cot, NamedSharding(mesh, P("data")))
    g_ref, g = grad(v["params"], x, cot), grad(v["params"], xs, cs)
    scale = max(float(np.abs(a).max()) for a in jax.tree.leaves(g_ref))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale)
    # every native call runs per shard (2 of the 16 images), none on a gathered batch
    for text in (fwd.lower(v, xs).compile().as_text(),
                 grad.lower(v["params"], xs, cs).compile().as_text()):
      calls = [l for l in text.splitlines() if 'custom_call_target="structvpr_' in l]
      assert calls and "all-gather" not in text
      # x (every call's first operand) is the local shard of 2 images
      assert all("operand_layout_constraints={f32[2," in l for l in calls), calls

  # plain jit over a mesh of Auto axes: the model (NetVLAD included; its
  # XLA ops round differently once partitioned), and the backbone bitwise
  auto = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  kw = dict(fold_bn=True, depthwise="native", width=0.5, blocks=blocks)
  compare(Branch(backbone="mobilenet_light", dim=8, num_clusters=4, **kw), auto, False)
  compare(Branch(backbone="mobilenet_light", dim=8, num_clusters=4, fused_blocks=False, **kw),
          auto, False)
  compare(mobilenet.MobileNetV2(last_features=None, **kw), auto, True)
  # Explicit axes (jax.make_mesh's default): types carry the sharding; the
  # kernel gradients are replicated, not sharded like x
  explicit = jax.make_mesh((8,), ("data",))
  compare(mobilenet.MobileNetV2(last_features=None, **kw), explicit, True)
  print("OK")
"""


def test_plain_jit_with_a_batch_sharded_input_runs_per_shard():
  """Under jax.jit (no shard_map) with the batch split over 8 devices, each
  native call runs on its own shard and the kernel gradients are summed
  over the shards (`native._per_shard`): descriptors and gradients equal
  the unsharded call's, no all-gather of the batch; with Explicit mesh axes
  too (the kernel gradients' types are replicated)."""
  proc = run_python(SHARDED_JIT, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  assert "OK" in proc.stdout


# --- the fused inverted-residual block (forward only) ----------------------

def numpy_inverted_residual(x, we, be, kd, bd, wp, bp, stride, residual):
  """MobileNetV2's block with folded BN, from its definition, in float64:
  e = relu6(x we + be) (e = x without expand), d = relu6(depthwise(e) + bd),
  y = d wp + bp (+ x)."""
  x64 = x.astype(np.float64)
  e = np.clip(x64 @ we + be, 0, 6) if we is not None else x64
  d = np.clip(numpy_depthwise(e, kd, stride) + bd, 0, 6)
  y = d @ wp.astype(np.float64) + bp
  return y + x64 if residual else y


def block_weights(rng, c, expansion, cout):
  ce = c * expansion
  expand = ((rng.standard_normal((c, ce)) / np.sqrt(c)).astype(np.float32),
            (3 * rng.standard_normal(ce)).astype(np.float32)) if expansion != 1 else None
  depthwise = ((rng.standard_normal((3, 3, ce)) / 3).astype(np.float32),
               rng.standard_normal(ce).astype(np.float32))
  project = ((rng.standard_normal((ce, cout)) / np.sqrt(ce)).astype(np.float32),
             rng.standard_normal(cout).astype(np.float32))
  return expand, depthwise, project


# (batch, h, w, c, expansion, cout, stride, residual). Output columns cover
# the 48-, 32- and 16-wide register blocks and partial last vectors (7, 24,
# 40, 50, 160); expanded widths not a multiple of 16 (15, 24 + 8 lanes);
# no expand layer; 1-pixel rows; rows past one thread's share (the chunks
# remake the expanded rows they share) and chunks crossing images; below 64
# expanded channels the interior pixels' own path (32 at stride 1 and 2, 40).
IR_CASES = [(2, 9, 11, 8, 3, 8, 1, True), (1, 7, 6, 5, 1, 7, 2, False),
            (1, 5, 5, 5, 3, 7, 1, False), (2, 10, 9, 16, 6, 24, 2, False),
            (1, 12, 12, 24, 6, 32, 2, False), (2, 6, 7, 40, 6, 50, 1, False),
            (1, 15, 20, 160, 6, 160, 1, True), (1, 3, 17, 8, 3, 40, 2, False),
            (1, 1, 9, 8, 2, 8, 1, True), (4, 70, 5, 8, 2, 8, 1, True),
            (3, 41, 6, 8, 6, 16, 2, False), (1, 40, 9, 32, 1, 16, 1, False),
            (2, 8, 21, 32, 1, 16, 2, False), (1, 6, 19, 40, 1, 24, 1, False)]


@pytest.mark.parametrize("case", IR_CASES, ids=lambda c: "-".join(map(str, c)))
def test_inverted_residual_equals_numpy_definition(case):
  b, h, w, c, expansion, cout, stride, residual = case
  rng = np.random.default_rng(sum(case[:6]) + 7 * stride)
  x = (3 * rng.standard_normal((b, h, w, c))).astype(np.float32)
  expand, depthwise, project = block_weights(rng, c, expansion, cout)
  we, be = expand if expand else (None, None)
  y = native.inverted_residual_forward(x, we, be, *depthwise, *project, stride, residual)
  ref = numpy_inverted_residual(x, we, be, *depthwise, *project, stride, residual)
  assert y.shape == ref.shape and y.dtype == jnp.float32
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)
  # the relu6 clamps are exercised: some expanded values at 0, some at 6
  e = np.clip(x.astype(np.float64) @ we + be, 0, 6) if we is not None else None
  if e is not None:
    assert (e == 0).any() and (e == 6).any()
  # the same as the separate layers the model differentiates instead
  layers = fused.inverted_residual_layers(jnp.asarray(x), (expand, depthwise, project),
                                               stride, residual)
  np.testing.assert_allclose(y, layers, rtol=1e-5, atol=1e-5)


def test_inverted_residual_hand_case():
  # One pixel, one channel, two images x = 2 and 10; only the depthwise's
  # centre tap reads inside the image. x = 2: e = relu6(2 * 1.5 - 1) = 2,
  # d = relu6(2 * 0.5 + 0.25) = 1.25, y = 1.25 * 2 + 0.5 + x = 5.
  # x = 10: e = relu6(14) = 6, d = relu6(3.25) = 3.25, y = 7 + 10 = 17.
  x = jnp.asarray([2.0, 10.0]).reshape(2, 1, 1, 1)
  kd = jnp.full((3, 3, 1), 100.0).at[1, 1, 0].set(0.5)
  y = native.inverted_residual_forward(x, jnp.full((1, 1), 1.5), jnp.full((1,), -1.0), kd,
                                       jnp.full((1,), 0.25), jnp.full((1, 1), 2.0),
                                       jnp.full((1,), 0.5), 1, True)
  np.testing.assert_array_equal(y.reshape(-1), [5.0, 17.0])


def test_fused_block_gradients_are_the_layers_own():
  """Differentiating `fused_inverted_residual` runs the separate layers'
  forward and backward: the same value and gradients bit for bit as
  differentiating `_inverted_residual_layers` itself; without
  differentiation it is the native block (its own rounding)."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((2, 9, 10, 16)), jnp.float32)
  weights = jax.tree.map(jnp.asarray, block_weights(rng, 16, 6, 16))
  cot = jnp.asarray(rng.standard_normal((2, 9, 10, 16)), jnp.float32)

  def loss(fn):
    return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(fn(x, w, 1, True) * cot),
                                      argnums=(0, 1)))
  v_f, g_f = loss(fused.fused_inverted_residual)(x, weights)
  v_l, g_l = loss(fused.inverted_residual_layers)(x, weights)
  assert float(v_f) == float(v_l)
  for a, b in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_l)):
    np.testing.assert_array_equal(a, b)
  lowered = jax.jit(lambda x, w: fused.fused_inverted_residual(x, w, 1, True)).lower(
      x, weights).as_text()
  assert "structvpr_inverted_residual_forward" in lowered
  assert "structvpr_inverted_residual_forward" not in jax.jit(
      jax.grad(lambda x, w: jnp.sum(fused.fused_inverted_residual(x, w, 1, True)),
               argnums=1)).lower(x, weights).as_text()


def test_inverted_residual_rejects_bad_shapes():
  x = jnp.ones((1, 4, 4, 8))
  (we, be), (kd, bd), (wp, bp) = block_weights(np.random.default_rng(0), 8, 2, 8)
  with pytest.raises(Exception, match="a residual needs stride 1"):
    jax.block_until_ready(native.inverted_residual_forward(x, we, be, kd, bd, wp, bp, 2, True))
  with pytest.raises(Exception, match="project kernel must be"):
    jax.block_until_ready(native.inverted_residual_forward(x, we, be, kd, bd, wp[:-1], bp, 1,
                                                           False))


# --- the expand 1x1 + depthwise backward in one pass -----------------------

def numpy_expand_depthwise_vjp(x, we, be, kd, bd, stride, dz):
  """(z, (dx, dwe, dbe, dkd, dbd)) of z = relu6(depthwise(relu6(x we + be),
  kd) + bd) for the cotangent dz, from the definition in float64; relu6's
  derivative 1 where 0 < . < 6, else 0."""
  x, we, be, kd, bd, dz = (np.asarray(a, np.float64) for a in (x, we, be, kd, bd, dz))
  m = x @ we + be
  e = np.clip(m, 0, 6)
  y = numpy_depthwise(e, kd, stride) + bd
  cot = dz * ((y > 0) & (y < 6))
  de, dkd = numpy_depthwise_vjp(e, kd, cot, stride)
  dm = de * ((m > 0) & (m < 6))
  c = x.shape[-1]
  dwe = x.reshape(-1, c).T @ dm.reshape(-1, we.shape[1])
  return np.clip(y, 0, 6), (dm @ we.T, dwe, dm.sum((0, 1, 2)), dkd, cot.sum((0, 1, 2)))


# (batch, h, w, c, ce, stride). Expanded widths cover the 96-, 48- and
# 16-wide outer-product tiles and their sums (16, 48, 96, 112, 144); rows
# not a multiple of the 16-pixel tiles (5, 9, 13, 30); odd and even sizes
# at stride 2; batch x rows past the 32 fixed chunks (the per-chunk partial
# sums); C of 4 and 24 (the 4-row tiles).
JOINT_CASES = [(2, 7, 9, 4, 16, 1), (1, 6, 13, 8, 48, 2), (2, 5, 30, 24, 144, 1),
               (1, 9, 5, 16, 96, 2), (40, 2, 3, 8, 112, 1), (3, 4, 17, 12, 48, 2)]


@pytest.mark.parametrize("case", JOINT_CASES, ids=lambda c: "-".join(map(str, c)))
def test_joint_expand_depthwise_backward_equals_numpy_definition(case):
  b, h, w, c, ce, stride = case
  rng = np.random.default_rng(sum(case))
  x = (2 * rng.standard_normal((b, h, w, c))).astype(np.float32)
  we = (rng.standard_normal((c, ce)) / np.sqrt(c)).astype(np.float32)
  be, bd = (2 * rng.standard_normal((2, ce))).astype(np.float32)
  kd = (rng.standard_normal((3, 3, ce)) / 2).astype(np.float32)
  z, vjp = jax.vjp(lambda *a: fused._expand_depthwise_native(*a, stride), x, we, be, kd, bd)
  dz = rng.standard_normal(z.shape).astype(np.float32)
  ref_z, ref_grads = numpy_expand_depthwise_vjp(x, we, be, kd, bd, stride, dz)
  np.testing.assert_allclose(z, ref_z, rtol=1e-5, atol=1e-5)
  m = x.astype(np.float64) @ we + be   # both relu6 clamps are exercised
  assert (m <= 0).any() and (m >= 6).any() and (ref_z == 0).any() and (ref_z == 6).any()
  for name, got, ref in zip(("dx", "dwe", "dbe", "dkd", "dbd"), vjp(dz), ref_grads):
    assert got.shape == ref.shape and got.dtype == jnp.float32, name
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=name)


def test_joint_expand_depthwise_backward_hand_case():
  # One image, one pixel, C = 4 (x = 1, 0, 0, 0), Ce = 16: only the
  # depthwise's centre tap k = 2 reads inside. Channel 0: m = 1 * 1 = 1,
  # e = relu6(1 + 0.5) = 1.5, y = 1.5 * 2 + 0.25 = 3.25 (inside the clamp),
  # so with dz = 1: dbd = 1, dkd[1, 1] = e = 1.5, dm = 1 * 2 = 2 = dbe,
  # dwe[0, 0] = x0 * dm = 2, dx = dm * we[:, 0] = (2, 0, 0, 0). Channels
  # 1..15 have we = 0 and be = -1: e = 0, dm = 0, dkd = 0, y = 0.25, dbd = 1.
  x = jnp.asarray([1.0, 0.0, 0.0, 0.0]).reshape(1, 1, 1, 4)
  we = jnp.zeros((4, 16)).at[0, 0].set(1.0)
  be = jnp.full((16,), -1.0).at[0].set(0.5)
  kd = jnp.full((3, 3, 16), 100.0).at[1, 1].set(2.0)
  bd = jnp.full((16,), 0.25)
  z, vjp = jax.vjp(lambda *a: fused._expand_depthwise_native(*a, 1), x, we, be, kd, bd)
  np.testing.assert_array_equal(z.reshape(-1), [3.25] + [0.25] * 15)
  dx, dwe, dbe, dkd, dbd = vjp(jnp.ones_like(z))
  np.testing.assert_array_equal(dx.reshape(-1), [2.0, 0.0, 0.0, 0.0])
  np.testing.assert_array_equal(dwe, np.pad([[2.0]], ((0, 3), (0, 15))))
  np.testing.assert_array_equal(dbe, [2.0] + [0.0] * 15)
  np.testing.assert_array_equal(dkd, np.pad([[[1.5]]], ((1, 1), (1, 1), (0, 15))))
  np.testing.assert_array_equal(dbd, np.ones(16))


def block_case(rng, w, c=8, ce=48, cout=8):
  x = jnp.asarray(2 * rng.standard_normal((2, 6, w, c)), jnp.float32)
  weights = jax.tree.map(jnp.asarray, block_weights(rng, c, ce // c, cout))
  return x, weights


def test_block_takes_the_joint_backward_on_wide_rows_only(monkeypatch):
  """`_inverted_residual_layers` differentiates the expand and depthwise
  layers in one pass where rows are at least JOINT_EXPAND_BACKWARD_MIN_WIDTH
  wide and channels fit: the same value bit for bit, gradients equal to the
  layers' own up to float32 rounding and bitwise repeatable; narrow rows,
  float64 and channels that do not fit take the layers' own backward."""
  monkeypatch.setattr(dispatch, "JOINT_EXPAND_BACKWARD_MIN_WIDTH", 12)
  rng = np.random.default_rng(3)

  def grad_fn(residual=True):
    return jax.jit(jax.value_and_grad(
        lambda x, w: jnp.sum(fused.inverted_residual_layers(x, w, 1, residual) ** 2),
        argnums=(0, 1)))

  def joint(x, w, residual=True):
    return "structvpr_expand_depthwise_backward" in grad_fn(residual).lower(x, w).as_text()

  x, weights = block_case(rng, 12)
  assert joint(x, weights)
  value, grads = grad_fn()(x, weights)
  again = grad_fn()(x, weights)
  for a, b in zip(jax.tree.leaves((value, grads)), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  monkeypatch.setattr(dispatch, "JOINT_EXPAND_BACKWARD_MIN_WIDTH", 13)
  assert not joint(x, weights)
  ref_value, ref_grads = grad_fn()(x, weights)
  assert float(value) == float(ref_value)
  for a, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5 * np.abs(r).max())
  monkeypatch.setattr(dispatch, "JOINT_EXPAND_BACKWARD_MIN_WIDTH", 1)
  (we, be), (kd, bd), _ = weights
  applies = dispatch.joint_expand_backward_applies
  assert applies(x, we, be, kd, bd, 1)
  as64 = lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float64)   # the exactness tests' dtype
  assert not applies(as64(x), we, be, kd, bd, 1) and not applies(x, as64(we), be, kd, bd, 1)
  x6, w6 = block_case(rng, 12, c=6, ce=36, cout=6)     # C % 4, Ce % 16 do not fit
  assert not joint(x6, w6)
  assert joint(*block_case(rng, 12, c=4, ce=16, cout=8), residual=False)


def test_joint_backward_rejects_channels_it_cannot_tile():
  x = jnp.ones((1, 3, 3, 6))
  we, m = jnp.ones((6, 16)), jnp.ones((1, 3, 3, 16))
  with pytest.raises(Exception, match="Ce a multiple of 16 and C a multiple of 4"):
    jax.block_until_ready(native.expand_depthwise_backward(
        x, we, m, jnp.ones((3, 3, 16)), jnp.ones(16), m, m, 1))
  with pytest.raises(Exception, match="expand kernel must be"):
    jax.block_until_ready(native.expand_depthwise_backward(
        jnp.ones((1, 3, 3, 8)), we, m, jnp.ones((3, 3, 16)), jnp.ones(16), m, m, 1))
