"""The dataset contract shared by every registered dataset.

A dataset builder is ``fn(split, root=None, **params) -> ImageDataset``. Classification items are
``(image uint8 [C,H,W], label int)``; segmentation items (:class:`SegmentationDataset`) are
``(image uint8 [3,H,W], mask uint8 [H,W])`` with class indices and :data:`IGNORE_INDEX` (255) for
pixels without a label. Datasets hold no randomness (augmentation happens on batches, see
:mod:`kdkit.data.augment`). A dataset whose split fits in memory also exposes ``images`` (uint8
``[N,C,H,W]``) and ``labels`` (int64 ``[N]``, or uint8 masks ``[N,H,W]``), and the engine indexes
them directly.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import KdkitError
from ..registry import did_you_mean

Stats = tuple[float, ...]

IGNORE_INDEX = 255
"""Mask value of pixels that carry no label (Cityscapes/VOC convention); losses and metrics skip them."""

IMAGENET_MEAN: Stats = (0.485, 0.456, 0.406)
IMAGENET_STD: Stats = (0.229, 0.224, 0.225)
"""Normalisation of ImageNet-pretrained backbones, used by the real-world segmentation layouts."""


def cache_dir(*parts: str) -> Path:
    """``$KDKIT_CACHE/<parts>``, default ``~/.cache/kdkit/<parts>``."""
    base = os.environ.get("KDKIT_CACHE") or Path.home() / ".cache" / "kdkit"
    return Path(base).joinpath(*parts)


def versioned_dir(root: Path, version: int, **params: object) -> Path:
    """``<root>/v<version>-<hash of the version and parameters>``: where a generated dataset is cached."""
    key = json.dumps({"version": version, **params}, sort_keys=True)
    return root / f"v{version}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def check_split(split: str, splits: tuple[str, ...] | list[str], dataset: str) -> None:
    if split not in splits:
        raise KdkitError(f"dataset '{dataset}' has no split '{split}'{did_you_mean(split, list(splits))}")


def channel_stats(images: Tensor | list[Tensor], max_items: int = 2000) -> tuple[Stats, Stats]:
    """Per-channel mean/std in [0,1] units of uint8 images (``[N,C,H,W]`` or a list of ``[C,H,W]``).

    Uses an evenly spaced subsample of at most ``max_items`` images, so it is deterministic.
    """
    sample = images[:: max(1, len(images) // max_items)]
    x = torch.cat([im.reshape(im.shape[0], -1) for im in sample], 1).to(torch.float64).div_(255)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).tolist())


class ImageDataset(Dataset):
    """Labelled images with class names and normalisation statistics.

    Subclasses that stream implement ``__len__``/``__getitem__``; in-memory ones set
    ``images``/``labels`` (see :class:`TensorDataset`).
    """

    task = "classification"
    images: Tensor | None = None
    labels: Tensor | None = None

    def __init__(self, classes: list[str], mean: Stats, std: Stats) -> None:
        self.classes = list(classes)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def __len__(self) -> int:
        assert self.labels is not None
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        assert self.images is not None and self.labels is not None
        return self.images[index], int(self.labels[index])


def _checked_stats(images: Tensor, mean: Stats | None, std: Stats | None) -> tuple[Stats, Stats]:
    """Check in-memory images are uint8 ``[N,C,H,W]``; their mean/std unless given."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be uint8 [N,C,H,W], got {images.dtype} {tuple(images.shape)}")
    return (mean, std) if mean is not None and std is not None else channel_stats(images)


class TensorDataset(ImageDataset):
    """A split held in memory; mean/std are computed from the images when not given."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        classes: list[str],
        mean: Stats | None = None,
        std: Stats | None = None,
    ) -> None:
        super().__init__(classes, *_checked_stats(images, mean, std))
        self.images = images
        self.labels = labels.to(torch.int64)


class SegmentationDataset(ImageDataset):
    """Images with dense masks: items ``(image uint8 [3,H,W], mask uint8 [H,W])``.

    Mask values are class indices ``0..num_classes-1`` or :data:`IGNORE_INDEX`. Images of one split
    may differ in size (VOC); the engine crops training batches to a common size. Streaming
    subclasses implement ``__len__``/``__getitem__``; in-memory ones set ``images``/``labels``.
    """

    task = "segmentation"
    ignore_index = IGNORE_INDEX


class SegmentationTensorDataset(SegmentationDataset):
    """A segmentation split in memory: ``images`` uint8 ``[N,3,H,W]``, ``labels`` uint8 masks ``[N,H,W]``."""

    def __init__(
        self,
        images: Tensor,
        masks: Tensor,
        classes: list[str],
        mean: Stats | None = None,
        std: Stats | None = None,
    ) -> None:
        mean, std = _checked_stats(images, mean, std)
        if masks.dim() != 3 or masks.shape[0] != images.shape[0] or masks.shape[1:] != images.shape[2:]:
            raise ValueError(
                f"masks must be [N,H,W] matching images {tuple(images.shape)}, got {tuple(masks.shape)}"
            )
        super().__init__(classes, mean, std)
        self.images = images
        self.labels = masks.to(torch.uint8)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        assert self.images is not None and self.labels is not None
        return self.images[index], self.labels[index]
