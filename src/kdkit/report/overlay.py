"""Predicted segmentation masks as pictures: class colours, colour overlays, class coverage."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Cityscapes colours by class name (road_scenes and cityscapes use these names).
NAMED_COLOURS = {
    "road": (128, 64, 128), "sidewalk": (244, 35, 232), "building": (70, 70, 70), "wall": (102, 102, 156),
    "fence": (190, 153, 153), "pole": (153, 153, 153), "traffic_light": (250, 170, 30),
    "traffic light": (250, 170, 30), "traffic_sign": (220, 220, 0), "traffic sign": (220, 220, 0),
    "vegetation": (107, 142, 35), "terrain": (152, 251, 152), "sky": (70, 130, 180), "person": (220, 20, 60),
    "rider": (255, 0, 0), "car": (0, 0, 142), "truck": (0, 0, 70), "bus": (0, 60, 100), "train": (0, 80, 100),
    "motorcycle": (0, 0, 230), "bicycle": (119, 11, 32), "background": (0, 0, 0),
}  # fmt: skip


def indexed_colour(index: int) -> tuple[int, int, int]:
    """The Pascal VOC palette: the bits of ``index`` spread over the high bits of R, G and B."""
    r = g = b = 0
    for shift in range(8):
        r |= ((index >> 0) & 1) << (7 - shift)
        g |= ((index >> 1) & 1) << (7 - shift)
        b |= ((index >> 2) & 1) << (7 - shift)
        index >>= 3
    return r, g, b


def class_colours(classes: Sequence[str]) -> np.ndarray:
    """uint8 ``[len(classes), 3]``: Cityscapes colours for classes named as in Cityscapes, the VOC
    palette (by index) for the others."""
    return np.array(
        [NAMED_COLOURS.get(name.lower(), indexed_colour(i)) for i, name in enumerate(classes)], np.uint8
    ).reshape(-1, 3)


def coverage(mask: torch.Tensor, classes: Sequence[str]) -> list[tuple[str, float]]:
    """(class name, share of the pixels) for every class present in ``mask``, largest first."""
    counts = torch.bincount(mask.flatten().long(), minlength=len(classes)).double()
    shares = counts / counts.sum()
    order = torch.argsort(shares, descending=True, stable=True).tolist()
    return [(classes[i], float(shares[i])) for i in order if counts[i] > 0]


def write_overlay(
    image: torch.Tensor, mask: torch.Tensor, colours: np.ndarray, path: Path, alpha: float = 0.5
) -> Path:
    """Save ``image`` (uint8 ``[3,H,W]``) blended with the colours of ``mask`` (``[H,W]`` class ids):
    ``(1 - alpha) * image + alpha * colour``, rounded."""
    picture = image.permute(1, 2, 0).numpy().astype(np.float32)
    painted = colours[mask.numpy()].astype(np.float32)
    blended = np.rint((1 - alpha) * picture + alpha * painted).clip(0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(blended).save(path)
    return path


def write_prediction(
    path: Path,
    image: torch.Tensor,
    scores: torch.Tensor,
    classes: Sequence[str],
    out: Path,
    stems: set[str],
    alpha: float = 0.5,
) -> dict:
    """One segmented image file: ``scores`` (``[1,C,h,w]``) resized (bilinear) to ``image`` (uint8
    ``[3,H,W]``), ``<out>/<stem>_overlay.png`` and ``<out>/<stem>_mask.png`` (class ids as grey levels;
    ``stem`` made unique among ``stems``, which it joins); returns ``{"image", "overlay", "mask",
    "coverage"}``."""
    scores = torch.nn.functional.interpolate(
        scores.float(), size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False
    )
    mask = scores[0].argmax(0).to(torch.uint8)
    stem = path.stem if path.stem not in stems else f"{path.stem}-{len(stems)}"
    stems.add(stem)
    overlay = write_overlay(image, mask, class_colours(classes), out / f"{stem}_overlay.png", alpha)
    mask_path = out / f"{stem}_mask.png"
    Image.fromarray(mask.numpy()).save(mask_path)
    return {"image": path, "overlay": overlay, "mask": mask_path, "coverage": coverage(mask, classes)}
