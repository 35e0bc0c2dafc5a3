"""Evaluation: top-1/top-5 accuracy and loss with torchmetrics (synced across processes)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from ..taps import main_output
from .batches import Batches


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
