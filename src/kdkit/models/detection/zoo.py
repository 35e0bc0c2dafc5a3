"""Detectors of the seeds' detection tables that torchvision has no builder for, built offline from
torchvision's parts and wrapped by :mod:`.wrappers`' classes (same conventions: ``weights=None``,
trainable BatchNorm as torchvision uses without backbone weights, torchvision's state-dict keys,
``input_size`` from the (bypassed) transform's ``min_size``/``max_size``, labels shifted by one where
class 0 is the background).

- SoKD Table 4 (Faster R-CNN FPN students): ``fasterrcnn_resnet18_fpn`` (ResNet-18 under torchvision's
  ResNet-FPN, p2..p6) and ``fasterrcnn_mobilenet_v2_fpn`` (MobileNetV2 with an FPN on the last block of
  each stride 4, 8, 16, 32, p2..p6 like the ResNet-FPN, so its levels pair with a ResNet teacher's by
  stride; torchvision's ``mobilenet_backbone`` taps the *first* block of a stride and two stride-32
  levels, which suits MobileNetV3's detector, not this pairing).
- TST Table 3 (teachers): ``retinanet_resnext101_64x4d_fpn`` (the ResNeXt-101 64x4d of mmdetection's
  ``retinanet_x101_64x4d_fpn_1x``, 41.0 AP: the teacher of TST's/FGD's RetinaNet rows) and
  ``fcos_resnet101_fpn`` (FCOS P3-P7 on ResNet-101, like torchvision's ``fcos_resnet50_fpn``).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision.models import mobilenet_v2
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FasterRCNN
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from ...registry import MODELS
from .wrappers import (
    P3_P7,
    RESNET_FPN,
    RESNET_FPN_KEYS,
    FasterRCNNDetector,
    FCOSDetector,
    RetinaNetDetector,
    _no_downloads,
)

DET_ZOO = (
    "fasterrcnn_resnet18_fpn",
    "fasterrcnn_mobilenet_v2_fpn",
    "retinanet_resnext101_64x4d_fpn",
    "fcos_resnet101_fpn",
)
# MobileNetV2's ``features``: the last block at stride 4, 8, 16 and 32 (the 1x1 conv to 1280 channels)
MOBILENET_V2_RETURN = {"3": "0", "6": "1", "13": "2", "18": "3"}
MOBILENET_V2_CHANNELS = [24, 32, 96, 1280]


def _resnet_fpn(name: str, trainable_layers: int, p3_p7: bool) -> BackboneWithFPN:
    """torchvision's ResNet-FPN of ``name`` without weights: C2-C5 -> P2-P6 (max-pool P6), or for the
    one-stage detectors C3-C5 -> P3-P7 (P6, P7 by stride-2 convs on P5, as torchvision's RetinaNet/FCOS)."""
    extra = {"returned_layers": [2, 3, 4], "extra_blocks": LastLevelP6P7(256, 256)} if p3_p7 else {}
    return resnet_fpn_backbone(
        backbone_name=name,
        weights=None,
        norm_layer=nn.BatchNorm2d,
        trainable_layers=trainable_layers,
        **extra,
    )


@MODELS.register(
    "fasterrcnn_resnet18_fpn",
    "Faster R-CNN, ResNet-18-FPN (SoKD Table 4 student), 28.7M params at 80 classes; offline",
)
def fasterrcnn_resnet18_fpn(
    num_classes: int = 80, trainable_backbone_layers: int = 5, **kwargs: Any
) -> FasterRCNNDetector:
    backbone = _resnet_fpn("resnet18", trainable_backbone_layers, p3_p7=False)
    model = FasterRCNN(backbone, num_classes + 1, **_no_downloads(kwargs))
    return FasterRCNNDetector(model, num_classes, RESNET_FPN, RESNET_FPN_KEYS)


@MODELS.register(
    "fasterrcnn_mobilenet_v2_fpn",
    "Faster R-CNN, MobileNetV2-FPN p2..p6 (SoKD Table 4 student), 19.9M params at 80 classes; offline",
)
def fasterrcnn_mobilenet_v2_fpn(num_classes: int = 80, **kwargs: Any) -> FasterRCNNDetector:
    """torchvision's MobileNetV2 ``features`` (BatchNorm, all trainable) under an FPN on the last block
    of each stride (24, 32, 96, 1280 channels -> 256), P6 by max-pool: the levels and anchors of the
    ResNet-FPN Faster R-CNN."""
    kwargs = _no_downloads(kwargs)
    trunk = mobilenet_v2(weights=None).features
    backbone = BackboneWithFPN(
        trunk, MOBILENET_V2_RETURN, MOBILENET_V2_CHANNELS, 256, extra_blocks=LastLevelMaxPool()
    )
    model = FasterRCNN(backbone, num_classes + 1, **kwargs)
    return FasterRCNNDetector(model, num_classes, RESNET_FPN, RESNET_FPN_KEYS)


@MODELS.register(
    "retinanet_resnext101_64x4d_fpn",
    "RetinaNet, ResNeXt-101 64x4d-FPN (TST Table 3 teacher), 91.7M params at 80 classes; offline",
)
def retinanet_resnext101_64x4d_fpn(
    num_classes: int = 80, trainable_backbone_layers: int = 5, **kwargs: Any
) -> RetinaNetDetector:
    backbone = _resnet_fpn("resnext101_64x4d", trainable_backbone_layers, p3_p7=True)
    model = RetinaNet(backbone, num_classes, **_no_downloads(kwargs))
    return RetinaNetDetector(model, num_classes, P3_P7)


@MODELS.register(
    "fcos_resnet101_fpn", "FCOS, ResNet-101-FPN (TST Table 3 teacher), 51.3M params at 80 classes; offline"
)
def fcos_resnet101_fpn(
    num_classes: int = 80, trainable_backbone_layers: int = 5, **kwargs: Any
) -> FCOSDetector:
    backbone = _resnet_fpn("resnet101", trainable_backbone_layers, p3_p7=True)
    model = FCOS(backbone, num_classes, **_no_downloads(kwargs))
    return FCOSDetector(model, num_classes, P3_P7)
