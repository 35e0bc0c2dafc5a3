"""``voc``: Pascal VOC 2012 segmentation in its on-disk layout, streamed.

Layout: ``<root>/JPEGImages/<id>.jpg``, ``<root>/SegmentationClass/<id>.png`` (palette PNG of
class indices, 255 = object boundary, ignored) and ``<root>/ImageSets/Segmentation/<split>.txt``
with splits train/val/trainval. ``root`` is the ``VOC2012`` folder or a parent holding
``VOCdevkit/VOC2012`` (default root: ``$KDKIT_CACHE/datasets``).

``augmented=True`` reads masks from ``SegmentationClassAug/<id>.png`` instead: the SBD-augmented
set (Hariharan et al. 2011) whose ``train`` split is the 10,582 images listed in
``ImageSets/Segmentation/train_aug.txt``; ``val`` stays the official 1,449 images. Those files are
not part of the VOC download and must be added to the ``VOC2012`` folder.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import KdkitError
from ..registry import DATASETS
from .base import SegmentationDataset, cache_dir, check_split
from .segfolders import MaskedImageDataset

SPLITS = ("train", "val", "trainval")
LAYOUT = (
    "<root>/JPEGImages/<id>.jpg, <root>/SegmentationClass/<id>.png and "
    "<root>/ImageSets/Segmentation/<split>.txt, with root the VOC2012 folder or a parent of VOCdevkit/VOC2012"
)
CLASSES = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]


def voc_folder(base: Path) -> Path:
    """The ``VOC2012`` folder: ``base`` itself or ``base/VOCdevkit/VOC2012``."""
    for folder in (base, base / "VOCdevkit" / "VOC2012"):
        if (folder / "JPEGImages").is_dir():
            return folder
    raise KdkitError(
        f"voc: no JPEGImages folder in {base} or {base / 'VOCdevkit' / 'VOC2012'}; expected {LAYOUT}"
    )


@DATASETS.register("voc", "Pascal VOC 2012 segmentation, 21 classes (set root; augmented: SBD 10,582 train)")
def voc(
    split: str,
    root: str | None = None,
    augmented: bool = False,
    limit: int | None = None,
    resize: list[int] | None = None,
) -> SegmentationDataset:
    """VOC 2012 images with index masks, in sorted id order; ``augmented`` uses SegmentationClassAug."""
    check_split(split, SPLITS, "voc")
    folder = voc_folder(Path(root).expanduser() if root else cache_dir("datasets"))
    list_name = "train_aug" if augmented and split == "train" else split
    list_file = folder / "ImageSets" / "Segmentation" / f"{list_name}.txt"
    if not list_file.is_file():
        hint = " (train_aug.txt comes with the SBD-augmented set)" if list_name == "train_aug" else ""
        raise KdkitError(f"voc: no split file {list_file}{hint}; expected {LAYOUT}")
    # a line is an id, or (DeepLab-style train_aug.txt) "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png"
    ids = sorted({Path(line.split()[0]).stem for line in list_file.read_text().splitlines() if line.strip()})
    masks = folder / ("SegmentationClassAug" if augmented else "SegmentationClass")
    items = []
    for image_id in ids:
        image = folder / "JPEGImages" / f"{image_id}.jpg"
        if not image.is_file():
            raise KdkitError(f"voc: {list_file} lists '{image_id}' but {image} does not exist")
        items.append((image, masks / f"{image_id}.png"))
    return MaskedImageDataset(items, CLASSES, f"{list_file} (it lists no ids)", limit=limit, resize=resize)
