"""A compact FCOS for CPU-sized road-scene demos (128x256 inputs, 3 classes: car, person, traffic sign).

Backbone (``backbone.body``): a stride-2 3x3 stem, then ``layer1``..``layer4`` of BasicBlocks (He et
al. 2016; one block in ``layer1``, two in the others), each downsampling by 2, so ``layer2``..``layer4``
sit at strides 8, 16, 32. torchvision's ``FeaturePyramidNetwork`` (Lin et al. 2017) turns them into
three levels P3..P5 (``levels.p3``..``levels.p5``), and torchvision's FCOS (Tian et al. 2019) detects
on them: its classification and regression/centre-ness heads (2 convs each instead of 4, GroupNorm
with 8 groups), its point generator (one point per location, sizes = strides 8/16/32), focal + GIoU
+ centre-ness losses and post-processing. ``width`` multiplies every channel count (multiples of 8);
the points depend only on the strides and the input size, so teacher and student share them and
dense-head KD compares them point by point.

At 3 classes; forward GFLOPs on 1x3x128x256 (``torch.utils.flop_counter``, multiply-add = 2):

=====================  =====  =======  ======
model                  width  params   GFLOPs
=====================  =====  =======  ======
det_compact_teacher    1.0    2.20M    0.675
det_compact_student    0.35   0.28M    0.092
=====================  =====  =======  ======

The student has 8x fewer parameters and 7.3x fewer FLOPs. Training speed (forward + losses +
backward + SGD step, batch 16, fp32, one thread, ``benchmarks/det_compact_speed.py --threads 1``):
teacher about 19 images/s, student about 90 images/s per core of this machine's CPU.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS, FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.ops import FeaturePyramidNetwork

from ...registry import MODELS
from ..seg_compact import BasicBlock, scaled
from ..seg_resnet import conv_bn_relu
from .wrappers import FCOSDetector

CHANNELS = (16, 32, 64, 128, 192)  # stem, layer1..layer4 at width 1
FPN_CHANNELS = 64
HEAD_CONVS = 2
NORM_GROUPS = 8
STRIDES = (8, 16, 32)
DET_COMPACT = ("det_compact", "det_compact_teacher", "det_compact_student")


class CompactBody(nn.Module):
    """Stem (1/2) and four residual stages (1/4 .. 1/32); returns the stride 8/16/32 maps."""

    def __init__(self, width: float) -> None:
        super().__init__()
        c0, c1, c2, c3, c4 = (scaled(c, width) for c in CHANNELS)
        self.stem = conv_bn_relu(3, c0, 3, stride=2)
        self.layer1 = BasicBlock(c0, c1, stride=2)
        self.layer2 = nn.Sequential(BasicBlock(c1, c2, stride=2), BasicBlock(c2, c2))
        self.layer3 = nn.Sequential(BasicBlock(c2, c3, stride=2), BasicBlock(c3, c3))
        self.layer4 = nn.Sequential(BasicBlock(c3, c4, stride=2), BasicBlock(c4, c4))
        self.channels = [c2, c3, c4]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        c2 = self.layer2(self.layer1(self.stem(x)))
        c3 = self.layer3(c2)
        return OrderedDict(p3=c2, p4=c3, p5=self.layer4(c3))


class CompactBackbone(nn.Module):
    """``body`` + torchvision's FPN; ``out_channels`` as torchvision's detectors expect."""

    def __init__(self, width: float) -> None:
        super().__init__()
        self.body = CompactBody(width)
        self.out_channels = scaled(FPN_CHANNELS, width)
        self.fpn = FeaturePyramidNetwork(self.body.channels, self.out_channels)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(self.body(x))


class CompactFCOSHead(FCOSHead):
    """torchvision's ``FCOSHead`` (its ``forward`` and ``compute_loss``) with ``num_convs`` convs per
    branch and GroupNorm of ``groups`` groups (torchvision's head fixes 32, too many for 24 channels)."""

    def __init__(self, channels: int, num_classes: int, num_convs: int, groups: int) -> None:
        nn.Module.__init__(self)
        norm = partial(nn.GroupNorm, groups)
        self.box_coder = det_utils.BoxLinearCoder(normalize_by_size=True)
        self.classification_head = FCOSClassificationHead(
            channels, 1, num_classes, num_convs, norm_layer=norm
        )
        self.regression_head = FCOSRegressionHead(channels, 1, num_convs, norm_layer=norm)


def compact_fcos(
    num_classes: int = 3, width: float = 1.0, score_thresh: float = 0.05, detections_per_img: int = 100
) -> FCOSDetector:
    """The compact FCOS at ``width``; input any size divisible by 32 (``input_size`` None)."""
    backbone = CompactBackbone(width)
    for m in backbone.body.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    points = AnchorGenerator(tuple((s,) for s in STRIDES), ((1.0,),) * len(STRIDES))
    head = CompactFCOSHead(backbone.out_channels, num_classes, HEAD_CONVS, NORM_GROUPS)
    tv = FCOS(
        backbone,
        num_classes,
        anchor_generator=points,
        head=head,
        score_thresh=score_thresh,
        detections_per_img=detections_per_img,
    )
    model = FCOSDetector(tv, num_classes, (("p3", "p4", "p5"), STRIDES))
    model.input_size, model.fixed_size, model.size_divisible = None, None, max(STRIDES)
    return model


@MODELS.register(
    "det_compact", "compact FCOS (3-level FPN, strides 8/16/32) on a small ResNet; `width` kwarg"
)
def det_compact(num_classes: int = 3, width: float = 1.0, **kwargs) -> FCOSDetector:
    return compact_fcos(num_classes, width, **kwargs)


@MODELS.register("det_compact_teacher", "det_compact at width 1: 2.20M params, 0.675 GFLOPs at 128x256")
def det_compact_teacher(num_classes: int = 3, **kwargs) -> FCOSDetector:
    return compact_fcos(num_classes, 1.0, **kwargs)


@MODELS.register("det_compact_student", "det_compact at width 0.35: 0.28M params, 0.092 GFLOPs at 128x256")
def det_compact_student(num_classes: int = 3, **kwargs) -> FCOSDetector:
    return compact_fcos(num_classes, 0.35, **kwargs)
