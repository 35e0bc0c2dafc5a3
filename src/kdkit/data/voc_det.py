"""``voc_detection``: Pascal VOC object detection in its on-disk layout, streamed.

Layout: ``<root>/Annotations/<id>.xml``, ``<root>/JPEGImages/<id>.jpg`` and
``<root>/ImageSets/Main/<split>.txt`` (splits train/val/trainval/test), with ``root`` a ``VOC2007`` or
``VOC2012`` folder or a parent holding ``VOCdevkit/VOC2012`` (else ``VOCdevkit/VOC2007``); default root
``$KDKIT_CACHE/datasets``.

The 20 VOC classes (no background), ids 0..19 in the usual alphabetical order. VOC boxes are 1-based
inclusive pixel indices; ``xmin = 1, xmax = W`` covers the whole image, so ``(xmin - 1, ymin - 1, xmax,
ymax)`` are the box's edges in kdkit's pixel coordinates (as detectron2 reads VOC). Objects marked
``difficult`` are skipped unless ``keep_difficult`` (the VOC evaluation ignores them).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from ..errors import KdkitError
from ..registry import DATASETS
from .base import IMAGENET_MEAN, IMAGENET_STD, Stats, cache_dir, check_split
from .det_base import DetectionDataset, FileDetectionDataset

SPLITS = ("train", "val", "trainval", "test")
LAYOUT = (
    "<root>/Annotations/<id>.xml, <root>/JPEGImages/<id>.jpg and <root>/ImageSets/Main/<split>.txt, "
    "with root a VOC2007/VOC2012 folder or a parent of VOCdevkit/VOC2012 or VOCdevkit/VOC2007"
)
CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip


def voc_det_folder(base: Path) -> Path:
    """The VOC year folder: ``base`` itself or ``base/VOCdevkit/VOC2012`` (else ``VOC2007``)."""
    for folder in (base, base / "VOCdevkit" / "VOC2012", base / "VOCdevkit" / "VOC2007"):
        if (folder / "Annotations").is_dir():
            return folder
    raise KdkitError(
        f"voc_detection: no Annotations folder in {base} or {base / 'VOCdevkit'}/VOC20xx; expected {LAYOUT}"
    )


def read_annotation(path: Path, keep_difficult: bool = False) -> torch.Tensor:
    """The boxes of one VOC xml as float32 ``[n,5]`` ``(x1, y1, x2, y2, cls)``."""
    try:
        root = ET.parse(path).getroot()
        rows = []
        for obj in root.iter("object"):
            name = (obj.findtext("name") or "").strip()
            if name not in CLASSES:
                raise KdkitError(
                    f"voc_detection: {path} has an object '{name}', not one of the 20 VOC classes"
                )
            if not keep_difficult and (obj.findtext("difficult") or "0").strip() == "1":
                continue
            box = obj.find("bndbox")
            if box is None:
                raise KdkitError(f"voc_detection: {path} has an object '{name}' without a bndbox")
            x1, y1, x2, y2 = (float(box.findtext(k) or "nan") for k in ("xmin", "ymin", "xmax", "ymax"))
            rows.append([x1 - 1, y1 - 1, x2, y2, CLASSES.index(name)])
    except (ET.ParseError, ValueError) as e:
        raise KdkitError(f"voc_detection: cannot read {path} ({e}); fix or remove the file") from None
    target = torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)
    if target[:, :4].isnan().any():
        raise KdkitError(f"voc_detection: {path} has a bndbox without xmin/ymin/xmax/ymax")
    return target


@DATASETS.register("voc_detection", "Pascal VOC detection, 20 classes: Annotations/, JPEGImages/ (set root)")
def voc_detection(
    split: str,
    root: str | None = None,
    keep_difficult: bool = False,
    limit: int | None = None,
    mean: Stats = IMAGENET_MEAN,
    std: Stats = IMAGENET_STD,
) -> DetectionDataset:
    """VOC images with their boxes, in sorted id order; ``difficult`` objects skipped unless kept."""
    check_split(split, SPLITS, "voc_detection")
    folder = voc_det_folder(Path(root).expanduser() if root else cache_dir("datasets"))
    list_file = folder / "ImageSets" / "Main" / f"{split}.txt"
    if not list_file.is_file():
        raise KdkitError(f"voc_detection: no split file {list_file}; expected {LAYOUT}")
    ids = sorted({line.split()[0] for line in list_file.read_text().splitlines() if line.strip()})[:limit]
    items = []
    for image_id in ids:
        image, xml = folder / "JPEGImages" / f"{image_id}.jpg", folder / "Annotations" / f"{image_id}.xml"
        for path in (image, xml):
            if not path.is_file():
                raise KdkitError(f"voc_detection: {list_file} lists '{image_id}' but {path} does not exist")
        items.append((image, read_annotation(xml, keep_difficult)))
    return FileDetectionDataset(items, CLASSES, f"{list_file} (it lists no ids)", mean, std, limit)
