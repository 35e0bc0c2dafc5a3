"""MobileNetV2 (Sandler et al. 2018) for CIFAR, as CRD's ``mobile_half``: width 0.5, expansion 6.

CIFAR adaptations from the CRD code: the second stage keeps stride 1 (total stride 16, so a 32x32
input ends at 2x2), every inverted residual keeps its 1x1 expansion conv (also at expansion 1),
ReLU replaces ReLU6, and the last 1x1 conv keeps 1280 channels for width multipliers up to 1.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..registry import MODELS
from ._layers import ZooNet, conv_bn

# expansion (None: the model's expand_ratio), channels, blocks, first stride
STAGES = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """1x1 expansion conv-BN-ReLU, 3x3 depthwise conv-BN-ReLU, 1x1 linear conv-BN; residual if same shape."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.conv = nn.Sequential(
            conv_bn(cin, hidden, 1),
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
            conv_bn(hidden, cout, 1, relu=False),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.residual else out


class MobileNetV2(ZooNet):
    """``stem`` (stride 2), ``layer1``..``layer7``, ``head`` (1x1 conv to 1280), ``pool``, ``fc``.

    ``feature_taps`` are the last module at each resolution: layer2 (16x16), layer3 (8x8), layer5 (4x4)
    and head (2x2), the stages CRD hints on (with ``head`` in place of layer7, same resolution).
    """

    def __init__(self, num_classes: int = 100, width_mult: float = 0.5, expand_ratio: int = 6) -> None:
        cin = int(32 * width_mult)
        body: list[tuple[str, nn.Module]] = [("stem", conv_bn(3, cin, 3, stride=2))]
        for i, (expand, channels, blocks, stride) in enumerate(STAGES, start=1):
            cout = int(channels * width_mult)
            ratio = expand or expand_ratio
            units = [InvertedResidual(cin, cout, stride, ratio)]
            units += [InvertedResidual(cout, cout, 1, ratio) for _ in range(blocks - 1)]
            body.append((f"layer{i}", nn.Sequential(*units)))
            cin = cout
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        body.append(("head", conv_bn(cin, last, 1)))
        super().__init__(body, last, num_classes, ("layer2", "layer3", "layer5", "head"))


@MODELS.register(
    "mobilenetv2", "MobileNetV2 (Sandler et al. 2018), CRD mobile_half: width 0.5, expansion 6, 0.81M params"
)
def mobilenetv2(num_classes: int = 100, **kwargs: Any) -> MobileNetV2:
    return MobileNetV2(num_classes, **kwargs)
