"""CIFAR ResNets (He et al. 2016, Sec. 4.2) as defined in the CRD/DKD code bases.

Depth 6n+2: a 3x3 stem, then three stages of n basic blocks at 32x32, 16x16 and 8x8. As in CRD, a
block that changes width or stride uses a 1x1 conv-BN projection shortcut (He et al.'s option B, not
the zero-padding option A), which is why resnet20 has 0.28M rather than 0.27M parameters.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..registry import MODELS
from ._layers import ZooNet, conv_bn

NARROW = (16, 16, 32, 64)
WIDE = (32, 64, 128, 256)  # the "x4" variants


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3, relu=False)
        same = stride == 1 and cin == cout
        self.shortcut = nn.Identity() if same else conv_bn(cin, cout, 1, stride, relu=False)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class CifarResNet(ZooNet):
    """``stem``, ``layer1``..``layer3`` (n blocks each; strides 1, 2, 2), ``pool``, ``fc``."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100) -> None:
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        body: list[tuple[str, nn.Module]] = [("stem", conv_bn(3, widths[0], 3))]
        cin = widths[0]
        for i, (width, stride) in enumerate(zip(widths[1:], (1, 2, 2), strict=True), start=1):
            blocks = [BasicBlock(cin, width, stride)]
            blocks += [BasicBlock(width, width, 1) for _ in range(n - 1)]
            body.append((f"layer{i}", nn.Sequential(*blocks)))
            cin = width
        super().__init__(body, cin, num_classes, ("layer1", "layer2", "layer3"))


@MODELS.register("resnet8", "CIFAR ResNet-8 (He et al. 2016), widths 16-64, 0.08M params")
def resnet8(num_classes: int = 100, **kwargs: Any) -> CifarResNet:
    return CifarResNet(8, NARROW, num_classes, **kwargs)


@MODELS.register("resnet14", "CIFAR ResNet-14 (He et al. 2016), widths 16-64, 0.18M params")
def resnet14(num_classes: int = 100, **kwargs: Any) -> CifarResNet:
    return CifarResNet(14, NARROW, num_classes, **kwargs)


@MODELS.register("resnet20", "CIFAR ResNet-20 (He et al. 2016), widths 16-64, 0.28M params")
def resnet20(num_classes: int = 100, **kwargs: Any) -> CifarResNet:
    return CifarResNet(20, NARROW, num_classes, **kwargs)


@MODELS.register("resnet32", "CIFAR ResNet-32 (He et al. 2016), widths 16-64, 0.47M params")
def resnet32(num_classes: int = 100, **kwargs: Any) -> CifarResNet:
    return CifarResNet(32, NARROW, num_classes, **kwargs)


@MODELS.register("resnet44", "CIFAR ResNet-44 (He et al. 2016), widths 16-64, 0.67M params")
def resnet44(num_classes: int = 100, **kwargs: Any) -> CifarResNet:
    return CifarResNet(44, NARROW, num_classes, **kwargs)


@MODELS.register("resnet56", "CIFAR ResNet-56 (He et al. 2016), widths 16-64, 0.86M params")
def resnet56(num_classes: int = 100, **kwargs: Any) -> CifarResNet:
    return CifarResNet(56, NARROW, num_classes, **kwargs)


@MODELS.register("resnet110", "CIFAR ResNet-110 (He et al. 2016), widths 16-64, 1.74M params")
def resnet110(num_classes: int = 100, **kwargs: Any) -> CifarResNet:
    return CifarResNet(110, NARROW, num_classes, **kwargs)


@MODELS.register("resnet8x4", "CIFAR ResNet-8 with 4x widths 32-256 (CRD), 1.23M params")
def resnet8x4(num_classes: int = 100, **kwargs: Any) -> CifarResNet:
    return CifarResNet(8, WIDE, num_classes, **kwargs)


@MODELS.register("resnet32x4", "CIFAR ResNet-32 with 4x widths 32-256 (CRD), 7.43M params")
def resnet32x4(num_classes: int = 100, **kwargs: Any) -> CifarResNet:
    return CifarResNet(32, WIDE, num_classes, **kwargs)
