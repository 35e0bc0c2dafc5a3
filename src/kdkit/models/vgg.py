"""VGG with BatchNorm (Simonyan & Zisserman 2015) for CIFAR, as in the CRD/DKD code bases.

Five stages of 3x3 conv-BN-ReLU (conv bias kept, as in the reference code) with widths 64, 128, 256,
512, 512. CIFAR adaptation: 2x2 max-pools follow only the first three stages, so the last two stages
both run at 4x4; global average pooling and one linear layer replace the three fully connected layers.
The first stage (full 32x32 resolution) is left out of ``feature_taps``, as CRD leaves it out of its
hint features; the four taps pair with four-stage networks such as MobileNetV2.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..registry import MODELS
from ._layers import ZooNet, conv_bn

VGG8 = ((64,), (128,), (256,), (512,), (512,))
VGG13 = ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))


class VGG(ZooNet):
    """``layer1``..``layer5`` (``maxpool1``..``maxpool3`` after the first three), ``pool``, ``fc``."""

    def __init__(self, stages: tuple[tuple[int, ...], ...], num_classes: int = 100) -> None:
        body: list[tuple[str, nn.Module]] = []
        cin = 3
        for i, widths in enumerate(stages, start=1):
            convs = []
            for width in widths:
                convs.append(conv_bn(cin, width, 3, bias=True))
                cin = width
            body.append((f"layer{i}", nn.Sequential(*convs)))
            if i <= 3:
                body.append((f"maxpool{i}", nn.MaxPool2d(2)))
        taps = tuple(f"layer{i}" for i in range(2, len(stages) + 1))
        super().__init__(body, cin, num_classes, taps)


@MODELS.register(
    "vgg8", "VGG-8 with BatchNorm (Simonyan & Zisserman 2015), CRD CIFAR variant, 3.97M params (3.96M in CRD)"
)
def vgg8(num_classes: int = 100, **kwargs: Any) -> VGG:
    return VGG(VGG8, num_classes, **kwargs)


@MODELS.register(
    "vgg13", "VGG-13 with BatchNorm (Simonyan & Zisserman 2015), CRD CIFAR variant, 9.46M params"
)
def vgg13(num_classes: int = 100, **kwargs: Any) -> VGG:
    return VGG(VGG13, num_classes, **kwargs)
