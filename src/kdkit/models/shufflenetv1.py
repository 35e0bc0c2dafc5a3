"""ShuffleNetV1 (Zhang et al. 2018) for CIFAR, as CRD's ``ShuffleV1``: 3 groups, widths 240-480-960.

CIFAR adaptations from the CRD code: the stem is a 1x1 conv to 24 channels at full resolution (no
stride-2 conv or max-pool), so the three stages (4, 8, 4 units, each starting with stride 2) run at
16x16, 8x8 and 4x4. Like that code, the depthwise conv is followed by ReLU (the paper omits it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..registry import MODELS
from ._layers import ChannelShuffle, ZooNet, conv_bn


class ShuffleUnit(nn.Module):
    """1x1 group conv, channel shuffle, 3x3 depthwise conv, 1x1 group conv, plus the input, then ReLU.

    At stride 2 the input is 3x3 average-pooled and concatenated instead of added, widening to ``cout``.
    ``group_input=False`` (the network's first unit, on the 24-channel stem) ungroups the first 1x1 conv.
    """

    def __init__(self, cin: int, cout: int, stride: int, groups: int, group_input: bool = True) -> None:
        super().__init__()
        self.concat = stride == 2
        branch = cout - cin if self.concat else cout
        mid = branch // 4
        first_groups = groups if group_input else 1
        self.branch = nn.Sequential(
            conv_bn(cin, mid, 1, groups=first_groups),
            ChannelShuffle(first_groups),
            conv_bn(mid, mid, 3, stride, groups=mid),
            conv_bn(mid, branch, 1, groups=groups, relu=False),
        )
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if self.concat else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out, res = self.branch(x), self.shortcut(x)
        return self.relu(torch.cat([out, res], 1) if self.concat else out + res)


class ShuffleNetV1(ZooNet):
    """``stem``, ``layer1``..``layer3``, ``pool``, ``fc``."""

    def __init__(
        self,
        num_classes: int = 100,
        widths: tuple[int, int, int] = (240, 480, 960),
        units: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
    ) -> None:
        body: list[tuple[str, nn.Module]] = [("stem", conv_bn(3, 24, 1))]
        cin = 24
        for i, (width, count) in enumerate(zip(widths, units, strict=True), start=1):
            stage = [ShuffleUnit(cin, width, 2, groups, group_input=i > 1)]
            stage += [ShuffleUnit(width, width, 1, groups) for _ in range(count - 1)]
            body.append((f"layer{i}", nn.Sequential(*stage)))
            cin = width
        super().__init__(body, cin, num_classes, ("layer1", "layer2", "layer3"))


@MODELS.register("shufflenetv1", "ShuffleNetV1 (Zhang et al. 2018), g=3, CRD CIFAR variant, 0.95M params")
def shufflenetv1(num_classes: int = 100, **kwargs: Any) -> ShuffleNetV1:
    return ShuffleNetV1(num_classes, **kwargs)
