"""Domain mixing: a target training split plus images of another domain at a fixed ratio.

Enhanced Spirit Distillation (Wu et al., Sec. IV.B, Algorithm 1 ``shuffle_select(D_p, D_t)``) feeds
the feature-imitation stage with target-domain images shuffled together with unlabeled images of a
proximity domain, at a ratio ``r`` of target to proximity images (Table III sweeps r from 10 to 0).
Reading used here: an epoch holds every target image once and ``round(n_target / r)`` proximity
images (all of them when ``r = 0``, and then no target image), spread evenly over the proximity set;
the trainer shuffles the union every epoch. Mixed-in images carry no labels (their masks are all
ignore), so only label-free terms learn from them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import KdkitError
from .base import IGNORE_INDEX, SegmentationDataset


def mixed_counts(target: int, other: int, ratio: float) -> tuple[int, int]:
    """How many target and mixed-in images one epoch holds at ``ratio`` (target per mixed-in image)."""
    if ratio == 0:
        return 0, other
    return target, min(other, round(target / ratio))


class MixedDataset(SegmentationDataset):
    """``target`` followed by an evenly spaced subset of ``other`` with all-ignore masks."""

    def __init__(self, target: SegmentationDataset, other: SegmentationDataset, ratio: float) -> None:
        if getattr(target, "task", None) != "segmentation" or getattr(other, "task", None) != "segmentation":
            raise KdkitError("data.mix mixes segmentation datasets (images with masks) only")
        super().__init__(target.classes, target.mean, target.std)
        self.target, self.other = target, other
        n_target, n_other = mixed_counts(len(target), len(other), ratio)
        if n_target + n_other == 0:
            raise KdkitError(f"data.mix with ratio {ratio} selects no image (the mixed-in dataset is empty)")
        self.n_target = n_target
        self.other_index = torch.linspace(0, len(other) - 1, n_other).round().long() if n_other else None
        if target.in_memory and other.in_memory and target.images.shape[1:] == other.images.shape[1:]:
            picked = other.images[self.other_index] if n_other else other.images[:0]
            self.images = torch.cat([target.images[:n_target], picked])
            blank = torch.full((n_other, *target.labels.shape[1:]), IGNORE_INDEX, dtype=torch.uint8)
            self.labels = torch.cat([target.labels[:n_target], blank])
        self.size = n_target + n_other

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        if self.in_memory:
            return self.images[index], self.labels[index]
        if index < self.n_target:
            return self.target[index]
        image, _ = self.other[int(self.other_index[index - self.n_target])]
        return image, torch.full(image.shape[-2:], IGNORE_INDEX, dtype=torch.uint8)
