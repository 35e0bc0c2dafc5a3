"""torchvision's detectors as :class:`~kdkit.models.detection.base.Detector` s, built offline.

Every builder calls torchvision's own (``weights=None, weights_backbone=None``) and wraps the result:
the wrapper holds torchvision's submodules under their own names (``backbone``, ``head``,
``anchor_generator``; ``rpn``, ``roi_heads`` for Faster R-CNN), so its state dict has torchvision's
keys and torchvision checkpoints load with :func:`kdkit.models.load_weights`. Losses, anchor
matching, box coding and post-processing are torchvision's (``compute_loss``,
``postprocess_detections``, ``rpn.filter_proposals``, ``roi_heads``); only the
``GeneralizedRCNNTransform`` is bypassed, its ``min_size``/``max_size`` kept as ``input_size``.

Classes: RetinaNet and FCOS score the ``num_classes`` foreground classes with sigmoids (labels as
they are); Faster R-CNN and SSD have a background class 0 (labels + 1 inside, - 1 in ``detect``).
SSD's ``"out"`` holds the foreground logits ``[B, A, num_classes]``, its background logit is
``"bg"`` ``[B, A, 1]`` (its scores are the softmax over both).

FPN levels (``levels.<name>``, stride): Faster R-CNN ResNet-FPN p2..p6 (4..64); Faster R-CNN
MobileNetV3-FPN p5a, p5b (both 32: torchvision takes two stride-32 stages), p6 (64); RetinaNet and
FCOS p3..p7 (8..128); SSDlite p4..p9 (16..512).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FasterRCNN
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.models.detection.ssd import SSD
from torchvision.ops import boxes as box_ops

from ...errors import KdkitError
from ...registry import MODELS
from .base import (
    Detector,
    image_list,
    image_size,
    overridden,
    shift_labels,
    torchvision_targets,
)

RESNET_FPN = (("p2", "p3", "p4", "p5", "p6"), (4, 8, 16, 32, 64))
RESNET_FPN_KEYS = ("0", "1", "2", "3", "pool")  # torchvision's names of the same levels
MOBILENET_FPN = (("p5a", "p5b", "p6"), (32, 32, 64))
MOBILENET_FPN_KEYS = ("0", "1", "pool")
P3_P7 = (("p3", "p4", "p5", "p6", "p7"), (8, 16, 32, 64, 128))
SSDLITE = (("p4", "p5", "p6", "p7", "p8", "p9"), (16, 32, 64, 128, 256, 512))


def _transform_sizes(model: nn.Module) -> tuple[tuple[int, int], tuple[int, int] | None, int]:
    """(min_size, max_size), fixed (h, w) and size_divisible of torchvision's transform of ``model``
    (whose ``fixed_size`` is (w, h): ``_resize_image_and_masks`` swaps it for ``interpolate``)."""
    transform = model.transform
    min_size = transform.min_size[-1] if isinstance(transform.min_size, (tuple, list)) else transform.min_size
    fixed = (int(transform.fixed_size[1]), int(transform.fixed_size[0])) if transform.fixed_size else None
    return (int(min_size), int(transform.max_size)), fixed, int(transform.size_divisible)


class TorchvisionDetector(Detector):
    """Shared construction: num_classes, tap levels, transform sizes, and torchvision's model itself,
    kept outside the module tree (``_tv``) for its loss and post-processing methods."""

    label_offset = 0

    def __init__(
        self, tv_model: nn.Module, num_classes: int, levels: tuple[tuple[str, ...], tuple[int, ...]]
    ):
        super().__init__()
        self.num_classes = num_classes
        self._init_levels(*levels)
        self.input_size, self.fixed_size, self.size_divisible = _transform_sizes(tv_model)
        # not a submodule: its submodules are registered on this wrapper under the same names
        object.__setattr__(self, "_tv", tv_model)


class DenseTorchvisionDetector(TorchvisionDetector):
    """One-stage detectors: ``backbone`` (FPN) -> ``head`` -> per-anchor outputs, level-major."""

    dense = True

    def __init__(
        self, tv_model: nn.Module, num_classes: int, levels: tuple[tuple[str, ...], tuple[int, ...]]
    ):
        super().__init__(tv_model, num_classes, levels)
        self.backbone = tv_model.backbone
        self.anchor_generator = tv_model.anchor_generator
        self.head = tv_model.head

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.route(list(self.backbone(x).values()))
        head = self.head(features)
        outputs = {"out": head["cls_logits"], "box": head["bbox_regression"], "image_size": image_size(x)}
        if "bbox_ctrness" in head:
            outputs["ctr"] = head["bbox_ctrness"]
        return outputs

    def head_outputs(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The outputs under torchvision's head keys, in float32."""
        head = {"cls_logits": outputs["out"].float(), "bbox_regression": outputs["box"].float()}
        if "ctr" in outputs:
            head["bbox_ctrness"] = outputs["ctr"].float()
        return head

    def anchors(self, outputs: dict[str, Tensor]) -> tuple[list[Tensor], list[int]]:
        """torchvision's anchors of every image (``[A, 4]`` xyxy) and the number of anchors per level."""
        logits = outputs["out"]
        height, width = (int(v) for v in outputs["image_size"])
        anchors, counts = self.anchor_boxes((height, width), logits.device)
        if sum(counts) != logits.shape[1]:
            raise ValueError(
                f"outputs hold {logits.shape[1]} anchors, this model makes {sum(counts)} at "
                f"{(height, width)}: were they made by another model?"
            )
        return [anchors] * logits.shape[0], counts

    def anchor_boxes(
        self, size: tuple[int, int], device: torch.device | None = None
    ) -> tuple[Tensor, list[int]]:
        """The anchors of one ``size`` (h, w) image, ``[A, 4]`` xyxy (they depend on the size alone), and
        the number of anchors per level."""
        outputs = {"image_size": torch.tensor(size)}
        shapes = [torch.empty((0, 0, h, w), device=device) for h, w in self.level_sizes(outputs)]
        return self.anchor_generator(image_list(outputs, 1, shapes[0]), shapes)[0], self.level_counts(size)

    def level_counts(self, size: tuple[int, int]) -> list[int]:
        """The number of anchors per level of one ``size`` (h, w) image."""
        sizes = self.level_sizes({"image_size": torch.tensor(size)})
        per_location = self.anchor_generator.num_anchors_per_location()
        return [h * w * a for (h, w), a in zip(sizes, per_location, strict=True)]

    def losses(self, outputs: dict[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
        anchors, counts = self.anchors(outputs)
        return self._compute_loss(
            torchvision_targets(targets, self.label_offset, anchors[0].device),
            self.head_outputs(outputs),
            anchors,
            counts,
        )

    def detect(
        self, outputs: dict[str, Tensor], score_thresh: float | None = None
    ) -> list[dict[str, Tensor]]:
        anchors, counts = self.anchors(outputs)
        height, width = (int(v) for v in outputs["image_size"])
        sizes = [(height, width)] * len(anchors)
        thresh = {} if score_thresh is None else {"score_thresh": float(score_thresh)}
        with overridden(self._tv, **thresh):
            found = self._postprocess(self.head_outputs(outputs), anchors, counts, sizes)
        return shift_labels(found, self.label_offset)

    def decode_boxes(self, outputs: dict[str, Tensor]) -> Tensor:
        """Every anchor's box ``[B, A, 4]`` (xyxy, input pixels, float32), as torchvision's
        ``postprocess_detections`` decodes it: ``box_coder`` on ``outputs["box"]`` and the image's
        anchors, then clipped to the image (a clipped coordinate passes no gradient). Differentiable
        with respect to ``outputs["box"]``; run without autocast (boxes need the precision)."""
        anchors, _ = self.anchors(outputs)
        height, width = (int(v) for v in outputs["image_size"])
        return self.decode(outputs["box"], anchors[0], (height, width))

    def decode(self, deltas: Tensor, anchors: Tensor, size: tuple[int, int]) -> Tensor:
        """``deltas`` ``[B, A, 4]`` on the ``[A, 4]`` anchors of a ``size`` image -> clipped boxes
        ``[B, A, 4]``, elementwise as torchvision decodes (also inside an exported graph, where
        ``anchors`` is a constant)."""
        deltas = deltas.float()
        with torch.autocast(deltas.device.type, enabled=False):
            flat = anchors.to(deltas.dtype).expand(deltas.shape[0], -1, -1).reshape(-1, 4)
            boxes = self._decode(deltas.reshape(-1, 4), flat).reshape(deltas.shape)
            return box_ops.clip_boxes_to_image(boxes, size)

    def _decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """``[N, 4]`` deltas on their ``[N, 4]`` anchors (RetinaNet, SSD: ``BoxCoder``)."""
        return self._tv.box_coder.decode_single(deltas, anchors)

    def scores(self, outputs: dict[str, Tensor]) -> Tensor:
        """Every anchor's class scores ``[B, A, num_classes]`` as the post-processing ranks them
        (RetinaNet: sigmoid of the logits)."""
        return torch.sigmoid(outputs["out"].float())

    def postprocess_settings(self, size: tuple[int, int]) -> dict[str, Any]:
        """What :func:`~kdkit.models.detection.postprocess.select_detections` needs to reproduce
        ``detect`` on ``size`` images from :meth:`decode` d boxes and :meth:`scores`."""
        return {
            "kind": "levels",
            "score_thresh": float(self._tv.score_thresh),
            "nms_thresh": float(self._tv.nms_thresh),
            "topk_candidates": int(self._tv.topk_candidates),
            "detections_per_img": int(self._tv.detections_per_img),
            "level_counts": self.level_counts(size),
        }

    def _compute_loss(self, targets, head, anchors, counts) -> dict[str, Tensor]:
        raise NotImplementedError

    def _postprocess(self, head, anchors, counts, sizes) -> list[dict[str, Tensor]]:
        """torchvision's RetinaNet/FCOS post-processing, which takes the outputs split per level."""
        split = {k: list(v.split(counts, dim=1)) for k, v in head.items()}
        return self._tv.postprocess_detections(split, [list(a.split(counts)) for a in anchors], sizes)


class RetinaNetDetector(DenseTorchvisionDetector):
    """RetinaNet (Lin et al. 2017): focal loss on sigmoid class scores, smooth-L1/L1 box deltas."""

    def _compute_loss(self, targets, head, anchors, counts) -> dict[str, Tensor]:
        return self._tv.compute_loss(targets, head, anchors)


class FCOSDetector(DenseTorchvisionDetector):
    """FCOS (Tian et al. 2019): one point per location, focal loss, GIoU box loss, centre-ness."""

    def _compute_loss(self, targets, head, anchors, counts) -> dict[str, Tensor]:
        return self._tv.compute_loss(targets, head, anchors, counts)

    def _decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """FCOS's ``BoxLinearCoder``: distances to the four sides, times the point's stride-sized box."""
        return self._tv.box_coder.decode(deltas, anchors)

    def scores(self, outputs: dict[str, Tensor]) -> Tensor:
        """FCOS ranks ``sqrt(sigmoid(class logit) * sigmoid(centre-ness))``."""
        return torch.sqrt(torch.sigmoid(outputs["out"].float()) * torch.sigmoid(outputs["ctr"].float()))


class SSDDetector(DenseTorchvisionDetector):
    """SSD / SSDlite (Liu et al. 2016; Sandler et al. 2018): softmax over background + classes, hard
    negative mining 3:1. ``"out"`` is the foreground logits, ``"bg"`` the background logit."""

    label_offset = 1

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        outputs = super().forward(x)
        logits = outputs["out"]
        outputs["out"], outputs["bg"] = logits[..., 1:], logits[..., :1]
        return outputs

    def head_outputs(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        head = super().head_outputs(outputs)
        head["cls_logits"] = torch.cat([outputs["bg"].float(), head["cls_logits"]], dim=-1)
        return head

    def _compute_loss(self, targets, head, anchors, counts) -> dict[str, Tensor]:
        matched = []
        for anchors_per_image, target in zip(anchors, targets):
            if target["boxes"].numel() == 0:
                matched.append(
                    torch.full(
                        (len(anchors_per_image),), -1, dtype=torch.long, device=anchors_per_image.device
                    )
                )
            else:
                matched.append(self._tv.proposal_matcher(box_ops.box_iou(target["boxes"], anchors_per_image)))
        return self._tv.compute_loss(targets, head, anchors, matched)

    def _postprocess(self, head, anchors, counts, sizes) -> list[dict[str, Tensor]]:
        return self._tv.postprocess_detections(head, anchors, sizes)

    def scores(self, outputs: dict[str, Tensor]) -> Tensor:
        """SSD ranks the softmax over background + classes; the foreground columns."""
        return torch.softmax(torch.cat([outputs["bg"].float(), outputs["out"].float()], dim=-1), dim=-1)[
            ..., 1:
        ]

    def postprocess_settings(self, size: tuple[int, int]) -> dict[str, Any]:
        """SSD selects per class (not per level)."""
        return {**super().postprocess_settings(size), "kind": "classes"}


class FasterRCNNDetector(TorchvisionDetector):
    """Faster R-CNN with FPN (Ren et al. 2015; Lin et al. 2017). ``forward`` runs the backbone and the
    RPN head: ``"out"`` objectness ``[B, A, 1]``, ``"rpn_box"`` deltas ``[B, A, 4]`` and every FPN
    level under its name; proposals and the RoI heads run in ``losses`` (training proposals, sampled
    RoIs, targets) and ``detect`` (test-time proposals), whatever mode the module is in."""

    dense = False
    label_offset = 1

    def __init__(
        self,
        tv_model: FasterRCNN,
        num_classes: int,
        levels: tuple[tuple[str, ...], tuple[int, ...]],
        keys: tuple[str, ...],
    ):
        super().__init__(tv_model, num_classes, levels)
        self.backbone = tv_model.backbone
        self.rpn = tv_model.rpn
        self.roi_heads = tv_model.roi_heads
        self.tv_keys = list(keys)  # torchvision's names of the levels, which its RoI pooler reads

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        found = self.backbone(x)
        if list(found) != self.tv_keys:
            raise ValueError(f"backbone levels {list(found)}, expected {self.tv_keys}")
        features = self.route(list(found.values()))
        objectness, deltas = self.rpn.head(features)
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        batch = x.shape[0]
        return {
            "out": objectness.view(batch, -1, 1),
            "rpn_box": deltas.view(batch, -1, 4),
            "image_size": image_size(x),
            **dict(zip(self.level_names, features, strict=True)),
        }

    def _proposals(self, outputs: dict[str, Tensor], training: bool):
        """Features by torchvision's names, image sizes, anchors and RPN proposals of the outputs."""
        features = OrderedDict((k, outputs[n]) for k, n in zip(self.tv_keys, self.level_names, strict=True))
        maps = list(features.values())
        batch = maps[0].shape[0]
        images = image_list(outputs, batch, maps[0])
        shapes = [torch.empty((0, 0, *m.shape[-2:]), device=m.device) for m in maps]  # float32 anchors
        anchors = self.rpn.anchor_generator(images, shapes)
        per_location = self.rpn.anchor_generator.num_anchors_per_location()[0]
        counts = [m.shape[-2] * m.shape[-1] * per_location for m in maps]
        objectness = outputs["out"].reshape(-1, 1).float()
        deltas = outputs["rpn_box"].reshape(-1, 4).float()
        proposals = self.rpn.box_coder.decode(deltas.detach(), anchors).view(batch, -1, 4)
        with overridden(self.rpn, training=training):  # pre/post-NMS top-n of training or testing
            boxes, _ = self.rpn.filter_proposals(proposals, objectness, images.image_sizes, counts)
        return features, images.image_sizes, anchors, objectness, deltas, boxes

    def losses(self, outputs: dict[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
        """RPN objectness/box losses and the RoI heads' classifier/box losses (torchvision's keys)."""
        features, sizes, anchors, objectness, deltas, proposals = self._proposals(outputs, training=True)
        targets = torchvision_targets(targets, self.label_offset, objectness.device)
        labels, matched_boxes = self.rpn.assign_targets_to_anchors(anchors, targets)
        regression_targets = self.rpn.box_coder.encode(matched_boxes, anchors)
        loss_objectness, loss_rpn_box = self.rpn.compute_loss(objectness, deltas, labels, regression_targets)
        with overridden(self.roi_heads, training=True):
            _, roi_losses = self.roi_heads(features, proposals, sizes, targets)
        return {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box, **roi_losses}

    def detect(
        self, outputs: dict[str, Tensor], score_thresh: float | None = None
    ) -> list[dict[str, Tensor]]:
        """Test-time proposals and RoI heads in float32 (also under autocast: boxes need the precision)."""
        outputs = {k: v.float() if v.is_floating_point() else v for k, v in outputs.items()}
        thresh = {} if score_thresh is None else {"score_thresh": float(score_thresh)}
        device = outputs["out"].device.type
        with torch.autocast(device, enabled=False), overridden(self.roi_heads, training=False, **thresh):
            features, sizes, _, _, _, proposals = self._proposals(outputs, training=False)
            found, _ = self.roi_heads(features, proposals, sizes)
        return shift_labels(found, self.label_offset)


def _no_downloads(kwargs: dict[str, Any]) -> dict[str, Any]:
    for key in ("weights", "weights_backbone", "pretrained", "pretrained_backbone"):
        if kwargs.get(key) is not None:
            raise KdkitError(
                f"detector option {key}=...: kdkit never downloads weights; "
                "drop it and point the config's weights entry at a local file"
            )
        kwargs.pop(key, None)
    return kwargs


def _tv(builder: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    fn = getattr(torchvision.models.detection, builder)
    return fn(weights=None, weights_backbone=None, num_classes=num_classes, **_no_downloads(kwargs))


@MODELS.register(
    "fasterrcnn_resnet50_fpn", "torchvision Faster R-CNN, ResNet-50-FPN, 41.8M params at 80 classes; offline"
)
def fasterrcnn_resnet50_fpn(num_classes: int = 80, **kwargs: Any) -> FasterRCNNDetector:
    model = _tv("fasterrcnn_resnet50_fpn", num_classes + 1, kwargs)
    return FasterRCNNDetector(model, num_classes, RESNET_FPN, RESNET_FPN_KEYS)


@MODELS.register(
    "fasterrcnn_resnet101_fpn",
    "torchvision Faster R-CNN, ResNet-101-FPN, 60.8M params at 80 classes; offline",
)
def fasterrcnn_resnet101_fpn(
    num_classes: int = 80, trainable_backbone_layers: int = 5, **kwargs: Any
) -> FasterRCNNDetector:
    """torchvision's ``resnet_fpn_backbone("resnet101")`` with trainable BatchNorm (as torchvision's
    ResNet-50 builder uses without backbone weights) under ``FasterRCNN``."""
    kwargs = _no_downloads(kwargs)
    backbone = resnet_fpn_backbone(
        backbone_name="resnet101",
        weights=None,
        norm_layer=nn.BatchNorm2d,
        trainable_layers=trainable_backbone_layers,
    )
    model = FasterRCNN(backbone, num_classes + 1, **kwargs)
    return FasterRCNNDetector(model, num_classes, RESNET_FPN, RESNET_FPN_KEYS)


@MODELS.register(
    "fasterrcnn_mobilenet_v3_large_fpn",
    "torchvision Faster R-CNN, MobileNetV3-Large-FPN, 19.4M params at 80 classes; offline",
)
def fasterrcnn_mobilenet_v3_large_fpn(num_classes: int = 80, **kwargs: Any) -> FasterRCNNDetector:
    model = _tv("fasterrcnn_mobilenet_v3_large_fpn", num_classes + 1, kwargs)
    return FasterRCNNDetector(model, num_classes, MOBILENET_FPN, MOBILENET_FPN_KEYS)


@MODELS.register(
    "retinanet_resnet50_fpn", "torchvision RetinaNet, ResNet-50-FPN, 33.8M params at 80 classes; offline"
)
def retinanet_resnet50_fpn(num_classes: int = 80, **kwargs: Any) -> RetinaNetDetector:
    model: RetinaNet = _tv("retinanet_resnet50_fpn", num_classes, kwargs)
    return RetinaNetDetector(model, num_classes, P3_P7)


@MODELS.register("fcos_resnet50_fpn", "torchvision FCOS, ResNet-50-FPN, 32.3M params at 80 classes; offline")
def fcos_resnet50_fpn(num_classes: int = 80, **kwargs: Any) -> FCOSDetector:
    model: FCOS = _tv("fcos_resnet50_fpn", num_classes, kwargs)
    return FCOSDetector(model, num_classes, P3_P7)


@MODELS.register(
    "ssdlite320_mobilenet_v3_large",
    "torchvision SSDlite, MobileNetV3-Large, 3.3M params at 80 classes; 320x320 or `size`; offline",
)
def ssdlite320_mobilenet_v3_large(
    num_classes: int = 80, size: tuple[int, int] | list[int] | None = None, **kwargs: Any
) -> SSDDetector:
    """``size``: the (h, w) its transform resizes to (torchvision fixes 320x320; the default boxes
    scale with the image, so other sizes work)."""
    model: SSD = _tv("ssdlite320_mobilenet_v3_large", num_classes + 1, kwargs)
    if size is not None:
        height, width = (int(v) for v in size)
        model.transform.min_size = (min(height, width),)
        model.transform.max_size = max(height, width)
        model.transform.fixed_size = (width, height)  # torchvision's order
    return SSDDetector(model, num_classes, SSDLITE)
