"""``camvid``: CamVid in the widely used SegNet layout (11 classes), streamed.

Layout: ``<root>/{train,val,test}/<name>.png`` with ``<root>/{trainannot,valannot,testannot}/<name>.png``
holding values 0..10 for the 11 classes and 11 for void, which becomes 255 (default root:
``$KDKIT_CACHE/datasets/camvid``).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import KdkitError
from ..registry import DATASETS
from .base import IGNORE_INDEX, SegmentationDataset, cache_dir, check_split
from .segfolders import MaskedImageDataset, image_files, lookup_table

SPLITS = ("train", "val", "test")
LAYOUT = "<root>/<split>/<name>.png and <root>/<split>annot/<name>.png (split: train/val/test)"
CLASSES = [
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Sidewalk",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
]
VOID = 11


@DATASETS.register("camvid", "CamVid, 11 classes (SegNet layout: <root>/train, <root>/trainannot; set root)")
def camvid(
    split: str,
    root: str | None = None,
    limit: int | None = None,
    resize: list[int] | None = None,
) -> SegmentationDataset:
    """CamVid images with masks in sorted name order; void (11) is mapped to 255."""
    check_split(split, SPLITS, "camvid")
    base = Path(root).expanduser() if root else cache_dir("datasets", "camvid")
    images = base / split
    if not images.is_dir():
        raise KdkitError(f"camvid: no folder {images}; expected {LAYOUT}")
    items = [(p, base / f"{split}annot" / f"{p.stem}.png") for p in image_files(images)]
    return MaskedImageDataset(
        items,
        CLASSES,
        f"'{images}' (expected {LAYOUT})",
        lut=lookup_table({VOID: IGNORE_INDEX}),
        limit=limit,
        resize=resize,
    )
