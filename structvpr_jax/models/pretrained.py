"""ImageNet MobileNetV2 weights from a quantised TFLite file.

The reference file is `mobilenet_v2_1.0_224_quant.tflite` (google-coral
test_data, Apache-2.0): MobileNetV2 1.0/224, uint8 weights and activations,
BatchNorm folded into the convolutions (weights scaled, folded bias as an
int32 tensor), 1001 classes with 0 = background. This module

- reads every CONV_2D / DEPTHWISE_CONV_2D op in execution order with
  `ai_edge_litert.interpreter.Interpreter` (`pip install ai-edge-litert`),
- dequantises weights and biases with each tensor's own scales and zero points
  (per-channel along `quantized_dimension` where the file gives several),
- maps them, in order and checked by shape, onto our
  `MobileNetV2(width=1.0, num_classes=1001)` param tree: `stem`,
  `block0..16/{expand,depthwise,project}`, `last`, `head`,
- loads each folded bias as an identity BatchNorm (scale 1, mean 0,
  var = 1 - eps so that `rsqrt(var + eps) == 1` exactly in float32).

Input preprocessing: the TFLite input is uint8 with scale 1/128 and zero
point 128, i.e. the network sees `(pixel - 128) / 128` in [-1, 1);
`preprocess_imagenet` does exactly that (`input_quantization(path)` reads the
numbers from the file).

The RGB branch takes `config.rgb.init = "imagenet_tflite:<path>"`:
`parse_init` validates that spec and `init_branch_from_tflite` replaces the
branch's `encoder` variables (the classification head is dropped).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from structvpr_jax.models import mobilenet, weights

BN_EPSILON = 1e-3            # ConvBN's BatchNorm epsilon (models/mobilenet.py)
INPUT_SCALE = 1.0 / 128.0    # the reference file's uint8 input quantisation
INPUT_ZERO_POINT = 128
INPUT_SIZE = (224, 224)
NUM_CLASSES = 1001           # ImageNet 1000 + background (index 0)
INIT_KINDS = ("imagenet_tflite",)
ENCODER = "encoder"          # the backbone submodule of models.branch.Branch

_CONV_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D")


def _interpreter_cls():
  try:  # imported here: the TFLite runtime may be missing (rgb.init="auto" then falls back)
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("reading .tflite files needs ai-edge-litert: "
                      "pip install ai-edge-litert (or pip install -e .[segment])") from e
  return Interpreter, OpResolverType


def make_interpreter(path: str, num_threads: Optional[int] = None,
                     delegates: bool = True, preserve_all_tensors: bool = False):
  """A TFLite interpreter with tensors allocated.

  Args:
    path: .tflite file.
    num_threads: CPU threads (None = library default).
    delegates: False uses the builtin kernels only (no XNNPACK), so
      `_get_ops_details` lists the real ops and, with `preserve_all_tensors`,
      every intermediate tensor can be read after `invoke`.
    preserve_all_tensors: keep intermediates readable (debugging / reference).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such TFLite model file")
  interpreter_cls, resolver = _interpreter_cls()
  kwargs = dict(model_path=path, num_threads=num_threads)
  if not delegates:
    kwargs["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
  if preserve_all_tensors:
    kwargs["experimental_preserve_all_tensors"] = True
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "preserve_all_tensors is for debugging"
    interpreter = interpreter_cls(**kwargs)
  interpreter.allocate_tensors()
  return interpreter


def dequantize(values: np.ndarray, details: dict) -> np.ndarray:
  """float32 `(q - zero_point) * scale` with the tensor's own quantisation.

  Per-channel parameters (several scales) broadcast along
  `quantization_parameters["quantized_dimension"]`; a tensor without
  quantisation (float, or empty scales) is returned as float32.
  """
  q = details.get("quantization_parameters") or {}
  scales = np.asarray(q.get("scales", []), np.float64)
  values = np.asarray(values)
  if scales.size == 0:
    scale, zero = details.get("quantization", (0.0, 0))
    if not scale or np.issubdtype(values.dtype, np.floating):
      return values.astype(np.float32)
    scales, zeros, axis = np.array([scale]), np.array([zero]), 0
  else:
    zeros = np.asarray(q.get("zero_points", np.zeros_like(scales)), np.float64)
    if zeros.size == 0:
      zeros = np.zeros_like(scales)
    axis = int(q.get("quantized_dimension", 0))
  if scales.size > 1:
    shape = [1] * values.ndim
    shape[axis] = scales.size
    scales, zeros = scales.reshape(shape), zeros.reshape(shape)
  return ((values.astype(np.float64) - zeros) * scales).astype(np.float32)


def input_quantization(path: str) -> tuple[float, int]:
  """(scale, zero_point) of the model's input tensor ((0.0, 0) for float input)."""
  interpreter = make_interpreter(path)
  scale, zero = interpreter.get_input_details()[0]["quantization"]
  return float(scale), int(zero)


def preprocess_imagenet(image: np.ndarray, size: Optional[tuple[int, int]] = None
                        ) -> np.ndarray:
  """uint8 RGB [..., H, W, 3] -> float32 `(pixel - 128) / 128` in [-1, 1).

  Matches the TFLite file's uint8 input quantisation (scale 1/128, zero point
  128): feeding the uint8 image to the interpreter and this array to our
  float model gives the network the same real-valued input.

  Args:
    image: uint8 array [H, W, 3] or [B, H, W, 3].
    size: optional (H, W): resize first with bilinear filtering (PIL), as for
      the 224x224 classifier input.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"preprocess_imagenet expects uint8 pixels, got {image.dtype}")
  if size is not None and tuple(image.shape[-3:-1]) != tuple(size):
    resize = lambda im: np.asarray(Image.fromarray(im).resize(
        (int(size[1]), int(size[0])), Image.BILINEAR))
    image = (resize(image) if image.ndim == 3 else
             np.stack([resize(im) for im in image.reshape((-1,) + image.shape[-3:])])
             .reshape(image.shape[:-3] + tuple(size) + image.shape[-1:]))
  return ((image.astype(np.float32) - INPUT_ZERO_POINT) * INPUT_SCALE).astype(np.float32)


def read_tflite_convs(path: str) -> list[dict]:
  """Every CONV_2D / DEPTHWISE_CONV_2D op of the file, in execution order.

  Returns:
    list of dicts: `op` (op name), `name` (weight tensor name), `weight`
    (float32, TFLite layout: [O, kh, kw, I] for CONV_2D, [1, kh, kw, C] for
    DEPTHWISE_CONV_2D), `bias` (float32 [O] or None).
  """
  interpreter = make_interpreter(path, delegates=False)
  get_ops = getattr(interpreter, "_get_ops_details", None)
  if get_ops is None:  # pragma: no cover - depends on the library version
    raise RuntimeError("this ai-edge-litert has no Interpreter._get_ops_details; "
                       "cannot list the ops of " + path)
  details = {d["index"]: d for d in interpreter.get_tensor_details()}

  def read(index):
    if index < 0:
      return None
    return dequantize(interpreter.get_tensor(index), details[index])

  convs = []
  for op in get_ops():
    if op["op_name"] not in _CONV_OPS:
      continue
    inputs = [int(i) for i in op["inputs"]]
    convs.append(dict(op=op["op_name"], name=details[inputs[1]]["name"],
                      weight=read(inputs[1]),
                      bias=read(inputs[2]) if len(inputs) > 2 else None))
  return convs


def _module_order(params: dict) -> list[tuple[str, ...]]:
  """Conv-bearing module paths of a MobileNetV2 param tree, in forward order."""
  order = [("stem",)]
  index = 0
  while f"block{index}" in params:
    block = params[f"block{index}"]
    order += [(f"block{index}", name) for name in ("expand", "depthwise", "project")
              if name in block]
    index += 1
  if "last" in params:
    order.append(("last",))
  if "head" in params:
    order.append(("head",))
  return order


def _get(tree: dict, path: tuple[str, ...]) -> dict:
  for key in path:
    tree = tree[key]
  return tree


def _convert_weight(conv: dict, target_shape: tuple[int, ...], where: str) -> np.ndarray:
  w = conv["weight"]
  if conv["op"] == "DEPTHWISE_CONV_2D":
    if w.ndim != 4 or w.shape[0] != 1:
      raise ValueError(f"{where}: depthwise weight {conv['name']} has shape {w.shape}")
    out = w[0]                                      # [kh, kw, C]
  elif len(target_shape) == 2:                      # 1x1 conv as nn.Dense [Cin, Cout]
    if w.ndim != 4 or w.shape[1:3] != (1, 1):
      raise ValueError(f"{where}: weight {conv['name']} shape {w.shape} is not a 1x1 conv")
    out = w[:, 0, 0, :].T
  else:                                             # nn.Conv [kh, kw, Cin, Cout]
    out = np.transpose(w, (1, 2, 3, 0))
  if out.shape != tuple(target_shape):
    raise ValueError(f"{where}: TFLite weight {conv['name']} converts to shape {out.shape}, "
                     f"our model expects {tuple(target_shape)}")
  return out


def identity_batchnorm(bias: np.ndarray, epsilon: float = BN_EPSILON) -> tuple[dict, dict]:
  """(params, batch_stats) of a BatchNorm that is exactly `x + bias` in float32."""
  c = bias.shape[0]
  var = np.float32(1.0) - np.float32(epsilon)
  assert var + np.float32(epsilon) == np.float32(1.0)
  params = {"scale": jnp.ones((c,), jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}
  stats = {"mean": jnp.zeros((c,), jnp.float32), "var": jnp.full((c,), var, jnp.float32)}
  return params, stats


def load_mobilenet_v2_tflite(path: str, width: float = 1.0,
                             num_classes: Optional[int] = NUM_CLASSES) -> dict:
  """Variables of `MobileNetV2(width, num_classes)` from a quantised .tflite file.

  Args:
    path: e.g. `mobilenet_v2_1.0_224_quant.tflite`.
    width: width multiplier of the file (1.0 for the reference file).
    num_classes: 1001 to load the classifier head; None drops it (backbone).

  Returns:
    `{"params": ..., "batch_stats": ...}` (nested dicts of float32 jax arrays).

  Raises:
    ValueError: the file's convolutions do not match the model in number,
      kind or shape (message names the first mismatch).
  """
  model = mobilenet.MobileNetV2(width=width, num_classes=num_classes or NUM_CLASSES)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 32, 32, 3)), False))
  convs = read_tflite_convs(path)
  order = _module_order(shapes["params"])
  if len(convs) != len(order):
    raise ValueError(f"{path}: {len(convs)} conv ops, MobileNetV2(width={width}) with a "
                     f"head has {len(order)} conv layers")
  params: dict[str, Any] = {}
  stats: dict[str, Any] = {}
  for module, conv in zip(order, convs):
    where = f"{path}: {'/'.join(module)}"
    target = _get(shapes["params"], module)
    is_dw = module[-1] == "depthwise"
    if is_dw != (conv["op"] == "DEPTHWISE_CONV_2D"):
      raise ValueError(f"{where} is {'depthwise' if is_dw else 'a full conv'} but the "
                       f"TFLite op is {conv['op']} ({conv['name']})")
    if conv["bias"] is None:
      raise ValueError(f"{where}: TFLite op {conv['name']} has no (folded) bias")
    p_node = params
    s_node = stats
    for key in module[:-1]:
      p_node = p_node.setdefault(key, {})
      s_node = s_node.setdefault(key, {})
    if module == ("head",):
      kernel = _convert_weight(conv, target["kernel"].shape, where)
      if conv["bias"].shape != target["bias"].shape:
        raise ValueError(f"{where}: bias shape {conv['bias'].shape} != {target['bias'].shape}")
      p_node["head"] = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(conv["bias"])}
      continue
    kernel = _convert_weight(conv, target["conv"]["kernel"].shape, where)
    if conv["bias"].shape != target["bn"]["bias"].shape:
      raise ValueError(f"{where}: bias shape {conv['bias'].shape} != "
                       f"{target['bn']['bias'].shape}")
    bn_params, bn_stats = identity_batchnorm(conv["bias"])
    p_node[module[-1]] = {"conv": {"kernel": jnp.asarray(kernel)}, "bn": bn_params}
    s_node[module[-1]] = {"bn": bn_stats}
  variables = {"params": params, "batch_stats": stats}
  return variables if num_classes else backbone_variables(variables)


def backbone_variables(variables: dict) -> dict:
  """The same variables without the classification head (`head` params)."""
  out = {}
  for collection, tree in variables.items():
    out[collection] = {k: v for k, v in tree.items() if k != "head"}
  return out


def init_branch_from_tflite(branch_variables: dict, path: str) -> dict:
  """Branch variables with the `encoder` replaced by the ImageNet weights.

  Args:
    branch_variables: variables of `models.branch.Branch(backbone="mobilenet_v2",
      width=1.0, ...)` (`params`, `batch_stats`, ...).
    path: the .tflite file.

  Returns:
    A new dict; projection, NetVLAD and any other collection are unchanged.

  Raises:
    ValueError: the branch's encoder does not have the file's structure/shapes.
  """
  loaded = backbone_variables(load_mobilenet_v2_tflite(path))
  out = dict(branch_variables)
  for collection in ("params", "batch_stats"):
    if collection not in branch_variables or ENCODER not in branch_variables[collection]:
      raise ValueError(f"branch variables have no {collection}/{ENCODER}")
    old = branch_variables[collection][ENCODER]
    new = loaded[collection]
    old_shapes = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), old)
    new_shapes = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), new)
    if old_shapes != new_shapes:
      raise ValueError(
          f"{path}: the branch encoder's {collection} do not match MobileNetV2(width=1.0) "
          "ImageNet weights (use rgb.backbone='mobilenet_v2', rgb.width=1.0 and the "
          "default blocks)")
    dtypes = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a: a.dtype, old))
    dtype = dtypes[0] if dtypes else jnp.float32
    out[collection] = dict(branch_variables[collection])
    out[collection][ENCODER] = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), new)
  return out


IMAGENET_TFLITE_NAME = weights.FILES["imagenet"].name
IMAGENET_TFLITE_ENV = weights.FILES["imagenet"].env


def find_imagenet_tflite(download: bool = False) -> Optional[str]:
  """The ImageNet MobileNetV2 TFLite file if one is on this machine (or, with
  `download`, once fetched into the cache), else None (`weights.find`)."""
  return weights.find("imagenet", download=download)


def resolve_init(spec: Optional[str], backbone: str, width: float,
                 field: str = "rgb.init") -> str:
  """Turns `"auto"` into a concrete init spec; other specs pass through.

  "auto" = ImageNet weights (`imagenet_tflite:<file>`) when the branch can
  take them (MobileNetV2, width 1.0), the TFLite runtime is installed and
  `weights.find("imagenet")` finds the file (environment variable, cache,
  ../shared/data/models, or a checked download), else "" (random init).
  Setting `$STRUCTVPR_IMAGENET_TFLITE` to a path that does not exist, or a
  download with the wrong checksum, is an error naming the variable / URL.
  """
  spec = (spec or "").strip()
  if spec.lower() != "auto":
    return spec
  env = os.environ.get(IMAGENET_TFLITE_ENV, "")
  if env and not os.path.isfile(env):
    raise ValueError(f"{field}='auto': ${IMAGENET_TFLITE_ENV}={env!r} is not a file")
  if backbone != "mobilenet_v2" or float(width) != 1.0:
    return ""
  try:
    import ai_edge_litert  # noqa: F401  optional runtime that reads the .tflite file
  except ImportError:
    return ""
  try:
    path = find_imagenet_tflite(download=True)
  except ValueError as e:
    raise ValueError(f"{field}='auto': {e}") from None
  return "" if path is None else f"imagenet_tflite:{path}"


def parse_init(spec: Optional[str], field: str = "rgb.init") -> tuple[Optional[str], Optional[str]]:
  """Validates an init spec such as `"imagenet_tflite:/path/model.tflite"`.

  Returns:
    (kind, path); (None, None) for an empty spec (random init).

  Raises:
    ValueError naming `field` for an unknown kind, a missing path or a path
    that is not a file.
  """
  spec = (spec or "").strip()
  if not spec or spec.lower() == "none":
    return None, None
  kind, sep, path = spec.partition(":")
  if not sep or kind not in INIT_KINDS:
    raise ValueError(f"{field}={spec!r}: unknown init; expected '' or one of "
                     f"{[k + ':<path>' for k in INIT_KINDS]}")
  path = os.path.expanduser(path.strip())
  if not path:
    raise ValueError(f"{field}={spec!r}: missing the .tflite path after '{kind}:'")
  if not os.path.isfile(path):
    raise ValueError(f"{field}={spec!r}: no such file {path}")
  return kind, path


def tflite_classify(path: str, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Reference run of the TFLite classifier on one uint8 image at its input size.

  Returns:
    (logits [C] float32: the dequantised input of the final SOFTMAX op,
     probabilities [C] float32: the dequantised model output).
  """
  interpreter = make_interpreter(path, delegates=False, preserve_all_tensors=True)
  inp = interpreter.get_input_details()[0]
  image = np.asarray(image)
  if tuple(image.shape) != tuple(inp["shape"][1:]):
    raise ValueError(f"image shape {image.shape} != model input {tuple(inp['shape'][1:])}")
  interpreter.set_tensor(inp["index"], image[None].astype(inp["dtype"]))
  interpreter.invoke()
  details = {d["index"]: d for d in interpreter.get_tensor_details()}
  out = interpreter.get_output_details()[0]
  probs = dequantize(interpreter.get_tensor(out["index"]), out).reshape(-1)
  softmax = [op for op in interpreter._get_ops_details() if op["op_name"] == "SOFTMAX"]
  if not softmax:
    raise ValueError(f"{path}: no SOFTMAX op, cannot read the logits")
  idx = int(softmax[-1]["inputs"][0])
  logits = dequantize(interpreter.get_tensor(idx), details[idx]).reshape(-1)
  return logits, probs
