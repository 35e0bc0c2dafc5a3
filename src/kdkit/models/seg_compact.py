"""Compact segmentation networks for CPU-sized road-scene demos (64x128 inputs, about 10 classes).

A small residual backbone (``backbone``: a stride-2 3x3 stem, then ``layer1``..``layer3`` of two
BasicBlocks each, He et al. 2016) at output stride 8: ``layer1`` and ``layer2`` downsample,
``layer3`` is dilated by 2 instead (as DeepLabV3 does with ``layer4``). Heads are the ones of
:mod:`kdkit.models.seg_resnet`, scaled down: DeepLabV3 with ASPP rates 2/4/6 (rates 12-36 would
only see padding on an 8x16 map) or PSPNet pyramid pooling (bins 1/2/3/6). ``width`` multiplies
every channel count (rounded to multiples of 8).

Size at 10 classes; forward GFLOPs on 1x3x64x128 (``torch.utils.flop_counter``, multiply-add = 2):

========================  =====  =======  ======
model                     width  params   GFLOPs
========================  =====  =======  ======
mini_deeplab_teacher      1.0    1.79M    0.513
mini_pspnet (width=1)     1.0    1.52M    0.442
mini_deeplab_student      0.3    0.18M    0.052
mini_pspnet_student       0.3    0.15M    0.045
========================  =====  =======  ======

The students need 9.8x (DeepLabV3) and 11.5x (PSPNet) fewer FLOPs than the teacher. Forward +
backward of the teacher on a batch of 16 takes about 0.1-0.2 s on two CPU cores in bf16 autocast.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from ..registry import MODELS
from .seg_resnet import SegNet, Trunk, conv_bn_relu, deeplab_head, psp_head

CHANNELS = (24, 48, 96, 160)  # stem, layer1, layer2, layer3 at width 1
HEAD_CHANNELS = 96
ASPP_RATES = (2, 4, 6)
FEATURE_TAPS = ("backbone.layer1", "backbone.layer2", "backbone.layer3")
SEG_MODELS = (
    "mini_deeplab",
    "mini_pspnet",
    "mini_deeplab_teacher",
    "mini_deeplab_student",
    "mini_pspnet_student",
)


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded to a multiple of 8 (at least 8)."""
    return max(8, int(channels * width + 4) // 8 * 8)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers (optionally strided or dilated) plus a shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(cin, cout, 3, stride, dilation)
        self.conv2 = nn.Sequential(
            nn.Conv2d(cout, cout, 3, padding=dilation, dilation=dilation, bias=False), nn.BatchNorm2d(cout)
        )
        same = stride == 1 and cin == cout
        self.shortcut = (
            nn.Identity()
            if same
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


def mini_trunk(width: float = 1.0) -> Trunk:
    """Stem (1/2), ``layer1`` (1/4), ``layer2`` (1/8), ``layer3`` (1/8, dilation 2); two blocks per layer."""
    c0, c1, c2, c3 = (scaled(c, width) for c in CHANNELS)
    stages: OrderedDict[str, nn.Module] = OrderedDict(stem=conv_bn_relu(3, c0, 3, stride=2))
    for name, cin, cout, stride, dilation in (
        ("layer1", c0, c1, 2, 1),
        ("layer2", c1, c2, 2, 1),
        ("layer3", c2, c3, 1, 2),
    ):
        stages[name] = nn.Sequential(
            BasicBlock(cin, cout, stride, dilation), BasicBlock(cout, cout, 1, dilation)
        )
    return Trunk(stages)


def mini_segnet(head: str, num_classes: int, width: float = 1.0) -> SegNet:
    """``head`` ("deeplabv3" or "pspnet") on :func:`mini_trunk`; He (fan-out) init for every conv."""
    backbone = mini_trunk(width)
    cin, hidden = scaled(CHANNELS[-1], width), scaled(HEAD_CHANNELS, width)
    module = deeplab_head(cin, hidden, ASPP_RATES) if head == "deeplabv3" else psp_head(cin, hidden)
    model = SegNet(backbone, module, hidden, num_classes, FEATURE_TAPS)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


@MODELS.register("mini_deeplab", "compact DeepLabV3 (ASPP 2/4/6) on a 3-stage ResNet, OS8; `width` kwarg")
def mini_deeplab(num_classes: int = 10, width: float = 1.0) -> SegNet:
    return mini_segnet("deeplabv3", num_classes, width)


@MODELS.register("mini_pspnet", "compact PSPNet (bins 1/2/3/6) on a 3-stage ResNet, OS8; `width` kwarg")
def mini_pspnet(num_classes: int = 10, width: float = 1.0) -> SegNet:
    return mini_segnet("pspnet", num_classes, width)


@MODELS.register("mini_deeplab_teacher", "mini_deeplab at width 1: 1.79M params, 0.51 GFLOPs at 64x128")
def mini_deeplab_teacher(num_classes: int = 10) -> SegNet:
    return mini_segnet("deeplabv3", num_classes, 1.0)


@MODELS.register("mini_deeplab_student", "mini_deeplab at width 0.3: 0.18M params, 0.052 GFLOPs at 64x128")
def mini_deeplab_student(num_classes: int = 10) -> SegNet:
    return mini_segnet("deeplabv3", num_classes, 0.3)


@MODELS.register("mini_pspnet_student", "mini_pspnet at width 0.3: 0.15M params, 0.045 GFLOPs at 64x128")
def mini_pspnet_student(num_classes: int = 10) -> SegNet:
    return mini_segnet("pspnet", num_classes, 0.3)
