"""``coco``: object detection in the COCO layout, read with pycocotools and streamed.

Layout: ``<root>/annotations/instances_<split>.json`` with the images in ``<root>/<split>/`` or
``<root>/images/<split>/``. The split is the json's suffix (``train2017``, ``val2017``, or your own
``train``/``val``); ``train``/``val``/``test`` also find ``instances_<split>2017.json``.

Categories are mapped to contiguous 0-based ids in the order of their COCO ids (COCO's 80 classes
use ids 1..90 with gaps), named from the json. Boxes ``[x, y, w, h]`` become ``(x1, y1, x2, y2)``;
crowd annotations (``iscrowd: 1``) and boxes without area (``w`` or ``h`` <= 0) are skipped. Images
without annotations are kept (empty targets, pure background).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from ..errors import KdkitError
from ..registry import DATASETS
from .base import IMAGENET_MEAN, IMAGENET_STD, Stats, cache_dir
from .det_base import DetectionDataset, FileDetectionDataset

LAYOUT = "<root>/annotations/instances_<split>.json with images in <root>/<split>/ or <root>/images/<split>/"


def _annotation_file(base: Path, split: str) -> tuple[Path, str]:
    """The json of ``split`` and the split name it was found under."""
    names = [split] + ([f"{split}2017"] if split in ("train", "val", "test") else [])
    for name in names:
        path = base / "annotations" / f"instances_{name}.json"
        if path.is_file():
            return path, name
    raise KdkitError(f"coco: no {base / 'annotations' / f'instances_{split}.json'}; expected {LAYOUT}")


@DATASETS.register(
    "coco", "COCO-format detection: <root>/annotations/instances_<split>.json + images (set root)"
)
def coco(
    split: str,
    root: str | None = None,
    limit: int | None = None,
    mean: Stats = IMAGENET_MEAN,
    std: Stats = IMAGENET_STD,
) -> DetectionDataset:
    """A COCO-format split, images in sorted id order (default root: ``$KDKIT_CACHE/datasets/coco``)."""
    from pycocotools.coco import COCO

    base = Path(root).expanduser() if root else cache_dir("datasets", "coco")
    annotations, name = _annotation_file(base, split)
    folder = next((f for f in (base / name, base / "images" / name) if f.is_dir()), None)
    if folder is None:
        raise KdkitError(
            f"coco: no image folder {base / name} or {base / 'images' / name}; expected {LAYOUT}"
        )
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            api = COCO(str(annotations))
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise KdkitError(f"coco: cannot read {annotations} ({type(e).__name__}: {e}); fix the json") from None
    cats = sorted(api.getCatIds())
    if not cats:
        raise KdkitError(f"coco: {annotations} has no categories; it needs a 'categories' list")
    index = {c: i for i, c in enumerate(cats)}
    classes = [api.cats[c]["name"] for c in cats]
    items = []
    for image_id in sorted(api.getImgIds())[:limit]:
        path = folder / api.imgs[image_id]["file_name"]
        if not path.is_file():
            raise KdkitError(f"coco: {annotations} lists image {path.name} but {path} does not exist")
        rows = []
        for ann in api.imgToAnns.get(image_id, []):
            x, y, w, h = (float(v) for v in ann["bbox"])
            if ann.get("iscrowd", 0) or w <= 0 or h <= 0:
                continue
            if ann["category_id"] not in index:
                raise KdkitError(
                    f"coco: {annotations} annotation {ann.get('id')} has category {ann['category_id']}, "
                    "which is not in its 'categories'"
                )
            rows.append([x, y, x + w, y + h, index[ann["category_id"]]])
        items.append((path, torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)))
    return FileDetectionDataset(items, classes, f"{annotations} (it lists no images)", mean, std, limit)
