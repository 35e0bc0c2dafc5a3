"""Streaming segmentation datasets read from folders: shared helpers and two generic layouts.

``segmentation_folder``: ``<root>/images/<split>/<name>.{png,jpg,jpeg,bmp,webp}`` with
``<root>/masks/<split>/<name>.png`` (single-channel class indices, 255 = ignore) and
``<root>/classes.txt`` (one class name per line); splits train/val/test.

``unlabeled_folder``: every image under ``<root>/<split>`` (or ``<root>`` when it has no split
folders), searched recursively; masks are all 255. Such images only serve as distillation
material (proximity domains, style sources).

Every builder here and in the dataset-specific modules accepts ``limit`` (keep the first N items
of the sorted file list) and ``resize`` (``[H, W]``: bilinear, antialiased image and nearest
mask, applied on load). Images are decoded on access, so a split's images may differ in size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..errors import KdkitError
from ..registry import DATASETS
from .base import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, SegmentationDataset, Stats, check_split
from .folders import EXTENSIONS, load_image

SPLITS = ("train", "val", "test")
FOLDER_LAYOUT = (
    "<root>/images/<split>/<name>.png|jpg, <root>/masks/<split>/<name>.png and <root>/classes.txt "
    "(split: train/val/test)"
)
UNLABELED_LAYOUT = "<root>/<split>/**/*.png|jpg or <root>/**/*.png|jpg"

Item = tuple[Path, Path | None]


def load_mask(path: Path) -> Tensor:
    """Raw values of a palette ("P") or grayscale PNG as uint8 ``[H,W]`` (palettes are not applied)."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise KdkitError(
                    f"mask {path} has mode {im.mode}; expected a single-channel (palette or 8-bit grayscale) "
                    "PNG of class indices"
                )
            array = np.asarray(im, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as e:
        raise KdkitError(f"cannot read mask {path} ({e}); remove or fix the file") from None
    return torch.from_numpy(array.copy())


def lookup_table(mapping: dict[int, int]) -> Tensor:
    """uint8 ``[256]`` table sending raw mask value ``k`` (taken mod 256, so -1 is 255) to ``mapping[k]``.

    Values not in ``mapping`` are kept as they are (and then rejected unless they are a class id).
    """
    lut = torch.arange(256, dtype=torch.uint8)
    for raw, mapped in mapping.items():
        lut[raw % 256] = mapped
    return lut


def image_files(folder: Path, recursive: bool = False) -> list[Path]:
    """Sorted image files (by extension) in ``folder``, or under it when ``recursive``."""
    found = folder.rglob("*") if recursive else folder.glob("*")
    return sorted(p for p in found if p.suffix.lower() in EXTENSIONS and p.is_file())


class MaskedImageDataset(SegmentationDataset):
    """Decodes ``(image, mask)`` files on access; a missing mask path (None) gives an all-255 mask.

    ``lut`` (uint8 ``[256]``) maps raw mask values to class ids; afterwards every value must be a
    class id or 255. ``limit`` keeps the first N items; ``resize`` is ``[H, W]``. ``source``
    describes where the items came from, for the error about an empty split.
    """

    def __init__(
        self,
        items: Sequence[Item],
        classes: list[str],
        source: str,
        mean: Stats = IMAGENET_MEAN,
        std: Stats = IMAGENET_STD,
        lut: Tensor | None = None,
        limit: int | None = None,
        resize: Sequence[int] | None = None,
    ) -> None:
        super().__init__(classes, mean, std)
        if limit is not None and limit < 1:
            raise KdkitError(f"limit must be a positive number of images, got {limit}")
        if resize is not None and (len(resize) != 2 or min(resize) < 1):
            raise KdkitError(f"resize must be [height, width] in pixels, got {list(resize)}")
        items = list(items)[:limit]
        if not items:
            raise KdkitError(f"no images in {source}")
        for image, mask in items:
            if mask is not None and not mask.is_file():
                raise KdkitError(f"image {image} has no mask: expected {mask}")
        if lut is not None and (lut.dtype != torch.uint8 or lut.shape != (256,)):
            raise ValueError(f"lut must be uint8 [256], got {lut.dtype} {tuple(lut.shape)}")
        self.items = items
        self.lut = lut
        self.resize = None if resize is None else (int(resize[0]), int(resize[1]))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        image_path, mask_path = self.items[index]
        image = load_image(image_path)
        size = tuple(image.shape[1:])
        if mask_path is None:
            mask = torch.full(size, IGNORE_INDEX, dtype=torch.uint8)
        else:
            mask = self._read_mask(mask_path, size)
        if self.resize is not None and size != self.resize:
            image = F.interpolate(image[None].float(), self.resize, mode="bilinear", antialias=True)
            image = image[0].round_().clamp_(0, 255).to(torch.uint8)
            mask = F.interpolate(mask[None, None].float(), self.resize, mode="nearest-exact")
            mask = mask[0, 0].to(torch.uint8)
        return image, mask

    def _read_mask(self, path: Path, size: tuple[int, ...]) -> Tensor:
        raw = load_mask(path)
        if tuple(raw.shape) != size:
            raise KdkitError(
                f"mask {path} is {raw.shape[0]}x{raw.shape[1]} (HxW) but its image is {size[0]}x{size[1]}; "
                "masks must match their images"
            )
        mask = raw if self.lut is None else self.lut[raw.long()]
        bad = (mask >= self.num_classes) & (mask != IGNORE_INDEX)
        if bad.any():
            value = int(raw[bad][0])
            raise KdkitError(
                f"mask {path} holds value {value}, which is neither one of the {self.num_classes} classes "
                f"nor {IGNORE_INDEX} (ignore); fix the mask"
            )
        return mask


@DATASETS.register(
    "segmentation_folder", "your masks: <root>/images/<split>/*, <root>/masks/<split>/*.png (set root)"
)
def segmentation_folder(
    split: str,
    root: str | None = None,
    limit: int | None = None,
    resize: list[int] | None = None,
    mean: Stats = IMAGENET_MEAN,
    std: Stats = IMAGENET_STD,
) -> SegmentationDataset:
    """Images with single-channel index masks and a ``classes.txt``; mean/std default to ImageNet's."""
    check_split(split, SPLITS, "segmentation_folder")
    if root is None:
        raise KdkitError(f"segmentation_folder needs root (the folder laid out as {FOLDER_LAYOUT})")
    base = Path(root).expanduser()
    classes_file = base / "classes.txt"
    if not classes_file.is_file():
        raise KdkitError(f"segmentation folder has no {classes_file}; expected {FOLDER_LAYOUT}")
    classes = [line.strip() for line in classes_file.read_text().splitlines() if line.strip()]
    if not classes:
        raise KdkitError(f"{classes_file} lists no classes; write one class name per line")
    images = base / "images" / split
    if not images.is_dir():
        raise KdkitError(f"segmentation folder has no {images}; expected {FOLDER_LAYOUT}")
    items = [(p, base / "masks" / split / f"{p.stem}.png") for p in image_files(images)]
    return MaskedImageDataset(
        items, classes, f"'{images}' (expected {FOLDER_LAYOUT})", mean, std, limit=limit, resize=resize
    )


@DATASETS.register("unlabeled_folder", "unlabeled images (all-ignore masks) for distillation (set root)")
def unlabeled_folder(
    split: str,
    root: str | None = None,
    classes: list[str] | None = None,
    limit: int | None = None,
    resize: list[int] | None = None,
    mean: Stats = IMAGENET_MEAN,
    std: Stats = IMAGENET_STD,
) -> SegmentationDataset:
    """Every image under ``<root>/<split>`` (or ``<root>``), with masks of 255.

    ``classes`` are the class names to report (default none). mean/std default to ImageNet's.
    """
    check_split(split, SPLITS, "unlabeled_folder")
    if root is None:
        raise KdkitError(f"unlabeled_folder needs root (the folder laid out as {UNLABELED_LAYOUT})")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise KdkitError(f"image folder '{base}' does not exist; expected {UNLABELED_LAYOUT}")
    present = [s for s in SPLITS if (base / s).is_dir()]
    if present and split not in present:
        raise KdkitError(f"image folder '{base}' has no '{split}' folder (found: {', '.join(present)})")
    folder = base / split if present else base
    items = [(p, None) for p in image_files(folder, recursive=True)]
    return MaskedImageDataset(
        items,
        list(classes or []),
        f"'{folder}' ({', '.join(sorted(EXTENSIONS))}, searched recursively)",
        mean,
        std,
        limit=limit,
        resize=resize,
    )
