"""Deterministic, resumable batch streams.

Every random choice is a function of ``(seed, stage, epoch, step)`` or, for a sample's augmentation,
``(seed, stage, epoch, dataset index)``: the epoch's permutation, each sample's augmentation and the
global RNG. So a run resumed at step ``k`` of an epoch sees exactly the
batches an uninterrupted run would, and ``N`` processes each take a contiguous slice of the same
global batch that one process would see (``batch_size`` is global).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.decode import DecodeAugment, Decoded
from ..data.det_base import pad_targets
from ..data.draws import sample_keys
from ..data.mixup import Mixup
from ..errors import KdkitError
from .distributed import DistInfo


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that depends on every part (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def to_device(
    value: torch.Tensor | list[torch.Tensor], device: torch.device
) -> torch.Tensor | list[torch.Tensor]:
    """Move a batch tensor, or a list of differently sized samples, to ``device``."""
    if isinstance(value, list):
        return [v.to(device) for v in value]
    return value.to(device)


def augment_batch(
    augment: Callable[..., tuple[Any, Any]],
    images: Any,
    labels: Any,
    indices: torch.Tensor,
    device: torch.device,
    epoch_seed: tuple[object, ...],
) -> tuple[Any, Any]:
    """A batch on ``device`` through the task's augmenter; sample ``i`` draws from its own stream
    ``("augment", *epoch_seed, i)`` with ``epoch_seed = (seed, stage, epoch)`` (:mod:`kdkit.data.draws`),
    so training and ``kdkit cache-teacher`` augment every sample identically."""
    keys = sample_keys(indices, "augment", *epoch_seed)
    return augment(to_device(images, device), to_device(labels, device), keys)


def repeat_indices(indices: torch.Tensor, count: int) -> torch.Tensor:
    """The dataset indices of a refined batch: a data refiner that appends copies ([x; x'], TST's
    [x; x_hat]) keeps the order, so the indices repeat."""
    if count % indices.numel():
        raise KdkitError(
            f"a refiner made a batch of {count} from {indices.numel()} images; expected a multiple"
        )
    return indices.repeat(count // indices.numel())


def _collate(items: list[tuple[torch.Tensor, Any]], boxes: bool = False) -> tuple[Any, Any]:
    """Stack images and labels (class ids, masks, or with ``boxes`` detection targets ``[n, 5]``, padded
    to ``[b, M, 5]``); differently sized images stay lists (and their labels too)."""
    images = [image for image, _ in items]
    labels = [label for _, label in items]
    if boxes:
        if any(image.shape != images[0].shape for image in images):
            return images, labels
        return torch.stack(images), pad_targets(labels)
    if isinstance(labels[0], torch.Tensor) and labels[0].dim() > 0:
        if any(image.shape != images[0].shape for image in images):
            return images, labels
        return torch.stack(images), torch.stack(labels)
    return torch.stack(images), torch.as_tensor([int(label) for label in labels], dtype=torch.long)


class Batches:
    """Batches of one dataset for this process: ``(images uint8 [b,C,H,W], labels [b])``.

    Segmentation labels are masks ``[b,H,W]``, detection labels targets ``[b,M,5]`` (padded with
    class -1); a batch of differently sized images (and their masks or targets) comes as two lists.

    In-memory datasets (``dataset.in_memory``) are indexed directly; others go through a
    ``DataLoader`` whose workers decode images, fed with the same precomputed index lists. With
    ``decode`` (:class:`~kdkit.data.decode.DecodeAugment`) every image is augmented as it is decoded,
    seeded by its sample's key ``("decode", *epoch_seed, index)``. With ``mixup``
    (:class:`~kdkit.data.mixup.Mixup`) every image is then mixed with its partner's (drawn from
    ``("mixup", *epoch_seed, index)``): images become [0, 1] floats and labels class probabilities.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        info: DistInfo,
        *,
        train: bool,
        num_workers: int = 0,
        decode: DecodeAugment | None = None,
        mixup: Mixup | None = None,
    ) -> None:
        if batch_size % info.world:
            raise KdkitError(
                f"batch_size {batch_size} does not split over {info.world} processes; "
                f"use a multiple of {info.world}"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.local_batch = batch_size // info.world
        self.info = info
        self.train = train
        self.num_workers = num_workers
        self.decode = decode
        self.mixup = mixup
        self.size = len(dataset)  # type: ignore[arg-type]
        if train and self.size < batch_size:
            raise KdkitError(f"the training set has {self.size} images, fewer than batch_size {batch_size}")

    @classmethod
    def of_stage(cls, stage: Any, task: Any, info: DistInfo, batch_size: int, train: bool) -> Batches:
        """A stage's training data with its decode-time augmentation (:meth:`task.decoder`) and its
        mixup/CutMix (:meth:`task.mixer`), if any."""
        return cls(
            stage.train_data,
            batch_size,
            info,
            train=train,
            num_workers=stage.num_workers,
            decode=task.decoder(stage.augment),
            mixup=task.mixer(stage.augment),
        )

    def __len__(self) -> int:
        """Steps per epoch (training drops the last incomplete global batch)."""
        if self.train:
            return self.size // self.batch_size
        return -(-self._eval_indices().numel() // self.local_batch)

    def _eval_indices(self) -> torch.Tensor:
        return torch.arange(self.info.rank, self.size, self.info.world)

    def _index_lists(self, epoch_seed: tuple[object, ...], start_step: int) -> list[torch.Tensor]:
        if not self.train:
            return list(torch.split(self._eval_indices(), self.local_batch))
        order = torch.randperm(self.size, generator=generator("order", *epoch_seed))
        lo = self.info.rank * self.local_batch
        return [
            order[step * self.batch_size + lo : step * self.batch_size + lo + self.local_batch]
            for step in range(start_step, len(self))
        ]

    def epoch(
        self,
        epoch_seed: tuple[object, ...] = (),
        start_step: int = 0,
        indices: bool = False,
        skip: Callable[[torch.Tensor], bool] | None = None,
    ) -> Iterator[tuple[Any, ...]]:
        """This process's batches of one epoch, ``(images, labels)``, or ``(images, labels, idx)`` with
        ``indices`` (the samples' dataset indices); batches whose indices ``skip`` accepts are left out
        before anything is loaded. A training dataset with ``for_epoch(epoch_seed)``
        (e.g. :class:`~kdkit.data.mixing.MixedDataset`) is told the epoch first, so it may redraw
        its content from the same seed."""
        batches = self._batches(epoch_seed, start_step, skip)
        if not indices:
            for images, labels, _ in batches:
                yield images, labels
            return
        yield from batches

    def _batches(
        self,
        epoch_seed: tuple[object, ...],
        start_step: int,
        skip: Callable[[torch.Tensor], bool] | None = None,
    ) -> Iterator[tuple[Any, ...]]:
        if self.train and hasattr(self.dataset, "for_epoch"):
            self.dataset.for_epoch(epoch_seed)
        index_lists = self._index_lists(epoch_seed, start_step)
        if skip is not None:
            index_lists = [idx for idx in index_lists if not skip(idx)]
        decode, mixup = self.decode, self.mixup
        if getattr(self.dataset, "in_memory", False):
            images, labels = self.dataset.images, self.dataset.labels  # type: ignore[attr-defined]

            def load(idx: torch.Tensor) -> torch.Tensor:
                if decode is None:
                    return images[idx]
                seeds = sample_keys(idx, "decode", *epoch_seed).seeds()
                return torch.stack([decode(images[i], k) for i, k in zip(idx, seeds)])

            for idx in index_lists:
                if mixup is None:
                    yield load(idx), labels[idx], idx
                    continue
                d = mixup.draw(sample_keys(idx, "mixup", *epoch_seed), self.size)
                mixed = mixup.mix(load(idx), load(d.partner), labels[idx], labels[d.partner], d)
                yield (*mixed, idx)
            return
        plain = decode is None and mixup is None
        loader = DataLoader(
            self.dataset if plain else Decoded(self.dataset, decode, mixup),
            batch_sampler=[idx.tolist() for idx in index_lists]
            if plain
            else _LazyItems(index_lists, epoch_seed, self.size, decode is not None, mixup),
            num_workers=self.num_workers,
            collate_fn=partial(_collate, boxes=getattr(self.dataset, "task", None) == "detection"),
            persistent_workers=False,
        )
        for idx, (images, labels) in zip(index_lists, loader):
            yield images, labels, idx


class _LazyItems:
    """The :class:`~kdkit.data.decode.Decoded` items ``(index, key, pair)`` of each batch, made as the
    DataLoader asks for them (drawing a whole epoch's keys and mixup partners up front would stall the
    first step of a large dataset)."""

    def __init__(
        self,
        index_lists: list[torch.Tensor],
        epoch_seed: tuple[object, ...],
        size: int,
        decode: bool,
        mixup: Mixup | None,
    ) -> None:
        self.index_lists, self.epoch_seed, self.size = index_lists, epoch_seed, size
        self.decode, self.mixup = decode, mixup

    def __len__(self) -> int:
        return len(self.index_lists)

    def _seeds(self, idx: torch.Tensor) -> list[int]:
        return sample_keys(idx, "decode", *self.epoch_seed).seeds() if self.decode else [0] * len(idx)

    def __iter__(self) -> Iterator[list[tuple[int, int, Any]]]:
        for idx in self.index_lists:
            seeds = self._seeds(idx)
            if self.mixup is None:
                yield [(i, k, None) for i, k in zip(idx.tolist(), seeds)]
                continue
            d = self.mixup.draw(sample_keys(idx, "mixup", *self.epoch_seed), self.size)
            pairs = zip(d.partner.tolist(), self._seeds(d.partner), (d.row(j) for j in range(len(idx))))
            yield [(i, k, pair) for i, k, pair in zip(idx.tolist(), seeds, pairs)]
