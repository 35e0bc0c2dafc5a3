"""Detection evaluation: COCO mAP through torchmetrics' ``MeanAveragePrecision`` (pycocotools backend),
synced across processes by torchmetrics, plus the mean of the detector's own losses."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.detection import MeanAveragePrecision

from ..data.det_augment import letterbox
from ..data.det_base import pad_targets, unpad
from .batches import Batches
from .evaluate import autocast

# torchmetrics' keys, reported in %; the headline is ``map`` (AP averaged over IoU 0.50:0.95)
MAP_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100")


def _as_batches(images: Any, targets: Any, size: tuple[int, int] | None) -> list[tuple[Tensor, Tensor, list]]:
    """``(uint8 images [b,3,h,w], padded targets [b,M,5] in those images' pixels, per-image scale)``
    groups of one eval batch: a stacked batch as it is (scale 1); a list of differently sized images
    letterboxed to ``size`` (boxes scaled with them; dividing by the scale returns to the image's own
    pixels), or one image at a time when no ``size`` is known."""
    if isinstance(images, Tensor) and (size is None or tuple(images.shape[-2:]) == tuple(size)):
        return [(images, targets, [1.0] * len(images))]
    if size is None:
        return [(image[None], pad_targets([unpad(target)]), [1.0]) for image, target in zip(images, targets)]
    boxed = [letterbox(image, size) for image in images]
    scaled = []
    for target, (_, scale) in zip(targets, boxed):
        gt = unpad(target).clone()
        gt[:, :4] *= scale
        scaled.append(gt)
    return [(torch.stack([b[0] for b in boxed]), pad_targets(scaled), [b[1] for b in boxed])]


@torch.no_grad()
def evaluate_detection(
    model: nn.Module,
    batches: Batches,
    prepare,
    device: torch.device,
    precision: str,
    size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """COCO-style AP of ``model`` (a :class:`~kdkit.models.detection.base.Detector`) over ``batches``, in %:
    ``map`` (IoU 0.50:0.95), ``map_50``, ``map_75``, ``map_small/medium/large`` (-1 where the split has no
    box of that size), ``mar_100``; ``loss``: the detector's own losses on the same images (eval mode),
    left out for models without losses (an exported detector).

    Images of differing sizes are letterboxed to ``size`` and their predicted boxes mapped back, so AP is
    measured in each image's own pixels against its unmodified boxes.
    """
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools").to(device)
    loss = MeanMetric().to(device)
    was_training = model.training
    model.eval()
    try:
        for images, targets in batches.epoch():
            for batch, padded, scales in _as_batches(images, targets, size):
                padded = padded.to(device)
                with autocast(device, precision):
                    outputs = model(prepare(batch))
                    losses = model.losses(outputs, padded)
                    found = model.detect(outputs)
                if losses:  # an exported detector's runner has none
                    loss.update(sum(v.float() for v in losses.values()), weight=len(batch))
                preds, truth = [], []
                for det, target, scale in zip(found, padded, scales):
                    gt = unpad(target)
                    preds.append(
                        {
                            "boxes": det["boxes"].float() / scale,
                            "scores": det["scores"].float(),
                            "labels": det["labels"].long(),
                        }
                    )
                    truth.append({"boxes": gt[:, :4] / scale, "labels": gt[:, 4].long()})
                metric.update(preds, truth)
    finally:
        model.train(was_training)
    result = metric.compute()
    out = {key: 100.0 * float(result[key]) if float(result[key]) >= 0 else -1.0 for key in MAP_KEYS}
    return {**out, "loss": loss.compute().item()} if loss.update_count else out
