"""PyTorch reference of the RGB branch, for `experiments/performance/bench.py` only.

The same architecture as the spec `experiments/performance/bench.py` times (the
`Branch("mobilenet_v2", width=1.0, dim=None, num_clusters=64)` of
structvpr_jax): MobileNetV2-1.0 (stem 3x3/2 32 -> 17 inverted residual
blocks -> 1x1 1280 with BatchNorm and no final ReLU6) -> NetVLAD-64 on the
1280-d local features (L2-normalised locals, softmax assignment, residual
sums, intra-normalisation, final L2) = 81,920-d, and the step of
`structvpr_jax.train_lib.make_train_step`: uint8 images scaled to [-1, 1]
(the "tflite" normalisation), the triplet margin loss (unsquared L2
distances, margin 0.1), gradient clipping to global norm 1.0, Adam, with
BatchNorm either in training mode (batch statistics, running averages
updated) or frozen (running statistics, the parameters still trained: the
mode the pipeline trains with). Written by hand (torchvision is not
importable beside the CPU torch wheel used here); it is only a speed
reference, its weights are random.

Padding differs in one detail that does not change the FLOPs: torch pads
3x3 convolutions symmetrically by 1, the JAX model uses TF "SAME" (pad 0
before, 1 after for stride 2).

  python experiments/performance/torch_reference.py [--quick] [--repeats N] [--device cuda]
      [--sizes 224,480x640]

prints one JSON object {"figures": {...}, "info": {...}, "peak_rss_mb"}
(the worker protocol of bench.py, which runs it in a fresh process). Needs
the optional extra `bench` (`pip install -e ".[bench]"`, torch 2.13.0 CPU).
Layout: channels_last (NHWC in memory), measured faster on this CPU.
`--device cuda` (experiments/device_check.py) runs the same figures on the
GPU, each timed call waited for (torch.cuda.synchronize), and adds the
device's name and peak allocated memory to "info"; the default is the CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
from torch import nn
import torch.nn.functional as F

# (expansion t, output channels c, repeats n, first stride s), as in
# structvpr_jax.models.mobilenet.MOBILENET_V2_BLOCKS.
BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
          (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1,
            relu6: bool = True) -> nn.Sequential:
  layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=1e-3, momentum=0.1)]
  if relu6:
    layers.append(nn.ReLU6(inplace=True))
  return nn.Sequential(*layers)


class InvertedResidual(nn.Module):

  def __init__(self, cin: int, cout: int, stride: int, expansion: int):
    super().__init__()
    hidden = cin * expansion
    layers = [] if expansion == 1 else [conv_bn(cin, hidden)]
    layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden),
               conv_bn(hidden, cout, relu6=False)]
    self.body = nn.Sequential(*layers)
    self.residual = stride == 1 and cin == cout

  def forward(self, x):
    y = self.body(x)
    return x + y if self.residual else y


class NetVLAD(nn.Module):
  """[B, D, H, W] -> [B, K*D], the formulas of structvpr_jax.models.netvlad."""

  def __init__(self, num_clusters: int, dim: int):
    super().__init__()
    self.assign = nn.Linear(dim, num_clusters)
    self.centroids = nn.Parameter(torch.rand(num_clusters, dim))

  def forward(self, x):
    b, d = x.shape[:2]
    x = F.normalize(x.flatten(2).transpose(1, 2), dim=-1)           # [B, N, D]
    a = F.softmax(self.assign(x), dim=-1)                           # [B, N, K]
    vlad = torch.einsum("bnk,bnd->bkd", a, x) - a.sum(1)[..., None] * self.centroids
    vlad = F.normalize(vlad, dim=-1).reshape(b, -1)
    return F.normalize(vlad, dim=-1)


class RGBBranch(nn.Module):
  """MobileNetV2-1.0 + NetVLAD-64 (81,920-d descriptors)."""

  def __init__(self, num_clusters: int = 64):
    super().__init__()
    layers = [conv_bn(3, 32, 3, 2)]
    cin = 32
    for t, c, n, s in BLOCKS:
      for i in range(n):
        layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
        cin = c
    layers.append(conv_bn(cin, 1280, relu6=False))
    self.features = nn.Sequential(*layers)
    self.netvlad = NetVLAD(num_clusters, 1280)

  def forward(self, x):
    return self.netvlad(self.features(x))


def normalize(images: torch.Tensor) -> torch.Tensor:
  """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1], channels_last in memory
  (structvpr_jax.models.spec.normalize_rgb, "tflite")."""
  return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def triplet_margin_loss(q, p, n, margin: float = 0.1):
  """q, p [B, D]; n [B, M, D]; unsquared L2 distances (losses.py's formula)."""
  d_pos = (q - p).norm(dim=-1)
  d_neg = (q[:, None] - n).norm(dim=-1)
  return F.relu(d_pos[:, None] - d_neg + margin).mean()


def set_batchnorm(model: nn.Module, batchnorm: str) -> None:
  """Training mode for the train step: "batch" (batch statistics, running
  averages updated) or "frozen" (BatchNorm layers in eval mode: running
  statistics, never updated; their scale and bias are still trained)."""
  model.train()
  if batchnorm == "frozen":
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.eval()
  elif batchnorm != "batch":
    raise ValueError(f"batchnorm={batchnorm!r}; expected 'batch' or 'frozen'")


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               margin: float = 0.1, grad_clip: float = 1.0) -> torch.Tensor:
  """One step on uint8 images [B, 2 + M, H, W, 3] (query, positive, M negatives):
  the triplet loss, gradients clipped to global norm `grad_clip`, an optimizer
  step. BatchNorm follows the model's modes (`set_batchnorm`). Returns the
  loss (0-d, detached)."""
  b, k = images.shape[:2]
  optimizer.zero_grad(set_to_none=True)
  desc = model(normalize(images.flatten(0, 1))).reshape(b, k, -1)
  loss = triplet_margin_loss(desc[:, 0], desc[:, 1], desc[:, 2:], margin)
  loss.backward()
  nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
  optimizer.step()
  return loss.detach()


# structvpr_jax.evaluation.MICRO_BATCH_PIXELS (not imported: no JAX in this
# process; tests/test_bench.py checks they agree)
MICRO_BATCH_PIXELS = 1 << 20


def micro_batch_size(batch: int, hw) -> int:
  """The images per chunk our CPU extraction uses by default
  (`evaluation.micro_batch_size`): the largest divisor of `batch` whose chunk
  holds at most MICRO_BATCH_PIXELS pixels, at least 1."""
  pixels = hw[0] * hw[1]
  return max([d for d in range(1, batch + 1) if batch % d == 0 and d * pixels <=
              MICRO_BATCH_PIXELS], default=1)


def forward_call(model: nn.Module, images: torch.Tensor, chunk: int = 0):
  """A no-argument inference forward of uint8 `images` [B, H, W, 3] (in
  chunks of `chunk` images when > 0)."""
  chunk = chunk or len(images)

  def forward():
    with torch.inference_mode():
      return torch.cat([model(normalize(images[i:i + chunk]))
                        for i in range(0, len(images), chunk)])

  return forward


# Untimed warm-up after the first call, in seconds (0 with --quick), as bench.py's.
WARMUP_S = 1.0
# Waits for a call's device work (main sets torch.cuda.synchronize with --device cuda).
SYNC = lambda: None  # noqa: E731


def _median_time(fn, repeats: int) -> tuple[float, float]:
  """(first-call seconds, median seconds of `repeats` further calls, timed
  after `WARMUP_S` seconds of untimed calls)."""
  t0 = time.perf_counter()
  fn()
  SYNC()
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  while time.perf_counter() - t0 < WARMUP_S:
    fn()
    SYNC()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    SYNC()
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def bench(repeats: int = 3, quick: bool = False, device: str = "cpu",
          only_sizes: tuple = ()) -> dict:
  """img/s of forward (16 images at 224x224 and 480x640) and of the train step
  (4 triplets at 224, 2 at 480x640; BatchNorm "batch" and "frozen"), the
  shapes of bench.py's JAX figures; --quick: 64x64 / 96x128, NetVLAD-8.
  `device`: where the model and images live ("cpu", "cuda"); `only_sizes`:
  some of "224", "480x640" (() = both).

  Returns {"figures": {"torch_<figure>_img_s", "torch_<figure>_first_s"}, "info"}.
  """
  torch.manual_seed(0)
  sizes = {"224": (64, 64) if quick else (224, 224),
           "480x640": (96, 128) if quick else (480, 640)}
  sizes = {k: v for k, v in sizes.items() if not only_sizes or k in only_sizes}
  triplets = {"224": 4, "480x640": 2}
  model = RGBBranch(8 if quick else 64).to(device=device, memory_format=torch.channels_last)
  figures = {}

  def record(name: str, images: int, fn):
    first, sec = _median_time(fn, repeats)
    figures[f"torch_{name}_img_s"] = images / sec
    figures[f"torch_{name}_first_s"] = first

  model.eval()
  for key, hw in sizes.items():
    x = torch.randint(0, 256, (16, *hw, 3), dtype=torch.uint8, device=device)
    record(f"forward_{key}", 16, forward_call(model, x))
    record(f"forward_{key}_chunked", 16, forward_call(model, x, micro_batch_size(16, hw)))

  optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
  for key, hw in sizes.items():
    images = torch.randint(0, 256, (triplets[key], 3, *hw, 3), dtype=torch.uint8,
                           device=device)
    for batchnorm, suffix in (("batch", ""), ("frozen", "_frozen")):
      set_batchnorm(model, batchnorm)
      record(f"train_step_{key}{suffix}", images.shape[0] * images.shape[1],
             lambda: train_step(model, optimizer, images))
  info = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
  if device != "cpu":
    info["torch_device"] = torch.cuda.get_device_name(torch.device(device))
    info["torch_device_peak_bytes"] = int(torch.cuda.max_memory_allocated(torch.device(device)))
    info["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
  return {"figures": figures, "info": info}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first call and 1 s of warm-up calls")
  parser.add_argument("--quick", action="store_true", help="tiny sizes (figures meaningless)")
  parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
  parser.add_argument("--sizes", default="", help="comma list of 224,480x640 (default both)")
  args = parser.parse_args()
  global WARMUP_S, SYNC
  WARMUP_S = 0.0 if args.quick else WARMUP_S
  only_sizes = tuple(k for k in args.sizes.split(",") if k)
  if set(only_sizes) - {"224", "480x640"}:
    parser.error(f"--sizes {args.sizes!r}: expected some of 224,480x640")
  if args.device != "cpu":
    if not torch.cuda.is_available():
      parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device "
                   "(a CPU-only wheel, or no driver)")
    SYNC = torch.cuda.synchronize
    # cuDNN picks its convolution algorithms by timing them, as XLA:GPU autotunes its own
    torch.backends.cudnn.benchmark = True
  out = bench(args.repeats, args.quick, args.device, only_sizes)
  out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(json.dumps(out))


if __name__ == "__main__":
  main()
