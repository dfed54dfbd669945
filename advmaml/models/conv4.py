"""MAML's four-block ConvNet (Finn et al. 2017): the stride-2 Omniglot net and the max-pool one.

``conv4``: 4 x [3x3 conv stride 2, BN, ReLU] (MAML's Omniglot net, 64 filters).
``conv4_maxpool``: 4 x [3x3 conv, BN, ReLU, 2x2 max-pool] (MAML's Mini-ImageNet
net, 32 filters). Both return the flattened last feature map; the registry
(``advmaml.models``) adds the linear head. Parameter names (conv0..3,
norm0..3) are those of the checkpoints written before the registry existed.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from advmaml.models.layers import BatchStatNorm, Conv, check_min_side


class Conv4(nn.Module):
  """(B, H, W, C) -> features (B, H' * W' * filters): H' = ceil(H / 16), or H // 16 with max-pool."""
  filters: int
  kernels: object
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    for i in range(4):
      x = Conv(self.filters, 1 if self.max_pool else 2, self.kernels, name=f"conv{i}")(x)
      x = BatchStatNorm(self.kernels, name=f"norm{i}")(x)
      x = nn.relu(x)
      if self.max_pool:
        x = self.kernels.max_pool(x)
    return x.reshape(x.shape[0], -1)


def conv4(image_shape: Sequence[int], filters: int, kernels) -> Conv4:
  """The stride-2 Conv4 for images of image_shape (H, W, C): any size."""
  del image_shape  # stride 2 rounds up: even 1x1 images keep a pixel
  return Conv4(filters, kernels)


def conv4_maxpool(image_shape: Sequence[int], filters: int, kernels) -> Conv4:
  """The max-pool Conv4; four 2x2 pools need images of at least 16x16."""
  check_min_side(image_shape, 16, "four conv4_maxpool blocks")
  return Conv4(filters, kernels, max_pool=True)
