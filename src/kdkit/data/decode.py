"""Classification augmentation per image at decode time: the ImageNet recipe, replayable per sample.

Random-resized crop (Szegedy et al. 2015), horizontal flip, colour jitter and RandAugment (Cubuk et al.
2020) are torchvision's ``transforms.v2``, applied to each decoded image (in the DataLoader's workers for
datasets read from disk) with the global RNG seeded, inside ``torch.random.fork_rng``, from the sample's
own key (:mod:`kdkit.data.draws`): the image of sample ``i`` in epoch ``e`` is the same whatever the
batch, the worker or the process that decodes it. The batch-level step then only normalises.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .mixup import Mixup


class DecodeAugment:
    """``augment(image uint8 [3,H,W], key) -> uint8 [3,S,S]`` (``S``: the resized crop's size)."""

    def __init__(self, config: Any) -> None:
        steps: list[Any] = []
        if config.resized_crop is not None:
            rc = config.resized_crop
            steps.append(v2.RandomResizedCrop(rc.size, scale=rc.scale, ratio=rc.ratio, antialias=True))
            if config.flip:
                steps.append(v2.RandomHorizontalFlip())
        if config.color_jitter is not None:
            steps.append(v2.ColorJitter(*config.color_jitter))
        if config.randaugment is not None:
            steps.append(v2.RandAugment(*config.randaugment))
        self.transform = v2.Compose(steps)

    def __call__(self, image: Tensor, key: int) -> Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(key)
            return self.transform(image)


class Decoded(Dataset):
    """``dataset`` whose items are ``(index, key, pair)``: sample ``index`` decoded and augmented with
    ``key`` (as it is without ``augment``), and with ``pair = (partner, partner key, draws)`` mixed with
    its partner by ``mixup`` (:mod:`kdkit.data.mixup`); what :class:`~kdkit.engine.batches.Batches`
    feeds its DataLoader when it augments or mixes at decode."""

    def __init__(self, dataset: Dataset, augment: DecodeAugment | None, mixup: Mixup | None = None) -> None:
        self.dataset, self.augment, self.mixup = dataset, augment, mixup

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def load(self, index: int, key: int) -> tuple[Tensor, Any]:
        image, label = self.dataset[index]
        return (image if self.augment is None else self.augment(image, key)), label

    def __getitem__(self, item: tuple[int, int, Any]) -> tuple[Tensor, Any]:
        index, key, pair = item
        image, label = self.load(index, key)
        if pair is None:
            return image, label
        assert self.mixup is not None
        partner, partner_key, draws = pair
        other, other_label = self.load(partner, partner_key)
        images, targets = self.mixup.mix(
            image[None], other[None], torch.as_tensor([label]), torch.as_tensor([other_label]), draws
        )
        return images[0], targets[0]
