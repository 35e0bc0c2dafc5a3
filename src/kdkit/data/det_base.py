"""The detection dataset contract: images with per-image boxes.

A target of one image is float32 ``[n, 5]``, rows ``(x1, y1, x2, y2, cls)``: boxes in absolute pixel
coordinates of that image (the image spans ``[0, W] x [0, H]``) and the 0-based class id (no
background class). A batch of targets is ``[B, M, 5]``, padded with rows whose ``cls`` is ``-1``
(coordinates 0), valid rows first: see :func:`pad_targets` / :func:`unpad`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..errors import KdkitError
from .base import IMAGENET_MEAN, IMAGENET_STD, ImageDataset, Stats, _checked_stats
from .folders import load_image

PAD_CLASS = -1
"""``cls`` of the padding rows of batched targets."""


def pad_targets(targets: Sequence[Tensor], M: int | None = None) -> Tensor:  # noqa: N803 (the contract's name)
    """Stack per-image targets ``[n_i, 5]`` into float32 ``[B, M, 5]``, padded with ``(0, 0, 0, 0, -1)`` rows.

    ``M`` defaults to the largest ``n_i`` (at least 1); a target with more than ``M`` rows is an error.
    """
    rows = [t.reshape(-1, 5) for t in targets]
    most = max((len(t) for t in rows), default=0)
    m = max(most, 1) if M is None else int(M)
    if most > m:
        raise ValueError(f"a target has {most} boxes, more than M={m}")
    out = torch.zeros(len(rows), m, 5, dtype=torch.float32)
    out[..., 4] = PAD_CLASS
    for i, t in enumerate(rows):
        out[i, : len(t)] = t.to(torch.float32)
    return out


def unpad(target: Tensor) -> Tensor:
    """The valid rows (``cls >= 0``) of one padded target ``[M, 5]``: ``[n, 5]``."""
    return target[target[:, 4] >= 0]


def check_target(target: Tensor, where: str = "target") -> Tensor:
    """``target`` as float32 ``[n, 5]``; a ValueError names a wrong shape."""
    if target.dim() != 2 or target.shape[1] != 5:
        raise ValueError(f"{where} must be [n, 5] rows (x1, y1, x2, y2, cls), got {tuple(target.shape)}")
    return target.to(torch.float32)


class DetectionDataset(ImageDataset):
    """Images with boxes: items ``(image uint8 [3,H,W], target float32 [n,5])``.

    Images of one split may differ in size (COCO, VOC); the augmenter brings a training batch to one
    size (:class:`~kdkit.data.det_augment.DetectionAugment`). Streaming subclasses implement
    ``__len__``/``__getitem__``; in-memory ones set ``images`` and ``labels`` (padded targets).
    """

    task = "detection"

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        assert self.images is not None and self.labels is not None
        return self.images[index], unpad(self.labels[index])


class DetectionTensorDataset(DetectionDataset):
    """A detection split in memory: ``images`` uint8 ``[N,3,H,W]``, ``labels`` the padded targets
    ``[N,M,5]``."""

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        classes: list[str],
        mean: Stats | None = None,
        std: Stats | None = None,
    ) -> None:
        mean, std = _checked_stats(images, mean, std)
        if targets.dim() != 3 or targets.shape[0] != images.shape[0] or targets.shape[2] != 5:
            raise ValueError(
                f"targets must be [N,M,5] with N={images.shape[0]} (the images), got {tuple(targets.shape)}"
            )
        if targets.numel() and int(targets[..., 4].max()) >= len(classes):
            raise ValueError(
                f"targets hold class {int(targets[..., 4].max())} but there are {len(classes)} classes"
            )
        super().__init__(classes, mean, std)
        self.images = images
        self.labels = targets.to(torch.float32)


class FileDetectionDataset(DetectionDataset):
    """Images decoded from files on access, with targets known up front: ``items`` are
    ``(image path, target [n,5])``. ``limit`` keeps the first N items; ``source`` says where they came
    from, for the error about an empty split."""

    def __init__(
        self,
        items: Sequence[tuple[Path, Tensor]],
        classes: list[str],
        source: str,
        mean: Stats = IMAGENET_MEAN,
        std: Stats = IMAGENET_STD,
        limit: int | None = None,
    ) -> None:
        super().__init__(classes, mean, std)
        if limit is not None and limit < 1:
            raise KdkitError(f"limit must be a positive number of images, got {limit}")
        self.items = [(Path(path), check_target(t, str(path))) for path, t in list(items)[:limit]]
        if not self.items:
            raise KdkitError(f"no images in {source}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        path, target = self.items[index]
        return load_image(path), target.clone()
