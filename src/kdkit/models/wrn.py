"""Wide ResNets WRN-d-k (Zagoruyko & Komodakis 2016) for CIFAR, as in the CRD/DKD code bases.

A 3x3 stem to 16 channels, three stages of (d-4)/6 pre-activation blocks with widths 16k, 32k, 64k
(strides 1, 2, 2), then BN-ReLU (``head``) before pooling.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..registry import MODELS
from ._layers import ZooNet


def bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU())


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, plus a shortcut.

    When the width changes, the 1x1 shortcut conv reads the pre-activated input, as in the reference code.
    """

    def __init__(self, cin: int, cout: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.preact = bn_relu(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
        self.act = nn.Sequential(bn_relu(cout), nn.Dropout(drop_rate))
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        same = stride == 1 and cin == cout
        self.shortcut = None if same else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = self.preact(x)
        out = self.conv2(self.act(self.conv1(act)))
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(ZooNet):
    """``stem``, ``layer1``..``layer3``, ``head`` (BN-ReLU), ``pool``, ``fc``."""

    def __init__(self, depth: int, widen: int, num_classes: int = 100, drop_rate: float = 0.0) -> None:
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        body: list[tuple[str, nn.Module]] = [("stem", nn.Conv2d(3, 16, 3, padding=1, bias=False))]
        cin = 16
        widths = (16 * widen, 32 * widen, 64 * widen)
        for i, (width, stride) in enumerate(zip(widths, (1, 2, 2), strict=True), start=1):
            blocks = [PreActBlock(cin, width, stride, drop_rate)]
            blocks += [PreActBlock(width, width, 1, drop_rate) for _ in range(n - 1)]
            body.append((f"layer{i}", nn.Sequential(*blocks)))
            cin = width
        body.append(("head", bn_relu(cin)))
        super().__init__(body, cin, num_classes, ("layer1", "layer2", "head"))


@MODELS.register("wrn_16_2", "Wide ResNet WRN-16-2 (Zagoruyko & Komodakis 2016), 0.70M params")
def wrn_16_2(num_classes: int = 100, **kwargs: Any) -> WideResNet:
    return WideResNet(16, 2, num_classes, **kwargs)


@MODELS.register("wrn_40_1", "Wide ResNet WRN-40-1 (Zagoruyko & Komodakis 2016), 0.57M params")
def wrn_40_1(num_classes: int = 100, **kwargs: Any) -> WideResNet:
    return WideResNet(40, 1, num_classes, **kwargs)


@MODELS.register("wrn_40_2", "Wide ResNet WRN-40-2 (Zagoruyko & Komodakis 2016), 2.26M params")
def wrn_40_2(num_classes: int = 100, **kwargs: Any) -> WideResNet:
    return WideResNet(40, 2, num_classes, **kwargs)
