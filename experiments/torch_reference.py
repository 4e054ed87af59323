"""PyTorch reference of the RGB branch, for `experiments/bench.py` only.

The same architecture as `structvpr_jax.models.branch.Branch("mobilenet_v2",
width=1.0, dim=None, num_clusters=64)`: MobileNetV2-1.0 (stem 3x3/2 32 ->
17 inverted residual blocks -> 1x1 1280 with BatchNorm and no final ReLU6)
-> NetVLAD-64 on the 1280-d local features (L2-normalised locals, softmax
assignment, residual sums, intra-normalisation, final L2) = 81,920-d, and the
same triplet margin loss (unsquared L2 distances, margin 0.1) and Adam step.
Written by hand (torchvision is not importable beside the CPU torch wheel
used here); it is only a speed reference, its weights are random.

Padding differs in one detail that does not change the FLOPs: torch pads
3x3 convolutions symmetrically by 1, the JAX model uses TF "SAME" (pad 0
before, 1 after for stride 2).

Needs the optional extra `bench` (`pip install -e ".[bench]"`, torch 2.13.0
CPU). Layout: channels_last (NHWC in memory), measured faster on this CPU.
"""

from __future__ import annotations

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


def triplet_margin_loss(q, p, n, margin: float = 0.1):
  """q, p [B, D]; n [B, M, D]; unsquared L2 distances (losses.py's formula)."""
  d_pos = (q - p).norm(dim=-1)
  d_neg = (q[:, None] - n).norm(dim=-1)
  return F.relu(d_pos[:, None] - d_neg + margin).mean()


def _median_time(fn, repeats: int) -> tuple[float, float]:
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def bench(repeats: int = 3, quick: bool = False, threads: int | None = None) -> dict:
  """img/s of forward (16 images at 224x224 and 480x640) and of an Adam train
  step (4 triplets at 224, 2 at 480x640), the shapes of bench.py's JAX figures."""
  if threads:
    torch.set_num_threads(threads)
  torch.manual_seed(0)
  size224 = (64, 64) if quick else (224, 224)
  size480 = (96, 128) if quick else (480, 640)
  model = RGBBranch(8 if quick else 64).to(memory_format=torch.channels_last)
  out = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}

  model.eval()
  for key, hw in (("224", size224), ("480x640", size480)):
    x = torch.randn(16, 3, *hw).contiguous(memory_format=torch.channels_last)

    def forward():
      with torch.inference_mode():
        model(x)

    first, sec = _median_time(forward, repeats)
    out[f"torch_forward_{key}_img_s"] = 16 / sec
    out[f"torch_forward_{key}_first_s"] = first

  model.train()
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
  for key, hw, triplets in (("224", size224, 4), ("480x640", size480, 2)):
    images = torch.randn(3 * triplets, 3, *hw).contiguous(memory_format=torch.channels_last)

    def step():
      optimizer.zero_grad(set_to_none=True)
      desc = model(images).reshape(triplets, 3, -1)
      loss = triplet_margin_loss(desc[:, 0], desc[:, 1], desc[:, 2:])
      loss.backward()
      optimizer.step()

    first, sec = _median_time(step, repeats)
    out[f"torch_train_step_{key}_img_s"] = 3 * triplets / sec
    out[f"torch_train_step_{key}_first_s"] = first
  return out


if __name__ == "__main__":
  import json
  print(json.dumps(bench()))
