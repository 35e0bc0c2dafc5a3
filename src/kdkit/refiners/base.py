"""The data-refiner contract: a module that turns a training batch into the batch teacher and student see.

The trainer calls :meth:`DataRefiner.setup` once with a :class:`RefinerContext`, then, every step after
augmentation, ``refiner(images, labels, generator, total, start)`` on this process's slice
``[start, start + B)`` of a global batch of ``total`` samples (random choices are drawn for the whole
global batch and sliced, as the augmentation does, so N processes refine exactly as one would).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class RefinerContext:
    """What a refiner may need from the run: the task, the input normalisation, the device, a dataset
    builder (``build(name, root, split, params)``), the labelled terms of the run, and the image size."""

    task: str
    mean: Sequence[float]
    std: Sequence[float]
    device: torch.device
    build_dataset: Callable[[str, str | None, str, dict[str, Any]], Any]
    label_terms: list[str] = field(default_factory=list)
    ignore_index: int = -100

    def to_unit(self, images: Tensor) -> Tensor:
        """Normalised images back to [0, 1]."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return images * std + mean

    def normalize(self, images: Tensor) -> Tensor:
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images - mean) / std


class DataRefiner(nn.Module):
    """Base class of data refiners (no trainable parameters are expected to enter the student)."""

    def setup(self, context: RefinerContext) -> None:
        self.context = context

    def forward(
        self, images: Tensor, labels: Tensor, generator: torch.Generator, total: int, start: int
    ) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError
