"""One StructVPR branch: backbone -> optional 1x1 projection -> NetVLAD.

The projection maps both branches' local features to a common dimension so
that teacher (seg) and student (RGB) global descriptors have the same size
K * dim and can be compared by the distillation loss.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from structvpr_jax.models import mobilenet
from structvpr_jax.models.netvlad import NetVLAD


class Branch(nn.Module):
  """Global-descriptor network for one input modality.

  Attributes:
    backbone: name in `mobilenet.BACKBONES` ("mobilenet_v2" for RGB,
      "mobilenet_light" for SLME label maps).
    width: backbone width multiplier.
    dim: local feature dim after the 1x1 projection; None/0 = no projection.
    num_clusters: NetVLAD K.
    blocks: optional backbone stage table (expansion, channels, repeats,
      stride) replacing the backbone's default (tiny models for tests).
    norm: backbone normalisation, "batch" or "group" (`mobilenet.NORMS`).
    output_stride: the backbone's, 32 (default), 16 or 8.
    depthwise: the backbone's 3x3 depthwise kernel ("auto" | "native" |
      "shifted" | "grouped", `ops.dispatch.resolve_depthwise`; equal results up
      to float rounding).
    trainable_from: first backbone block that gets gradients (0: all).
    remat: recompute block activations in the backward pass (training memory).
    fold_bn: fold frozen BatchNorm into the convolutions (`mobilenet.ConvBN`).
    fused_blocks: evaluate each folded inverted-residual block as one native
      pass (`ops.fused.fused_inverted_residual`; training unaffected).
    bn_axis_name: mesh axis for synchronised BatchNorm (inside shard_map).
    dtype: compute dtype.
    param_dtype: parameter dtype.

  Call: `(x [B, H, W, C] float32, train)` -> `[B, K * D]` float32, unit L2 norm.
  """
  backbone: str = "mobilenet_v2"
  width: float = 1.0
  dim: Optional[int] = None
  num_clusters: int = 64
  blocks: Optional[tuple] = None
  norm: str = "batch"
  output_stride: int = 32
  depthwise: str = "auto"
  trainable_from: int = 0
  remat: bool = False
  fold_bn: bool = False
  fused_blocks: bool = True
  bn_axis_name: Optional[str] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _backbone_kwargs(self) -> dict:
    return {} if self.blocks is None else {"blocks": tuple(tuple(b) for b in self.blocks)}

  def setup(self):
    self.encoder = mobilenet.get_backbone(
        self.backbone, width=self.width, norm=self.norm, output_stride=self.output_stride,
        depthwise=self.depthwise, trainable_from=self.trainable_from, fold_bn=self.fold_bn,
        fused_blocks=self.fused_blocks, remat=self.remat,
        bn_axis_name=self.bn_axis_name, dtype=self.dtype,
        param_dtype=self.param_dtype, last_activation=False, **self._backbone_kwargs())
    self.projection = (nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype,
                                name="projection") if self.dim else None)
    self.netvlad = NetVLAD(self.num_clusters, dtype=self.dtype, param_dtype=self.param_dtype)

  @property
  def local_dim(self) -> int:
    if self.dim:
      return int(self.dim)
    return mobilenet.get_backbone(self.backbone, width=self.width,
                                  **self._backbone_kwargs()).output_features

  @property
  def descriptor_dim(self) -> int:
    return self.num_clusters * self.local_dim

  @nn.nowrap
  def fuses_blocks(self, train: bool = False) -> bool:
    """Whether the backbone's layers run as native passes, so that
    `micro_batch` applies (`mobilenet.MobileNetV2.fuses_blocks`)."""
    return mobilenet.get_backbone(
        self.backbone, norm=self.norm, depthwise=self.depthwise, fold_bn=self.fold_bn,
        fused_blocks=self.fused_blocks, remat=self.remat, dtype=self.dtype,
        param_dtype=self.param_dtype).fuses_blocks(train)

  def local_features(self, x, train: bool = False, micro_batch: int = 0):
    """[B, H, W, C] -> [B, ceil(H/s), ceil(W/s), local_dim] (before NetVLAD), s the
    output stride. `micro_batch` > 0 (where `fuses_blocks`): the backbone's
    half-resolution layers `micro_batch` images at a time."""
    features = self.encoder(x, train, micro_batch)
    if self.projection is not None:
      features = self.projection(features)
    return features

  def __call__(self, x, train: bool = False, micro_batch: int = 0):
    return self.netvlad(self.local_features(x, train, micro_batch))


  def global_and_local(self, x, train: bool = False, micro_batch: int = 0):
    """One pass for re-ranking: (`__call__`'s global descriptor [B, K * D],
    the local features [B, Hf, Wf, D] it aggregates)."""
    features = self.local_features(x, train, micro_batch)
    return self.netvlad(features), features
