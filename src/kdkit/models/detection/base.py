"""The detector contract: :class:`Detector`, and :func:`check_input_sizes` for a teacher/student pair.

A detector takes images that kdkit has already normalised and sized (``[B, 3, H, W]``) and returns
its raw head outputs as a dict; ``losses`` turns them and the padded targets ``[B, M, 5]`` (rows
``x1, y1, x2, y2, cls``, ``cls = -1`` for padding) into its own training losses, ``detect`` into
boxes. torchvision's ``GeneralizedRCNNTransform`` (resize + normalise) is bypassed; the size it
would resize to is kept as ``input_size = (min_size, max_size)`` so that a teacher and a student
that expect different resolutions are caught before training (:func:`check_input_sizes`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from ...errors import KdkitError

LEVELS = "levels"
"""Name of the ``nn.ModuleDict`` of ``nn.Identity`` modules that the FPN levels are routed through."""


class Detector(nn.Module):
    """Base class of kdkit's detectors (see the module docstring and the detection contract).

    Attributes: ``num_classes`` (foreground classes), ``feature_taps`` (module paths of the FPN
    levels, shallow -> deep, e.g. ``"levels.p3"``), ``feature_strides`` (same order),
    ``input_size`` (``(min_size, max_size)`` of the resize the model was designed for, None = any
    size), ``fixed_size`` (``(h, w)`` when that resize ignores the aspect ratio, as SSD's does),
    ``size_divisible`` and ``dense`` (``outputs["out"]`` is a per-anchor class-logit map).

    Optional: ``decode_boxes(outputs) -> Tensor [B, A, 4]``, the box of every anchor/point as ``x1, y1,
    x2, y2`` in input pixels, decoded from ``outputs["box"]`` (and differentiable with respect to it) as
    the detector's own post-processing decodes before thresholding (``dense_kd`` with ``box: giou``
    reads it). Dense detectors define it; it is None where the detector cannot decode per anchor.
    """

    num_classes: int
    feature_taps: list[str]
    feature_strides: list[int]
    input_size: tuple[int, int] | None = None
    fixed_size: tuple[int, int] | None = None
    size_divisible: int = 1
    dense: bool = True
    decode_boxes: Callable[[dict[str, Tensor]], Tensor] | None = None

    def _init_levels(self, names: Sequence[str], strides: Sequence[int]) -> None:
        """Create ``levels.<name>`` identity modules (the tap points) and the tap attributes."""
        self.levels = nn.ModuleDict({name: nn.Identity() for name in names})
        self.feature_taps = [f"{LEVELS}.{name}" for name in names]
        self.feature_strides = [int(s) for s in strides]

    @property
    def level_names(self) -> list[str]:
        return list(self.levels.keys())

    def route(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Pass each FPN level through its identity module, so forward hooks on ``levels.*`` fire."""
        return [module(f) for module, f in zip(self.levels.values(), features, strict=True)]

    def level_sizes(self, outputs: dict[str, Tensor]) -> list[tuple[int, int]]:
        """(h, w) of every level for the outputs' image size: ``ceil(H / stride)`` (stride-2 convs and
        pools with "same" padding round up)."""
        height, width = (int(v) for v in outputs["image_size"])
        return [(math.ceil(height / s), math.ceil(width / s)) for s in self.feature_strides]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def losses(self, outputs: dict[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def detect(
        self, outputs: dict[str, Tensor], score_thresh: float | None = None
    ) -> list[dict[str, Tensor]]:
        raise NotImplementedError


def image_size(x: Tensor) -> Tensor:
    """``[H, W]`` of a batch as a long tensor (the ``"image_size"`` output)."""
    return torch.tensor(x.shape[-2:], dtype=torch.long, device=x.device)


def image_list(outputs: dict[str, Tensor], batch: int, like: Tensor) -> ImageList:
    """torchvision's ``ImageList`` for ``batch`` images of the outputs' size; anchor generators read only
    its shape, so the tensor holds no data (``[B, 0, H, W]``)."""
    height, width = (int(v) for v in outputs["image_size"])
    empty = like.new_empty((batch, 0, height, width))
    return ImageList(empty, [(height, width)] * batch)


def torchvision_targets(
    targets: Tensor | Sequence[Tensor], label_offset: int = 0, device: torch.device | None = None
) -> list[dict[str, Tensor]]:
    """Padded targets ``[B, M, 5]`` (or a list of ``[n, 5]``) -> torchvision's ``[{"boxes", "labels"}]``.

    Padding rows (``cls < 0``) are dropped; ``label_offset`` is added to the classes (1 for models
    whose class 0 is the background: Faster R-CNN, SSD); ``device``: where the outputs are.
    """
    if isinstance(targets, Tensor) and (targets.dim() != 3 or targets.shape[-1] != 5):
        raise KdkitError(
            f"detection targets must be [B, M, 5] rows (x1, y1, x2, y2, cls), got {tuple(targets.shape)}; "
            "pad per-image targets with kdkit.data.det_base.pad_targets"
        )
    converted = []
    for target in targets:
        target = target.reshape(-1, 5).to(device) if device is not None else target.reshape(-1, 5)
        valid = target[target[:, 4] >= 0]
        converted.append({"boxes": valid[:, :4].float(), "labels": valid[:, 4].round().long() + label_offset})
    return converted


def shift_labels(detections: list[dict[str, Tensor]], offset: int) -> list[dict[str, Tensor]]:
    """The detections with ``offset`` subtracted from the labels (back to 0-based foreground classes)."""
    if offset == 0:
        return detections
    return [{**d, "labels": d["labels"] - offset} for d in detections]


@contextmanager
def overridden(obj: Any, **values: Any) -> Iterator[None]:
    """Set attributes of ``obj`` for the duration of the block (a threshold, a module's own ``training``
    flag that selects torchvision's branch; children keep theirs), then restore them."""
    old = {name: getattr(obj, name) for name in values}
    try:
        for name, value in values.items():
            setattr(obj, name, value)
        yield
    finally:
        for name, value in old.items():
            setattr(obj, name, value)


def resized_size(model: Detector, size: tuple[int, int]) -> tuple[int, int]:
    """The size that the model's own (bypassed) transform would bring an ``size`` image to."""
    if model.fixed_size is not None:
        return tuple(model.fixed_size)
    if model.input_size is None:
        return size
    min_size, max_size = model.input_size
    height, width = size
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return round(height * scale), round(width * scale)


def check_input_sizes(student: nn.Module, teacher: nn.Module | None, data_size: Sequence[int] | None) -> None:
    """Raise a one-line :class:`KdkitError` when the pair cannot train on images of ``data_size``.

    Both must be :class:`Detector` s; a teacher and a student that declare different ``input_size``
    disagree on the input resolution; and images of ``data_size`` (``(h, w)``, None = unknown) must
    divide by each model's ``size_divisible`` and be what its own transform would resize them to.
    """
    models = [("student", student)] + ([("teacher", teacher)] if teacher is not None else [])
    for who, model in models:
        if not isinstance(model, Detector):
            raise KdkitError(
                f"task 'detection' needs a detector as {who}, got {type(model).__name__}; "
                "`kdkit list models` lists them (e.g. det_compact_student, fcos_resnet50_fpn)"
            )
    if teacher is not None and None not in (student.input_size, teacher.input_size):
        if tuple(student.input_size) != tuple(teacher.input_size) or student.fixed_size != teacher.fixed_size:
            raise KdkitError(
                f"teacher and student resize inputs differently (input_size as (min_size, max_size): teacher "
                f"{tuple(teacher.input_size)}, student {tuple(student.input_size)}); "
                "give both models the same min_size and max_size"
            )
    if data_size is None:
        return
    height, width = (int(v) for v in data_size)
    for who, model in models:
        step = model.size_divisible
        if height % step or width % step:
            raise KdkitError(
                f"training images of {height}x{width} do not divide by the {who}'s size_divisible {step}; "
                f"set the augment crop to multiples of {step}"
            )
        wanted = resized_size(model, (height, width))
        if wanted != (height, width):
            option = (
                f"size=[{height}, {width}]"
                if model.fixed_size is not None
                else f"min_size={min(height, width)}, max_size={max(height, width)}"
            )
            raise KdkitError(
                f"the {who} expects inputs resized to {wanted[0]}x{wanted[1]} "
                f"(input_size {model.input_size}), "
                f"not the training images' {height}x{width}; set the augment crop to {wanted[0]}x{wanted[1]} "
                f"or build the model with {option}"
            )
