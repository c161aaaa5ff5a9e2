"""Backbones: ResNet-50 with frozen BatchNorm (torchvision layout), Swin (swin.py), the official `none`
backbone, and a small convnet trained from scratch for CPU demos and tests.

A backbone maps normalised images (B, H, W, 3) to a list of feature maps (B, h_l, w_l, C_l) and their
channel counts; masks of each level come from `resize_mask` (the official nearest-neighbour resize).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from sparse_detr_jax import layers
from sparse_detr_jax.swin import SwinTransformer

BN_EPS = 1e-5
RESNET50_STAGES = (3, 4, 6, 3)  # bottleneck blocks per stage
RESNET50_OUT_CHANNELS = (512, 1024, 2048)  # C3, C4, C5
SMALL_CONVNET_WIDTHS = (32, 64, 128, 192, 256)  # one stride-2 stage each: strides 2, 4, 8, 16, 32


def resize_mask(mask: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
  """Nearest resize of a (B, H, W) bool mask as torch `F.interpolate` (mode 'nearest') does it.

  Source index = min(floor(dst * (in / out)), in - 1), with the scale in float32 like PyTorch.
  """

  def src_index(n_in: int, n_out: int) -> np.ndarray:
    if n_in == n_out:
      return np.arange(n_out)
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)

  _, h, w = mask.shape
  return mask[:, src_index(h, size[0])][:, :, src_index(w, size[1])]


class FrozenBatchNorm(nn.Module):
  """BatchNorm with fixed statistics and affine terms (collection `batch_stats`, never trained)."""

  eps: float = BN_EPS

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c = x.shape[-1]
    weight = self.variable("batch_stats", "weight", jnp.ones, (c,)).value
    bias = self.variable("batch_stats", "bias", jnp.zeros, (c,)).value
    mean = self.variable("batch_stats", "running_mean", jnp.zeros, (c,)).value
    var = self.variable("batch_stats", "running_var", jnp.ones, (c,)).value
    scale = weight * (1.0 / jnp.sqrt(var + self.eps))
    shift = bias - mean * scale
    return x * scale.astype(x.dtype) + shift.astype(x.dtype)


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Any) -> nn.Module:
  return layers.Conv(
    features, kernel, stride, use_bias=False, kernel_init=nn.initializers.kaiming_normal(), dtype=dtype, name=name
  )


class Bottleneck(nn.Module):
  """torchvision Bottleneck (v1.5): the stride sits on the 3x3 conv."""

  width: int
  stride: int
  downsample: bool
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    y = nn.relu(FrozenBatchNorm(name="bn1")(_conv(self.width, 1, 1, "conv1", self.dtype)(x)))
    y = nn.relu(FrozenBatchNorm(name="bn2")(_conv(self.width, 3, self.stride, "conv2", self.dtype)(y)))
    y = FrozenBatchNorm(name="bn3")(_conv(self.width * 4, 1, 1, "conv3", self.dtype)(y))
    if self.downsample:
      x = FrozenBatchNorm(name="downsample_bn")(_conv(self.width * 4, 1, self.stride, "downsample_conv", self.dtype)(x))
    return nn.relu(x + y)


class ResNet50(nn.Module):
  """ResNet-50 body returning C3, C4, C5 (strides 8, 16, 32), NHWC."""

  dtype: Any = None

  num_channels: Sequence[int] = RESNET50_OUT_CHANNELS

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> list[jnp.ndarray]:
    del train  # frozen BatchNorm, no dropout
    x = nn.relu(FrozenBatchNorm(name="bn1")(_conv(64, 7, 2, "conv1", self.dtype)(x)))  # (B, H/2, W/2, 64)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # (B, H/4, W/4, 64)
    outs = []
    for stage, blocks in enumerate(RESNET50_STAGES):
      width = 64 * 2**stage
      for i in range(blocks):
        stride = 2 if (i == 0 and stage > 0) else 1
        x = Bottleneck(width, stride, downsample=(i == 0), dtype=self.dtype, name=f"layer{stage + 1}_{i}")(x)
      if stage > 0:
        outs.append(x)  # (B, H/2^(stage+2), W/2^(stage+2), 256 * 2^stage)
    return outs


class IdentityBackbone(nn.Module):
  """The official `--backbone none`: the normalised image itself is the only backbone level (3 channels)."""

  num_channels: Sequence[int] = (3,)

  def __call__(self, x: jnp.ndarray, train: bool = False) -> list[jnp.ndarray]:
    return [x]


class SmallConvNet(nn.Module):
  """Five stride-2 stages of two 3x3 convs with GroupNorm (8 groups) and ReLU; returns strides 8, 16, 32.

  Not an official backbone: a few-million-parameter network that trains from scratch in minutes on a
  CPU (configs/shapes_demo.py), where ResNet-50 or the official `none` (stride 1, ~16k tokens for a
  128x96 image) is too slow.
  """

  dtype: Any = None

  num_channels: Sequence[int] = SMALL_CONVNET_WIDTHS[2:]

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> list[jnp.ndarray]:
    del train
    outs = []
    for stage, width in enumerate(SMALL_CONVNET_WIDTHS):
      for i, stride in enumerate((2, 1)):
        x = _conv(width, 3, stride, f"stage{stage}_conv{i}", self.dtype)(x)
        x = nn.relu(nn.GroupNorm(num_groups=8, dtype=self.dtype, name=f"stage{stage}_norm{i}")(x))
      if stage >= 2:
        outs.append(x)  # (B, H/2^(stage+1), W/2^(stage+1), SMALL_CONVNET_WIDTHS[stage])
    return outs


def build_backbone(c, dtype: Any = None) -> nn.Module:
  """The backbone named by model config `c` (`c.backbone`, and `c.swin` for Swin)."""
  if c.backbone == "resnet50":
    return ResNet50(dtype=dtype, name="backbone")
  if c.backbone == "none":
    return IdentityBackbone(name="backbone")
  if c.backbone == "small_convnet":
    return SmallConvNet(dtype=dtype, name="backbone")
  if c.backbone == "swin-t":
    s = c.swin
    return SwinTransformer(
      s.embed_dim, tuple(s.depths), tuple(s.num_heads), s.window_size, s.drop_path_rate, dtype=dtype, name="backbone"
    )
  raise ValueError(f"model.backbone: unknown backbone {c.backbone!r}")
