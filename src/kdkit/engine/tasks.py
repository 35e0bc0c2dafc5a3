"""What differs between tasks: training augmentation, evaluation, and the headline metric.

The trainer holds one task object and never branches on the task itself. Classification batches
are ``(images, class ids)``; segmentation batches are ``(images, masks)`` with ignore index 255;
detection batches are ``(images, targets [B, M, 5])`` (``x1, y1, x2, y2, class``, class -1 = padding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..config import AugmentConfig, EvalConfig
from ..data.augment import BatchAugment
from ..data.decode import DecodeAugment
from ..data.det_augment import DetectionAugment
from ..data.draws import SampleKeys
from ..data.mixup import Mixup
from ..data.seg_augment import SegmentationAugment
from ..errors import KdkitError
from .batches import Batches
from .detmetrics import evaluate_detection
from .evaluate import evaluate, evaluate_segmentation

Augmenter = Callable[[Any, Any, SampleKeys], tuple[Tensor, Tensor]]
"""``(images, labels, keys) -> (normalised float images, labels)``: one batch, each sample augmented with
its own stream (:mod:`kdkit.data.draws`)."""

# ``miou`` is the dataset mIoU (one confusion matrix over all images); ``miou_per_image`` the mean of
# per-image mIoUs (Spirit Distillation Eq. 5). Labels keep them apart wherever a figure is printed.
METRIC_LABELS = {
    "top1": "top-1 (%)",
    "miou": "mIoU (%)",
    "miou_per_image": "per-image mIoU (%, Eq. 5)",
    "map": "mAP (%)",
}


class ClassificationTask:
    name = "classification"
    metric = "top1"

    def __init__(self, num_classes: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.num_classes, self.mean, self.std = num_classes, tuple(mean), tuple(std)

    def augmenter(self, config: AugmentConfig) -> Augmenter:
        """The batch step: padded crop + flip, or only normalisation when a random-resized crop at
        decode time (:meth:`decoder`) has already cropped and flipped each image."""
        decoded = config.resized_crop is not None
        augment = BatchAugment(
            0 if decoded else config.crop_padding, config.flip and not decoded, self.mean, self.std
        )

        def apply(images: Tensor, labels: Tensor, keys: SampleKeys):
            return augment(images, keys), labels

        return apply

    def decoder(self, config: AugmentConfig) -> DecodeAugment | None:
        """The augmentation applied to each image as it is decoded, if the config asks for one."""
        return DecodeAugment(config) if config.at_decode else None

    def mixer(self, config: AugmentConfig) -> Mixup | None:
        """Mixup/CutMix of training images with per-sample partners, if the config asks for it."""
        return None if config.mixup is None else Mixup(self.num_classes, **config.mixup.model_dump())

    def evaluate(
        self, model: nn.Module, batches: Batches, prepare, device: torch.device, precision: str
    ) -> dict[str, Any]:
        return evaluate(model, batches, prepare, self.num_classes, device, precision)

    def check_models(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Raise when the models cannot be trained together on this task. Default: nothing to check."""


class SegmentationTask(ClassificationTask):
    """Segmentation: joint image/mask augmentation and :func:`evaluate_segmentation`. The headline
    ``metric`` is ``evaluation.metric``: ``miou`` (dataset mIoU, default) or ``miou_per_image``
    (Spirit Distillation Eq. 5); eval records always carry both."""

    name = "segmentation"
    metric = "miou"

    def __init__(
        self,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        evaluation: EvalConfig | None = None,
        ignore_index: int = 255,
    ) -> None:
        super().__init__(num_classes, mean, std)
        self.evaluation = evaluation or EvalConfig()
        self.metric = self.evaluation.metric
        self.ignore_index = ignore_index

    def decoder(self, config: AugmentConfig) -> None:
        """None: refuses the classification-only options (decode-time augmentation, mixup)."""
        if config.at_decode or config.mixup is not None:
            raise KdkitError(
                f"data.augment.resized_crop, color_jitter, randaugment and mixup are classification "
                f"options; remove them from this {self.name} run"
            )

    mixer = decoder

    def augmenter(self, config: AugmentConfig) -> Augmenter:
        # (images, masks, keys) -> batch: already the Augmenter signature
        return SegmentationAugment(config.scale, config.crop, config.flip, self.mean, self.std)

    def evaluate(
        self, model: nn.Module, batches: Batches, prepare, device: torch.device, precision: str
    ) -> dict[str, Any]:
        return evaluate_segmentation(
            model, batches, prepare, self.num_classes, device, precision, self.evaluation, self.ignore_index
        )


class DetectionTask(ClassificationTask):
    """Detection: :class:`~kdkit.data.det_augment.DetectionAugment` (boxes move with the image, boxes that
    leave it are dropped) and COCO mAP (:func:`~kdkit.engine.detmetrics.evaluate_detection`); the models
    are :class:`~kdkit.models.detection.base.Detector` s. ``size``: the training/evaluation input size
    (the augment section's ``crop``) that differently sized images are letterboxed to."""

    name = "detection"
    metric = "map"
    decoder = SegmentationTask.decoder
    mixer = SegmentationTask.mixer

    def __init__(
        self,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(num_classes, mean, std)
        self.size = tuple(size) if size is not None else None

    def augmenter(self, config: AugmentConfig) -> Augmenter:
        crop = tuple(config.crop) if config.crop is not None else self.size
        return DetectionAugment(crop, config.scale, config.flip, self.mean, self.std)

    def evaluate(
        self, model: nn.Module, batches: Batches, prepare, device: torch.device, precision: str
    ) -> dict[str, Any]:
        return evaluate_detection(model, batches, prepare, device, precision, self.size)

    def check_models(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Both must be detectors and agree on the input resolution (their internal transforms')."""
        from ..models.detection.base import check_input_sizes

        check_input_sizes(student, teacher, self.size)


def build_task(
    name: str, dataset: Any, evaluation: EvalConfig | None = None, size: Sequence[int] | None = None
) -> ClassificationTask:
    """The task object for a run, checking that the dataset provides that task's labels."""
    kind = getattr(dataset, "task", "classification")
    if kind != name:
        raise KdkitError(
            f"task '{name}' needs a {name} dataset, but the training data is a {kind} dataset; "
            f"set task: {kind} or pick a {name} dataset (kdkit list datasets)"
        )
    if name == "segmentation":
        return SegmentationTask(
            dataset.num_classes, dataset.mean, dataset.std, evaluation, getattr(dataset, "ignore_index", 255)
        )
    if name == "detection":
        return DetectionTask(dataset.num_classes, dataset.mean, dataset.std, size)
    return ClassificationTask(dataset.num_classes, dataset.mean, dataset.std)
