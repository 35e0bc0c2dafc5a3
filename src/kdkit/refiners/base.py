"""The refiner contracts: data refiners change the training batch teacher and student see, feature
refiners change the teacher's tapped features before the terms read them.

The trainer calls :meth:`Refiner.setup` once with a :class:`RefinerContext`. A :class:`DataRefiner` is then
called every step after augmentation, ``refiner(images, labels, generator, total, start)``, on this
process's slice ``[start, start + B)`` of a global batch of ``total`` samples (random choices are drawn for
the whole global batch and sliced, as the augmentation does, so N processes refine exactly as one would).
A :class:`FeatureRefiner` is bound once to the teacher's tap shapes and then called inside the distiller's
step, ``refiner(features, generator, total, start)``, with the same slicing convention.
Both may learn (:mod:`kdkit.engine.refining`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
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
    train_data: Any = None  # the first stage's training set (uint8 images), e.g. to fit a refiner on

    def __post_init__(self) -> None:  # built once, not on every step
        self._mean = torch.tensor(self.mean, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(self.std, device=self.device).view(1, -1, 1, 1)

    def to_unit(self, images: Tensor) -> Tensor:
        """Normalised images back to [0, 1]."""
        return images * self._std.to(images.device) + self._mean.to(images.device)

    def normalize(self, images: Tensor) -> Tensor:
        return (images - self._mean.to(images.device)) / self._std.to(images.device)


class Refiner(nn.Module):
    """What data and feature refiners share (their parameters never enter the student).

    A learnable refiner also defines ``loss(images, labels, generator, total, start, frozen)`` returning
    ``(loss, parts)``: ``frozen`` (:class:`kdkit.engine.refining.FrozenModels`) gives the teacher's and
    the student's logits with gradients to the input, and their tapped features; the engine steps the
    refiner's own optimizer on it, in turns with the student (:mod:`kdkit.engine.refining`). Its trainable
    parameters are those with ``requires_grad``; fixed tensors it owns (e.g. fitted networks) are buffers
    or frozen parameters.
    """

    def setup(self, context: RefinerContext) -> None:
        self.context = context

    def prepare(self, size: tuple[int, int]) -> None:
        """Called once before training with the size of the training batches' images (after
        augmentation), e.g. to fit or load networks made for that size. Default: nothing."""

    def describe(self) -> str | None:
        """One line on what :meth:`prepare` made (``kdkit prepare`` prints it); ``None``: nothing."""
        return None

    def log_state(self) -> dict[str, float]:
        """Scalars recorded with each refiner update (e.g. learned magnitudes), for the report's plots."""
        return {}

    def report(self) -> list[str]:
        """Markdown lines for the run's report at the end of training (e.g. a searched policy)."""
        return []


class DataRefiner(Refiner):
    """Base class of data refiners: ``forward(images, labels, generator, total, start)`` returns the
    refined ``(images, labels)`` (it may append copies, as TST's ``[x; x_hat]``)."""

    def forward(
        self, images: Tensor, labels: Tensor, generator: torch.Generator, total: int, start: int
    ) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


class FeatureRefiner(Refiner):
    """Base class of feature refiners: ``forward(features, generator, total, start)`` returns the
    teacher's tap dict with the taps it refines replaced (shapes unchanged); random draws are made for
    the global batch of ``total`` and sliced at ``start``. :meth:`bind` is called once after the dry run."""

    taps: list[str]

    def bind(self, teacher_shapes: dict[str, torch.Size], targets: list[str]) -> None:
        """Choose and check the taps to refine. ``teacher_shapes``: every teacher tap the terms read;
        ``targets``: those a term maps the student onto (:meth:`kdkit.terms.base.Term.teacher_space`)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def forward(
        self, features: dict[str, Tensor], generator: torch.Generator, total: int, start: int
    ) -> dict[str, Tensor]:
        raise NotImplementedError  # pragma: no cover - abstract


def fit_to_size(image: Tensor, size: tuple[int, int]) -> Tensor:
    """A uint8 ``[3, H, W]`` image centre-cropped to ``size`` (resized when smaller)."""
    height, width = image.shape[-2:]
    if height >= size[0] and width >= size[1]:
        top, left = (height - size[0]) // 2, (width - size[1]) // 2
        return image[:, top : top + size[0], left : left + size[1]]
    resized = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)
    return resized[0].round().clamp(0, 255).byte()
