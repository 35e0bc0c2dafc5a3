"""ShuffleNetV2 1x (Ma et al. 2018) for CIFAR, as CRD's ``ShuffleV2``: widths 116-232-464, head 1024.

CIFAR adaptation from the CRD code: the stem is a stride-1 3x3 conv to 24 channels without max-pool,
so the three stages (a stride-2 unit plus 3, 7, 3 units) run at 16x16, 8x8 and 4x4.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..registry import MODELS
from ._layers import ChannelShuffle, ZooNet, conv_bn


def branch(cin: int, cout: int, stride: int) -> nn.Sequential:
    """1x1 conv-BN-ReLU, 3x3 depthwise conv-BN, 1x1 conv-BN-ReLU."""
    return nn.Sequential(
        conv_bn(cin, cout, 1), conv_bn(cout, cout, 3, stride, groups=cout, relu=False), conv_bn(cout, cout, 1)
    )


class BasicUnit(nn.Module):
    """Channel split: half passes through, half goes through :func:`branch`; concat, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.branch = branch(channels // 2, channels // 2, 1)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        keep, rest = x.chunk(2, dim=1)
        return self.shuffle(torch.cat([keep, self.branch(rest)], 1))


class DownUnit(nn.Module):
    """Stride-2 unit: both halves see the whole input (left: depthwise then 1x1; right: :func:`branch`)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.left = nn.Sequential(conv_bn(cin, cin, 3, 2, groups=cin, relu=False), conv_bn(cin, cout // 2, 1))
        self.right = branch(cin, cout // 2, 2)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.shuffle(torch.cat([self.left(x), self.right(x)], 1))


class ShuffleNetV2(ZooNet):
    """``stem``, ``layer1``..``layer3``, ``head`` (1x1 conv-BN-ReLU to 1024), ``pool``, ``fc``."""

    def __init__(
        self,
        num_classes: int = 100,
        widths: tuple[int, int, int] = (116, 232, 464),
        units: tuple[int, int, int] = (3, 7, 3),
        head_width: int = 1024,
    ) -> None:
        body: list[tuple[str, nn.Module]] = [("stem", conv_bn(3, 24, 3))]
        cin = 24
        for i, (width, count) in enumerate(zip(widths, units, strict=True), start=1):
            stage = [DownUnit(cin, width)]
            stage += [BasicUnit(width) for _ in range(count)]
            body.append((f"layer{i}", nn.Sequential(*stage)))
            cin = width
        body.append(("head", conv_bn(cin, head_width, 1)))
        super().__init__(body, head_width, num_classes, ("layer1", "layer2", "head"))


@MODELS.register("shufflenetv2", "ShuffleNetV2 1x (Ma et al. 2018), CRD CIFAR variant, 1.36M params")
def shufflenetv2(num_classes: int = 100, **kwargs: Any) -> ShuffleNetV2:
    return ShuffleNetV2(num_classes, **kwargs)
