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
    builder (``build(name, root, split, params)``), the labelled terms of the run, and the ignore label."""

    task: str
    mean: Sequence[float]
    std: Sequence[float]
    device: torch.device
    build_dataset: Callable[[str, str | None, str, dict[str, Any]], Any]
    label_terms: list[str] = field(default_factory=list)
    ignore_index: int = -100
    seed: int = 0  # the run seed (runtime.seed), for a refiner's own seeded choices

    def __post_init__(self) -> None:  # built once, not on every step
        self._mean = torch.tensor(self.mean, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(self.std, device=self.device).view(1, -1, 1, 1)

    def to_unit(self, images: Tensor) -> Tensor:
        """Normalised images back to [0, 1]."""
        return images * self._std.to(images.device) + self._mean.to(images.device)

    def normalize(self, images: Tensor) -> Tensor:
        return (images - self._mean.to(images.device)) / self._std.to(images.device)


class DataRefiner(nn.Module):
    """Base class of data refiners (no trainable parameters are expected to enter the student)."""

    def setup(self, context: RefinerContext) -> None:
        self.context = context

    def forward(
        self, images: Tensor, labels: Tensor, generator: torch.Generator, total: int, start: int
    ) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError
