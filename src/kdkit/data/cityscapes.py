"""``cityscapes``: the fine-annotation split in the official on-disk layout, streamed.

Layout: ``<root>/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` with
``<root>/gtFine/<split>/<city>/<stem>_gtFine_labelIds.png``; splits train/val/test (default root:
``$KDKIT_CACHE/datasets/cityscapes``). Label ids are mapped to the 19 train ids of the official
cityscapesScripts ``labels.py`` table; ids without a train id become 255.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..errors import KdkitError
from ..registry import DATASETS
from .base import IGNORE_INDEX, SegmentationDataset, cache_dir, check_split
from .segfolders import MaskedImageDataset, lookup_table

SPLITS = ("train", "val", "test")
LAYOUT = (
    "<root>/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png and "
    "<root>/gtFine/<split>/<city>/<stem>_gtFine_labelIds.png"
)
LABELS: tuple[tuple[str, int, int], ...] = (
    # (name, label id, train id) as in cityscapesScripts/helpers/labels.py; 255 = ignored
    ("unlabeled", 0, 255),
    ("ego vehicle", 1, 255),
    ("rectification border", 2, 255),
    ("out of roi", 3, 255),
    ("static", 4, 255),
    ("dynamic", 5, 255),
    ("ground", 6, 255),
    ("road", 7, 0),
    ("sidewalk", 8, 1),
    ("parking", 9, 255),
    ("rail track", 10, 255),
    ("building", 11, 2),
    ("wall", 12, 3),
    ("fence", 13, 4),
    ("guard rail", 14, 255),
    ("bridge", 15, 255),
    ("tunnel", 16, 255),
    ("pole", 17, 5),
    ("polegroup", 18, 255),
    ("traffic light", 19, 6),
    ("traffic sign", 20, 7),
    ("vegetation", 21, 8),
    ("terrain", 22, 9),
    ("sky", 23, 10),
    ("person", 24, 11),
    ("rider", 25, 12),
    ("car", 26, 13),
    ("truck", 27, 14),
    ("bus", 28, 15),
    ("caravan", 29, 255),
    ("trailer", 30, 255),
    ("train", 31, 16),
    ("motorcycle", 32, 17),
    ("bicycle", 33, 18),
    ("license plate", -1, 255),  # train id -1 in labels.py
)
LABEL_TO_TRAIN_ID: dict[int, int] = {label_id: train_id for _, label_id, train_id in LABELS}
"""Cityscapes label id -> train id (0..18, or 255 for ids that are not evaluated)."""
CLASSES: list[str] = [
    name for name, _, train_id in sorted(LABELS, key=lambda r: r[2]) if train_id != IGNORE_INDEX
]


def train_id_lut(keep: list[str] | None = None) -> Tensor:
    """uint8 ``[256]`` lookup table from label-id masks to train ids (-1 is read as 255).

    With ``keep`` (train class names), those classes become ids ``1..k`` in that order and every
    other labelled pixel ``0`` (background): Spirit Distillation's road-vs-background task is
    ``keep=["road"]``.
    """
    lut = lookup_table(LABEL_TO_TRAIN_ID)
    if keep is None:
        return lut
    unknown = [name for name in keep if name not in CLASSES]
    if unknown:
        raise KdkitError(f"cityscapes keep: unknown classes {unknown} (classes: {', '.join(CLASSES)})")
    remap = torch.full((256,), IGNORE_INDEX, dtype=torch.uint8)
    remap[: len(CLASSES)] = 0
    for new, name in enumerate(keep, start=1):
        remap[CLASSES.index(name)] = new
    return remap[lut.long()]


@DATASETS.register("cityscapes", "Cityscapes fine annotations, 19 classes (official layout, set root)")
def cityscapes(
    split: str,
    root: str | None = None,
    cities: list[str] | None = None,
    limit: int | None = None,
    resize: list[int] | None = None,
    keep: list[str] | None = None,
) -> SegmentationDataset:
    """Cityscapes images with train-id masks, sorted by city then name.

    ``cities`` keeps only those cities (e.g. ``["aachen"]``); with ``limit`` this gives "the first
    64 Aachen images". ``resize=[512, 1024]`` runs at half resolution. ``keep`` turns the task into
    background + the listed classes (see :func:`train_id_lut`).
    """
    check_split(split, SPLITS, "cityscapes")
    base = Path(root).expanduser() if root else cache_dir("datasets", "cityscapes")
    images = base / "leftImg8bit" / split
    if not images.is_dir():
        raise KdkitError(f"cityscapes: no folder {images}; expected {LAYOUT} (set root to the folder above)")
    present = sorted(d.name for d in images.iterdir() if d.is_dir())
    if cities is not None:
        unknown = [c for c in cities if c not in present]
        if unknown:
            raise KdkitError(
                f"cityscapes {split} has no cities {', '.join(unknown)} "
                f"(found: {', '.join(present) or 'none'})"
            )
        present = sorted(set(cities))
    items = []
    for city in present:
        for path in sorted((images / city).glob("*_leftImg8bit.png")):
            stem = path.name[: -len("_leftImg8bit.png")]
            items.append((path, base / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"))
    return MaskedImageDataset(
        items,
        ["background", *keep] if keep else list(CLASSES),
        f"'{images}' (expected {LAYOUT})",
        lut=train_id_lut(keep),
        limit=limit,
        resize=resize,
    )
