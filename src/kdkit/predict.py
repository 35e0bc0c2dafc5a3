"""Prediction with an exported student (part of the Python API, re-exported by :mod:`kdkit.api`):
the classes of image files, their segmentation (overlay and mask PNGs), or their detections (boxes
drawn on the image, and a JSON list)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import KdkitError


def _prediction_input(path: Path, spec: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(the image as decoded, uint8 ``[3,H,W]``; the model's input batch ``[1,3,h,w]``, normalised):
    segmentation students see the image resized to their training image size when the spec has one."""
    from .data.augment import BatchAugment
    from .data.folders import load_image

    image = load_image(path)
    x = image[None].float() / 255
    if spec.image_size and tuple(spec.image_size) != tuple(image.shape[-2:]):
        x = torch.nn.functional.interpolate(
            x, size=tuple(spec.image_size), mode="bilinear", align_corners=False
        )
    return image, BatchAugment(0, False, spec.mean, spec.std).normalize(x)


@torch.no_grad()
def student_task(run: str | Path) -> str:
    """``"classification"``, ``"segmentation"`` or ``"detection"``: what an exported student predicts (its
    spec says so; older specs are told apart by the shape of the output, class scores per image or per
    pixel)."""
    from .deploy.export import load_student
    from .taps import main_output

    model, spec = load_student(run)
    if spec.task in ("segmentation", "detection"):
        return spec.task
    size = tuple(spec.image_size) if spec.image_size else (64, 64)
    out = main_output(model(torch.zeros(1, 3, *size)))
    return "segmentation" if out.dim() == 4 else "classification"


@torch.no_grad()
def predict_images(
    run: str | Path, images: Sequence[str | Path], top: int = 3
) -> list[list[tuple[str, float]]]:
    """The ``top`` most probable classes of each image file, as (class name, probability) pairs
    (classification students; :func:`predict_masks` segments images)."""
    from .data.augment import BatchAugment
    from .data.folders import load_image
    from .deploy.export import load_student
    from .taps import main_output

    model, spec = load_student(run)
    size = spec.image_size
    batch = torch.stack([load_image(Path(p), size[0] if size else None) for p in images])
    out = main_output(model(BatchAugment(0, False, spec.mean, spec.std).normalize(batch)))
    if out.dim() != 2:
        raise KdkitError(f"{run} holds a segmentation student: use predict_masks (kdkit predict --out DIR)")
    probs = out.softmax(1)
    names = spec.classes or [str(i) for i in range(spec.num_classes)]
    values, indices = probs.topk(min(top, probs.shape[1]), dim=1)
    ranked = zip(values.tolist(), indices.tolist())
    return [[(names[i], float(v)) for v, i in zip(vs, ix)] for vs, ix in ranked]


@torch.no_grad()
def predict_masks(
    run: str | Path, images: Sequence[str | Path], out: str | Path, alpha: float = 0.5
) -> list[dict[str, Any]]:
    """Segment image files with an exported segmentation student.

    Each image is resized to the student's training image size (when its spec has one), segmented,
    and the per-pixel class scores are resized back (bilinear) to the image's own size. Writes
    ``<out>/<stem>_overlay.png`` (the image blended with the class colours, weight ``alpha``) and
    ``<out>/<stem>_mask.png`` (class ids as 8-bit grey levels); returns per image
    ``{"image", "overlay", "mask", "coverage": [(class, pixel share), ...] largest first}``.
    """
    from .deploy.export import load_student
    from .report.overlay import write_prediction
    from .taps import main_output

    model, spec = load_student(run)
    names = spec.classes or [str(i) for i in range(spec.num_classes)]
    results: list[dict[str, Any]] = []
    stems: set[str] = set()
    for path in map(Path, images):
        image, x = _prediction_input(path, spec)
        scores = main_output(model(x))
        if scores.dim() != 4:
            raise KdkitError(
                f"{run} holds a classification student: kdkit predict names classes without --out"
            )
        results.append(write_prediction(path, image, scores, names, Path(out), stems, alpha))
    return results


@torch.no_grad()
def predict_boxes(
    run: str | Path, images: Sequence[str | Path], out: str | Path, min_score: float = 0.3
) -> list[dict[str, Any]]:
    """Detect objects in image files with an exported detection student.

    Each image is letterboxed to the student's training input size, detected, and the boxes scaled
    back to the image's own pixels. Writes ``<out>/<stem>_boxes.png`` (boxes scoring at least
    ``min_score`` drawn on the image) and ``<out>/detections.json``; returns per image ``{"image",
    "drawn", "detections": [{"class", "score", "box": [x1, y1, x2, y2]}, ...] best first}``.
    """
    from .data.augment import BatchAugment
    from .deploy.detection import predict_detections
    from .deploy.export import load_student

    model, spec = load_student(run)
    if spec.task != "detection":
        raise KdkitError(f"{run} holds a {spec.task} student, not a detector: kdkit predict without boxes")
    names = spec.classes or [str(i) for i in range(spec.num_classes)]
    normalize = BatchAugment(0, False, spec.mean, spec.std).normalize
    return predict_detections(
        model.eval(), [Path(p) for p in images], spec.image_size, names, Path(out), min_score, normalize
    )
