"""Object detectors: the :class:`~.base.Detector` contract, torchvision's detectors wrapped to it
(:mod:`.wrappers`) and a compact FCOS for the embedded road-scene demo (:mod:`.compact`).

A detector's ``forward`` takes normalised, sized images and returns raw head outputs (a dict with
``"out"`` and ``"image_size"``); ``losses(outputs, targets [B, M, 5])`` gives its own training losses,
``detect(outputs)`` boxes, scores and 0-based labels per image. Its FPN levels are ``feature_taps``
(``levels.<name>``) at ``feature_strides``.
"""

from __future__ import annotations

from . import compact, wrappers, zoo
from .base import Detector, check_input_sizes

DET_MODELS = (
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet101_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "retinanet_resnet50_fpn",
    "fcos_resnet50_fpn",
    "ssdlite320_mobilenet_v3_large",
    *compact.DET_COMPACT,
    *zoo.DET_ZOO,
)

__all__ = ["DET_MODELS", "Detector", "check_input_sizes", "compact", "wrappers", "zoo"]
