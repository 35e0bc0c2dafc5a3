"""What a registered dataset feeds a model, known without building it: task, classes, image size.

Used by dry runs (``kdkit inspect CONFIG --dry``) that check a preset's models, taps and connectors
on a machine without its data. The sizes are each dataset's training images at their default
parameters (``image_size``, ``resize`` and ``keep`` are read from the config's ``data.params``);
datasets read from the user's own folders have no known shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from . import camvid, cityscapes, road_scenes, voc


@dataclass(frozen=True)
class DataShape:
    """A dataset's task, number of classes and training image size ``(H, W)``."""

    task: str
    num_classes: int
    size: tuple[int, int]


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _cityscapes(params: Mapping[str, Any]) -> DataShape:
    keep = params.get("keep")
    classes = 1 + len(keep) if keep else len(cityscapes.CLASSES)
    return DataShape("segmentation", classes, _pair(params.get("resize") or (1024, 2048)))


KNOWN: dict[str, Callable[[Mapping[str, Any]], DataShape]] = {
    "embedded": lambda p: DataShape(
        "classification", int(p.get("num_classes", 10)), _pair(p.get("image_size", 32))
    ),
    "cifar10": lambda p: DataShape("classification", 10, (32, 32)),
    "cifar100": lambda p: DataShape("classification", 100, (32, 32)),
    "road_scenes": lambda p: DataShape(
        "segmentation", len(road_scenes.CLASSES), _pair(p.get("image_size", (64, 128)))
    ),
    "cityscapes": _cityscapes,
    "voc": lambda p: DataShape("segmentation", len(voc.CLASSES), (500, 500)),  # VOC images: at most 500
    "camvid": lambda p: DataShape("segmentation", len(camvid.CLASSES), (360, 480)),
}


def known_shape(name: str, params: Mapping[str, Any]) -> DataShape | None:
    """The shape of dataset ``name`` built with ``params``, or None when it depends on files on disk."""
    builder = KNOWN.get(name)
    return builder(params) if builder is not None else None
