"""``road_boxes``: the road scenes (:mod:`kdkit.data.road_scenes`) as an object-detection set.

Same cities, styles, splits and pixels as ``road_scenes`` (an item of ``road_boxes`` is the image of
``road_scenes`` with the same parameters), with one box per visible object instance of the classes

    0 car, 1 person, 2 traffic_sign

Poles (street lamps, sign posts) are not a detection class: most are 1-3 px wide at 128x256, so a
box says little more than a line, and sign posts would be boxes glued to the signs.

A box is the visible extent of an instance after z-buffering: the renderer records, at each pixel
centre, the id of the front-most object sample (the sample that sets the mask label there), and the
box of an instance spans the pixels showing it: ``(min col, min row, max col + 1, max row + 1)``, so
every mask pixel of the instance lies inside its box and each box edge touches one. An occluded car
gets the box of what can be seen of it (both sides of a pole in front of it); an object cut by the
image border is clipped there. Instances narrower or lower than :data:`MIN_SIDE` (2) pixels or
showing fewer than :data:`MIN_PIXELS` (4) pixels are dropped. The boxes depend on the content only, so
every style of an item has the same boxes.

Default size 128x256 (``road_scenes`` uses 64x128): at 128x256 a person's median box is about 4x12
px (source city) and a sign's 4x4, at 64x128 they would be 2x6 and 2x2 px, below what a stride-8
feature map of a compact detector can place; a larger size would make every CPU step 4x dearer.
Persons and signs stay small at 128x256 (many under 8 px): that is where a small student trails a
larger teacher.

Splits are cached as ``<root>/v<VERSION>-<hash>/<city>/<style>/<split>.npz`` (``images`` uint8
``[N,3,H,W]`` and ``targets`` float32 ``[N,M,5]`` padded with ``cls = -1``), written to a temporary
name and renamed into place. Bump :data:`VERSION` when the box rule changes (the hash also holds the
rendering's ``road_scenes.VERSION``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..registry import DATASETS
from .base import IMAGENET_MEAN, IMAGENET_STD, check_split, versioned_dir
from .det_base import DetectionTensorDataset, pad_targets
from .embedded import generated_root
from .road_scenes import check_names, check_sizes, layout
from .road_scenes.layout import CHUNK, CITIES, SPLIT_IDS, Array, draw_content
from .road_scenes.rendering import INSTANCE_CLASS, render_content
from .road_scenes.styles import STYLES, render

VERSION = 1
CLASSES = ("car", "person", "traffic_sign")
SCENE_CLASSES = (layout.CAR, layout.PERSON, layout.SIGN)
"""The ``road_scenes`` class id of each detection class."""
MIN_SIDE, MIN_PIXELS = 2, 4


def instance_boxes(instance: Array, min_side: int = MIN_SIDE, min_pixels: int = MIN_PIXELS) -> list[Array]:
    """Per item the boxes float32 ``[n,5]`` ``(x1, y1, x2, y2, cls)`` of the instances in an id map
    (uint8 ``[N,H,W]``, :data:`~kdkit.data.road_scenes.rendering.INSTANCE_CLASS`), by instance id."""
    n = len(instance)
    table = np.full(256, -1, np.int64)
    for k, scene_class in enumerate(SCENE_CLASSES):
        table[: len(INSTANCE_CLASS)][INSTANCE_CLASS == scene_class] = k
    table[0] = -1
    item, row, col = np.nonzero(table[instance] >= 0)
    key = item * 256 + instance[item, row, col]
    size = n * 256
    count = np.bincount(key, minlength=size)
    lo = np.full((size, 2), np.iinfo(np.int64).max)
    hi = np.full((size, 2), -1)
    np.minimum.at(lo, key, np.stack([col, row], 1))
    np.maximum.at(hi, key, np.stack([col, row], 1))
    side = hi - lo + 1
    keep = (count >= max(min_pixels, 1)) & (side >= min_side).all(1)
    boxes = np.concatenate([lo, hi + 1, table[np.arange(size) % 256][:, None]], 1).astype(np.float32)
    return [boxes[i * 256 : (i + 1) * 256][keep[i * 256 : (i + 1) * 256]] for i in range(n)]


def generate(
    city: str,
    split: str,
    styles: Sequence[str],
    count: int,
    image_size: tuple[int, int],
    seed: int,
    min_side: int = MIN_SIDE,
    min_pixels: int = MIN_PIXELS,
) -> tuple[dict[str, Array], list[Array], Array]:
    """Render ``count`` items of a city's split in each style as ``road_scenes.generate`` does:
    ``({style: uint8 [N,3,H,W]}, per-item boxes [n_i,5], masks uint8 [N,H,W])``."""
    out: dict[str, list[Array]] = {s: [] for s in styles}
    boxes: list[Array] = []
    masks = []
    for chunk, start in enumerate(range(0, count, CHUNK)):
        stream = [seed, CITIES[city].id, SPLIT_IDS[split], chunk]
        content = draw_content(np.random.default_rng(stream), CITIES[city], image_size)
        scene = render_content({k: v[: count - start] for k, v in content.items()}, image_size)
        for style in styles:
            out[style].append(render(scene, style, stream))
        boxes += instance_boxes(scene["instance"], min_side, min_pixels)
        masks.append(scene["mask"])
    return {s: np.concatenate(v) for s, v in out.items()}, boxes, np.concatenate(masks)


def _write(path: Path, images: Array, targets: Array) -> None:
    """``<split>.npz`` written under a temporary name in the same folder, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}.npz"
    try:
        np.savez(tmp, images=images, targets=targets)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@DATASETS.register(
    "road_boxes",
    "procedural street scenes for detection (car, person, traffic_sign); cities and styles of road_scenes",
)
def road_boxes(
    split: str,
    root: str | None = None,
    city: str | Sequence[str] = "source",
    styles: str | Sequence[str] = ("day",),
    train_size: int = 2000,
    test_size: int = 300,
    image_size: int | Sequence[int] = (128, 256),
    seed: int = 0,
) -> DetectionTensorDataset:
    """The built-in detection dataset, generated on first use and cached (see module docstring) under
    ``root`` (a folder of its own) or ``$KDKIT_CACHE/road_boxes``.

    Several cities or styles are concatenated, cities outer; ``val`` and ``test`` have ``test_size``
    items. Targets are padded to the largest box count of the returned set.
    """
    check_split(split, list(SPLIT_IDS), "road_boxes")
    cities = check_names(city, CITIES, "city", "road_boxes")
    styles = check_names(styles, STYLES, "style", "road_boxes")
    size = check_sizes(image_size, train_size, test_size, "road_boxes")
    params = dict(train_size=train_size, test_size=test_size, image_size=list(size), seed=seed)
    base = versioned_dir(generated_root(root, "road_boxes", "coco"), VERSION, scenes=layout.VERSION, **params)
    images, targets = [], []
    for name in cities:
        missing = [s for s in styles if not (base / name / s / f"{split}.npz").is_file()]
        if missing:
            count = train_size if split == "train" else test_size
            rendered, boxes, _ = generate(name, split, missing, count, size, seed)
            padded = pad_targets([torch.from_numpy(b) for b in boxes]).numpy()
            for style in missing:
                _write(base / name / style / f"{split}.npz", rendered[style], padded)
        for style in styles:
            with np.load(base / name / style / f"{split}.npz") as z:
                images.append(torch.from_numpy(z["images"]))
                targets.append(torch.from_numpy(z["targets"]))
    most = max(t.shape[1] for t in targets)
    padded_all = torch.cat([pad_targets(list(t), most) for t in targets])
    # one normalisation for every city and style, as road_scenes
    return DetectionTensorDataset(torch.cat(images), padded_all, list(CLASSES), IMAGENET_MEAN, IMAGENET_STD)
