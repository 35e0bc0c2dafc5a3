"""Domain mixing: a target training split plus images of another domain at a fixed ratio.

Enhanced Spirit Distillation (Wu et al., Sec. IV.B, Algorithm 1 ``shuffle_select(D_p, D_t)``) feeds
the feature-imitation stage with target-domain images shuffled together with unlabeled images of a
proximity domain, at a ratio ``r`` of target to proximity images (Table III sweeps r from 10 to 0).
Reading used here: an epoch holds every target image once and ``round(n_target / r)`` proximity
images (all of them when ``r = 0``, and then no target image). The proximity images are drawn afresh
every epoch (the paper's ``shuffle_select``): :meth:`MixedDataset.for_epoch` draws them without
replacement from a generator seeded by the epoch's ``(seed, stage, epoch)``, which
:class:`~kdkit.engine.batches.Batches` calls before each training epoch; so a run is deterministic,
a resumed run draws what an uninterrupted one did, and every process draws the same subset. The
trainer shuffles the union every epoch. Mixed-in images carry no labels (their masks are all ignore),
so only label-free terms learn from them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import KdkitError
from .base import IGNORE_INDEX, SegmentationDataset


def draw_subset(size: int, count: int, epoch_seed: tuple[object, ...]) -> Tensor:
    """``count`` distinct indices of ``range(size)``, sorted, drawn from ``("mix", *epoch_seed)``."""
    from ..engine.batches import generator  # engine imports data

    return torch.randperm(size, generator=generator("mix", *epoch_seed))[:count].sort().values


def mixed_counts(target: int, other: int, ratio: float) -> tuple[int, int]:
    """How many target and mixed-in images one epoch holds at ``ratio`` (target per mixed-in image)."""
    if ratio == 0:
        return 0, other
    return target, min(other, round(target / ratio))


class MixedDataset(SegmentationDataset):
    """``target`` followed by a subset of ``other`` with all-ignore masks, redrawn by :meth:`for_epoch`.

    Until the first :meth:`for_epoch` the subset is the draw for ``epoch_seed = ()``.
    """

    def __init__(self, target: SegmentationDataset, other: SegmentationDataset, ratio: float) -> None:
        if getattr(target, "task", None) != "segmentation" or getattr(other, "task", None) != "segmentation":
            raise KdkitError("data.mix mixes segmentation datasets (images with masks) only")
        super().__init__(target.classes, target.mean, target.std)
        self.target, self.other = target, other
        n_target, n_other = mixed_counts(len(target), len(other), ratio)
        if n_target + n_other == 0:
            raise KdkitError(f"data.mix with ratio {ratio} selects no image (the mixed-in dataset is empty)")
        self.n_target, self.n_other = n_target, n_other
        in_memory = target.in_memory and other.in_memory
        self._stacked = bool(in_memory and target.images.shape[1:] == other.images.shape[1:])
        if self._stacked:
            blank = torch.full((n_other, *target.labels.shape[1:]), IGNORE_INDEX, dtype=torch.uint8)
            self.labels = torch.cat([target.labels[:n_target], blank])
        self.size = n_target + n_other
        self.for_epoch(())

    def for_epoch(self, epoch_seed: tuple[object, ...]) -> None:
        """Draw this epoch's mixed-in images: ``n_other`` distinct images of ``other`` from a generator
        seeded by ``epoch_seed`` (the trainer's ``(seed, stage, epoch)``)."""
        self.other_index = draw_subset(len(self.other), self.n_other, tuple(epoch_seed))
        if self._stacked:
            picked = self.other.images[self.other_index]
            self.images = torch.cat([self.target.images[: self.n_target], picked])

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        if self.in_memory:
            return self.images[index], self.labels[index]
        if index < self.n_target:
            return self.target[index]
        image, _ = self.other[int(self.other_index[index - self.n_target])]
        return image, torch.full(image.shape[-2:], IGNORE_INDEX, dtype=torch.uint8)
