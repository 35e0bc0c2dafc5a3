"""Datasets: registered builders ``fn(split, root=None, **params) -> ImageDataset``.

Built in: ``embedded`` (procedural, the default), ``image_folder`` (your images), ``cifar10``
and ``cifar100`` (local torchvision-format folders); segmentation, streamed from disk:
``segmentation_folder`` (your masks), ``unlabeled_folder`` (images without masks),
``cityscapes``, ``voc`` and ``camvid`` (their standard layouts); detection: ``road_boxes``
(procedural, embedded), ``coco`` and ``voc_detection`` (their layouts). See :mod:`kdkit.data.base`
and :mod:`kdkit.data.det_base` for the contracts.
"""

from __future__ import annotations

import inspect
from typing import Any

from ..errors import KdkitError
from ..registry import DATASETS, did_you_mean
from . import (  # noqa: F401  (imported so they register)
    camvid,
    cifar,
    cityscapes,
    coco,
    embedded,
    folders,
    road_boxes,
    road_scenes,
    segfolders,
    voc,
    voc_det,
)
from .augment import BatchAugment
from .base import ImageDataset

__all__ = ["BatchAugment", "ImageDataset", "build_dataset"]


def build_dataset(name: str, split: str, **params: Any) -> ImageDataset:
    """Build a registered dataset; an unknown parameter raises KdkitError naming the valid ones."""
    builder = DATASETS.get(name)
    valid = [p for p in inspect.signature(builder).parameters if p != "split"]
    for key in params:
        if key not in valid:
            raise KdkitError(f"dataset '{name}' has no parameter '{key}'{did_you_mean(key, valid)}")
    return builder(split=split, **params)
