"""ResNet-12, the backbone of MetaOptNet (Lee et al. 2019) and of most few-shot work since.

Four residual blocks, each::

    x -> [3x3 conv, BN, leaky ReLU 0.1] x 2 -> 3x3 conv, BN -> + shortcut(x) -> leaky ReLU 0.1 -> 2x2 max-pool
    shortcut(x) = 1x1 conv, BN

with 64-160-320-640 channels at ``filters=64`` (``filters`` x 1, 2.5, 5, 10),
then a global average pool of the last feature map: (B, 84, 84, 3) -> 5x5x640
-> (B, 640) features. The registry (``advmaml.models``) adds the linear head.
12,424,320 parameters at full width, 12,427,525 with a 5-way head.

Batch norm is ``layers.BatchStatNorm`` (batch statistics, no running averages)
as in the Conv4, so both batch-norm rules and both kernel sets apply; the 1x1
shortcut convolution runs on the same kernels (the CPU im2col of a 1x1 kernel
is one matmul). DropBlock (Ghiasi et al. 2018), which MetaOptNet trains with,
is not implemented: it needs a random key in the forward pass, and
``ModelSpec.apply(params, x)`` takes none.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from advmaml.models.layers import BatchStatNorm, Conv, check_min_side

LEAKY_SLOPE = 0.1


def widths(filters: int) -> tuple[int, int, int, int]:
  """The four blocks' channels: 64-160-320-640 at filters=64."""
  return filters, filters * 5 // 2, filters * 5, filters * 10


class ResBlock(nn.Module):
  """(B, H, W, C) -> (B, H // 2, W // 2, features)."""
  features: int
  kernels: object

  @nn.compact
  def __call__(self, x):
    shortcut = Conv(self.features, 1, self.kernels, size=1, name="shortcut")(x)
    shortcut = BatchStatNorm(self.kernels, name="shortcut_norm")(shortcut)
    for i in range(3):
      x = Conv(self.features, 1, self.kernels, name=f"conv{i}")(x)
      x = BatchStatNorm(self.kernels, name=f"norm{i}")(x)
      if i < 2:
        x = nn.leaky_relu(x, LEAKY_SLOPE)
    x = nn.leaky_relu(x + shortcut, LEAKY_SLOPE)
    return self.kernels.max_pool(x)


class ResNet12(nn.Module):
  """(B, H, W, C) -> features (B, 10 * filters): four ResBlocks, global average pool."""
  filters: int
  kernels: object

  @nn.compact
  def __call__(self, x):
    for i, features in enumerate(widths(self.filters)):
      x = ResBlock(features, self.kernels, name=f"block{i}")(x)
    return x.mean(axis=(1, 2))


def resnet12(image_shape: Sequence[int], filters: int, kernels) -> ResNet12:
  """ResNet-12 of base width ``filters`` (64: MetaOptNet's); images of at least 16x16."""
  check_min_side(image_shape, 16, "four resnet12 blocks (2x2 max-pool each)")
  return ResNet12(filters, kernels)
