"""Semantic segmentation on dilated ResNets: DeepLabV3, PSPNet and FCN heads (the CIRKD / I2CKD pairs).

* Backbone: torchvision's ``resnet18/34/50/101`` (so torchvision ImageNet state dicts load into
  ``backbone``) with output stride 8 (``layer3`` dilation 2, ``layer4`` dilation 4, strides removed)
  or 16 (``layer4`` dilation 2). As in torchvision's ``replace_stride_with_dilation``, the conv that
  carried the stride keeps the previous dilation; BasicBlocks (R18/34) are dilated the same way.
* DeepLabV3 head (Chen et al. 2017, "Rethinking atrous convolution", Sec. 3.3): ASPP with a 1x1
  branch, three 3x3 branches at rates 12/24/36 (6/12/18 at output stride 16) and an image-pooling
  branch, a 1x1 projection, then a 3x3 conv. PSPNet head (Zhao et al. 2017, Sec. 3.2): pyramid
  pooling over bins 1/2/3/6, each reduced to a quarter of the channels, concatenated with the input,
  then a 3x3 conv. FCN head (Long et al. 2015, as in torchvision): a 3x3 conv to a quarter of the
  channels. A 1x1 ``classifier`` follows every head; logits are upsampled to the input size.
* Head widths follow the CIRKD code that I2CKD builds on: 256 channels on 2048-channel backbones,
  128 on 512-channel ones (``head_channels`` overrides).

Parameter counts at 19 classes vs I2CKD Table 2 (which, like CIRKD's Table 1, counts the auxiliary FCN
head on ``layer3`` that those models train with, i.e. ``aux_loss=True`` here): DeepLabV3-R101 61.0M
(61.1M), DeepLabV3-R18 13.5M (13.6M), PSPNet-R18 12.8M (12.9M). The ~1% gap is the stem: CIRKD
uses a deep stem (three 3x3 convs, 3-64-64-128, so ``layer1`` takes 128 channels), whereas this
keeps torchvision's 7x7 stem so ImageNet weights load. Without the auxiliary head the models have
58.6M, 13.3M and 12.6M parameters.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import KdkitError
from ..registry import MODELS
from .weights import load_weights

DEPTHS = (18, 34, 50, 101)
HEADS = ("deeplabv3", "pspnet", "fcn")
ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}  # Chen et al. 2017, Sec. 4.1 (rates double at OS8)
LAYER_DILATIONS = {8: (2, 4), 16: (1, 2)}  # layer3, layer4
PSP_BINS = (1, 2, 3, 6)
STEM_AND_STAGES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
FEATURE_TAPS = ("backbone.layer1", "backbone.layer2", "backbone.layer3", "backbone.layer4")
SEG_MODELS = tuple(f"{head}_resnet{depth}" for head in HEADS for depth in DEPTHS)


def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """Conv (same padding, no bias) -> BatchNorm -> ReLU (not in place, so taps stay intact)."""
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding, dilation, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class Trunk(nn.Sequential):
    """Backbone stages run in order. Returns the deepest map, or, with ``aux_from``,
    ``{"out": deepest, "aux": output of the stage aux_from}`` (as torchvision's IntermediateLayerGetter)."""

    def __init__(self, stages: OrderedDict[str, nn.Module], aux_from: str | None = None) -> None:
        super().__init__(stages)
        self.aux_from = aux_from

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        aux = None
        for name, stage in self.named_children():
            x = stage(x)
            if name == self.aux_from:
                aux = x
        return x if self.aux_from is None else {"out": x, "aux": aux}


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, a dilated 3x3 per rate, image pooling; then a 1x1 projection."""

    def __init__(self, cin: int, cout: int, rates: Sequence[int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(cin, cout, 1), *(conv_bn_relu(cin, cout, 3, dilation=r) for r in rates)]
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(cin, cout, 1))
        self.project = nn.Sequential(conv_bn_relu((len(rates) + 2) * cout, cout, 1), nn.Dropout(0.5))

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([*(branch(x) for branch in self.branches), pooled], 1))


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling module: the input concatenated with its pooled, reduced, upsampled bins."""

    def __init__(self, cin: int, bins: Sequence[int] = PSP_BINS) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), conv_bn_relu(cin, cin // len(bins), 1)) for b in bins
        )
        self.out_channels = cin + len(bins) * (cin // len(bins))

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(s(x), size, mode="bilinear", align_corners=False) for s in self.stages]
        return torch.cat([x, *pooled], 1)


def deeplab_head(cin: int, width: int, rates: Sequence[int]) -> nn.Sequential:
    return nn.Sequential(ASPP(cin, width, rates), conv_bn_relu(width, width, 3), nn.Dropout(0.1))


def psp_head(cin: int, width: int, bins: Sequence[int] = PSP_BINS) -> nn.Sequential:
    ppm = PyramidPooling(cin, bins)
    return nn.Sequential(ppm, conv_bn_relu(ppm.out_channels, width, 3), nn.Dropout(0.1))


def fcn_head(cin: int) -> nn.Sequential:
    return nn.Sequential(conv_bn_relu(cin, cin // 4, 3), nn.Dropout(0.1))


class SegNet(nn.Module):
    """``backbone`` -> ``head`` -> ``classifier`` (1x1 conv), logits bilinearly upsampled to the input size.

    With ``aux_channels`` the backbone also returns its ``"aux"`` map and the model gets an
    ``aux_classifier`` (FCN head + 1x1 conv); forward then returns ``{"out": logits, "aux": aux_logits}``.
    ``embedding_tap`` is ``"classifier:input"``, the penultimate feature map.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        head_channels: int,
        num_classes: int,
        feature_taps: tuple[str, ...],
        aux_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)
        self.aux_classifier = (
            None
            if aux_channels is None
            else nn.Sequential(*fcn_head(aux_channels), nn.Conv2d(aux_channels // 4, num_classes, 1))
        )
        self.feature_taps = feature_taps
        self.embedding_tap = "classifier:input"

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        size = x.shape[-2:]
        features = self.backbone(x)
        deepest = features["out"] if isinstance(features, dict) else features
        logits = F.interpolate(
            self.classifier(self.head(deepest)), size, mode="bilinear", align_corners=False
        )
        if self.aux_classifier is None:
            return logits
        aux = self.aux_classifier(features["aux"])
        return {"out": logits, "aux": F.interpolate(aux, size, mode="bilinear", align_corners=False)}


def dilate(layer: nn.Sequential, previous: int, dilation: int) -> None:
    """Remove the stride of a ResNet stage and dilate its 3x3 convs: the conv that carried the stride
    keeps ``previous``, every other 3x3 conv gets ``dilation`` (torchvision's scheme, any block type)."""
    for conv in (m for m in layer.modules() if isinstance(m, nn.Conv2d)):
        d = dilation
        if conv.stride != (1, 1):
            conv.stride, d = (1, 1), previous
        if conv.kernel_size == (3, 3):
            conv.dilation, conv.padding = (d, d), (d, d)


def resnet_trunk(
    depth: int, output_stride: int = 8, aux: bool = False, weights: str | os.PathLike[str] | None = None
) -> Trunk:
    """torchvision ResNet-``depth`` up to ``layer4`` at ``output_stride`` 8 or 16, as a :class:`Trunk`.

    ``weights``: a local torchvision ImageNet state dict (``fc.*`` is ignored).
    """
    import torchvision

    if output_stride not in LAYER_DILATIONS:
        raise KdkitError(f"output_stride must be 8 or 16, got {output_stride}")
    net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    previous = 1
    for layer, d in zip((net.layer3, net.layer4), LAYER_DILATIONS[output_stride]):
        if d > 1:
            dilate(layer, previous, d)
        previous = d
    trunk = Trunk(
        OrderedDict((name, getattr(net, name)) for name in STEM_AND_STAGES), "layer3" if aux else None
    )
    if weights is not None:
        missing, unexpected = load_weights(trunk, weights, strict=False)
        unexpected = [k for k in unexpected if not k.startswith("fc.")]
        if missing or unexpected:
            raise KdkitError(
                f"backbone weights {weights} are not a torchvision ResNet-{depth} state dict "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
    return trunk


def seg_resnet(
    head: str,
    depth: int,
    num_classes: int,
    output_stride: int = 8,
    aux_loss: bool = False,
    head_channels: int | None = None,
    backbone_weights: str | os.PathLike[str] | None = None,
) -> SegNet:
    """``head`` ("deeplabv3", "pspnet", "fcn") on a dilated ResNet-``depth``."""
    backbone = resnet_trunk(depth, output_stride, aux_loss, backbone_weights)
    cin = 2048 if depth >= 50 else 512
    if head == "fcn":
        width, module = cin // 4, fcn_head(cin)
    else:
        width = head_channels or (256 if depth >= 50 else 128)
        module = (
            deeplab_head(cin, width, ASPP_RATES[output_stride])
            if head == "deeplabv3"
            else psp_head(cin, width)
        )
    return SegNet(backbone, module, width, num_classes, FEATURE_TAPS, cin // 2 if aux_loss else None)


def _register(head: str, depth: int, summary: str) -> None:
    def build(num_classes: int = 19, **kwargs) -> SegNet:
        return seg_resnet(head, depth, num_classes, **kwargs)

    build.__name__ = build.__qualname__ = f"{head}_resnet{depth}"
    MODELS.register(build.__name__, summary)(build)


_TITLES = {
    "deeplabv3": "DeepLabV3 (Chen et al. 2017)",
    "pspnet": "PSPNet (Zhao et al. 2017)",
    "fcn": "FCN (Long et al. 2015)",
}
_PARAMS = {  # millions at 19 classes, without / with the auxiliary FCN head
    ("deeplabv3", 18): (13.3, 13.5),
    ("deeplabv3", 34): (23.4, 23.6),
    ("deeplabv3", 50): (39.6, 42.0),
    ("deeplabv3", 101): (58.6, 61.0),
    ("pspnet", 18): (12.6, 12.8),
    ("pspnet", 34): (22.7, 22.9),
    ("pspnet", 50): (37.2, 39.5),
    ("pspnet", 101): (56.1, 58.5),
    ("fcn", 18): (11.8, 11.9),
    ("fcn", 34): (21.9, 22.0),
    ("fcn", 50): (33.0, 35.3),
    ("fcn", 101): (52.0, 54.3),
}
for (_head, _depth), (_plain, _aux) in _PARAMS.items():
    _register(
        _head,
        _depth,
        f"{_TITLES[_head]} on dilated ResNet-{_depth}, OS8; {_plain}M params ({_aux}M with aux_loss)",
    )
