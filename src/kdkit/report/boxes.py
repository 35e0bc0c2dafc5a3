"""Detections as pictures: boxes drawn on images (torchvision's ``draw_bounding_boxes``) in the class
colours of :mod:`kdkit.report.overlay`, and a grid of predictions next to the ground truth."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, make_grid

from .overlay import class_colours


def draw_boxes(
    image: Tensor,
    boxes: Tensor,
    labels: Tensor,
    classes: Sequence[str],
    scores: Tensor | None = None,
    width: int = 1,
    captions: bool = True,
) -> Tensor:
    """``image`` (uint8 ``[3,H,W]``) with ``boxes`` (``[n,4]`` xyxy pixels) outlined in their class
    colour, captioned ``class score`` (or ``class``) when ``captions``; uint8 ``[3,H,W]``."""
    if not len(boxes):
        return image.cpu()
    colours = class_colours(classes)
    ids = labels.long().tolist()
    names = [classes[i] if 0 <= i < len(classes) else str(i) for i in ids]
    if scores is not None:
        names = [f"{n} {s:.2f}" for n, s in zip(names, scores.tolist())]
    return draw_bounding_boxes(
        image.cpu(),
        boxes.detach().float().cpu(),
        labels=names if captions else None,
        colors=[tuple(int(c) for c in colours[i % len(colours)]) for i in ids],
        width=width,
    )


def save_png(image: Tensor, path: Path) -> Path:
    """Write a uint8 ``[3,H,W]`` image as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy())).save(path)
    return path


def detection_grid(
    images: Tensor,
    predictions: Sequence[dict[str, Tensor]],
    targets: Sequence[Tensor],
    classes: Sequence[str],
    path: Path,
    upscale: int = 2,
    min_score: float = 0.3,
) -> Path:
    """A PNG with one column per image: the ground-truth boxes on top, the predictions scoring at least
    ``min_score`` below (``targets``: ``[n,5]`` rows ``x1, y1, x2, y2, class``). Small images are
    upscaled ``upscale`` times (nearest) so boxes stay readable."""
    tiles = []
    for image, target in zip(images, targets):
        big = image.repeat_interleave(upscale, -1).repeat_interleave(upscale, -2)
        tiles.append(draw_boxes(big, target[:, :4] * upscale, target[:, 4], classes, captions=False))
    for image, pred in zip(images, predictions):
        big = image.repeat_interleave(upscale, -1).repeat_interleave(upscale, -2)
        keep = pred["scores"] >= min_score
        boxes, labels, scores = pred["boxes"][keep] * upscale, pred["labels"][keep], pred["scores"][keep]
        tiles.append(draw_boxes(big, boxes, labels, classes, scores))
    grid = make_grid(torch.stack(tiles), nrow=len(images), padding=2, pad_value=255)
    return save_png(grid, path)
