"""Evaluation: top-1/top-5 accuracy (classification) or mIoU and Spirit Distillation's robustness
figures (segmentation), with the loss; synced across processes."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from ..taps import main_output
from .batches import Batches
from .segmetrics import SegmentationMeter, slide_logits


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: CUDA with bf16 support, or a CPU with AVX512-BF16 or
    AMX. Elsewhere bf16 is emulated and slow (seen here on an AVX2-only CPU: a ResNet-20 training
    step at 11 images/s in bf16 against 72 in fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where the device computes it natively (:func:`native_bf16`), else ``fp32``."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CPU or CUDA when asked, else a no-op context."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Batches,
    prepare,
    num_classes: int,
    device: torch.device,
    precision: str = "fp32",
) -> dict[str, float]:
    """Accuracy (top-1, top-5 in %) and mean cross-entropy of ``model`` over ``batches``.

    ``prepare(images_uint8)`` turns a batch into the model's input (normalise, move, memory format).
    Each process sees a disjoint share of the data; ``compute()`` reduces over processes.
    """
    top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro").to(device)
    top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro").to(device)
    loss = MeanMetric().to(device)
    was_training = model.training
    model.eval()
    try:
        for images, labels in batches.epoch():
            labels = labels.to(device)
            with autocast(device, precision):
                logits = main_output(model(prepare(images))).float()
            top1.update(logits, labels)
            top5.update(logits, labels)
            loss.update(F.cross_entropy(logits, labels), weight=labels.numel())
    finally:
        model.train(was_training)
    return {
        "top1": 100.0 * top1.compute().item(),
        "top5": 100.0 * top5.compute().item(),
        "loss": loss.compute().item(),
    }


def _dense_logits(model: nn.Module, x: Tensor, size: tuple[int, int], config, num_classes: int) -> Tensor:
    """Score maps of one batch at the mask's ``size``: whole-image or sliding-window inference."""
    if config.mode == "slide":
        crop = tuple(config.crop)
        stride = tuple(config.stride) if config.stride else tuple(max(1, c * 2 // 3) for c in crop)
        logits = slide_logits(lambda t: main_output(model(t)), x, num_classes, crop, stride)
    else:
        logits = main_output(model(x))
    logits = logits.float()
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module,
    batches: Batches,
    prepare,
    num_classes: int,
    device: torch.device,
    precision: str,
    config,
    ignore_index: int = 255,
) -> dict[str, Any]:
    """mIoU, per-class IoU, pixel accuracy, per-image mIoU with its variance and HP-Acc, and the mean
    pixel cross-entropy of ``model`` (see :class:`~kdkit.engine.segmetrics.SegmentationMeter`).

    ``config`` is an :class:`~kdkit.config.EvalConfig` (whole or sliding-window inference). Batches of
    differently sized images (lists) are run one image at a time.
    """
    meter = SegmentationMeter(num_classes, ignore_index=ignore_index, hp_threshold=config.hp_threshold)
    loss = MeanMetric().to(device)
    was_training = model.training
    model.eval()
    try:
        for images, masks in batches.epoch():
            groups = zip(images, masks) if isinstance(images, list) else [(images, masks)]
            for image, mask in groups:
                image = image if image.dim() == 4 else image[None]
                mask = (mask if mask.dim() == 3 else mask[None]).to(device).long()
                with autocast(device, precision):
                    logits = _dense_logits(model, prepare(image), tuple(mask.shape[-2:]), config, num_classes)
                meter.update(logits, mask)
                valid = int((mask != ignore_index).sum())
                if valid:
                    ce = F.cross_entropy(logits, mask, ignore_index=ignore_index)
                    loss.update(ce, weight=valid)
    finally:
        model.train(was_training)
    return {**meter.compute(), "loss": loss.compute().item()}
