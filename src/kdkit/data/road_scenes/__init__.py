"""``road_scenes``: procedural perspective road scenes for semantic segmentation, in cities and styles.

Each item is a street seen from a car: a pinhole camera (random height, pitch, focal length and
vanishing point) over a ground plane with a road (2-4 lanes, dashed lane lines, edge lines,
crosswalks, parking lanes), curbs and sidewalks, grass or paved setbacks, and on each side a row of
wall segments along the road (building facades with floors of windows and shop fronts, tree
lines, open fields, cross streets), plus hedges, trees, parked and moving cars (3-D boxes), persons,
poles (street lamps) and traffic signs at depth-dependent scale, all z-buffered. Colours, textures,
lighting, sun side and building shadows are random. Class ids (stable, the order of :data:`CLASSES`):

    0 road, 1 sidewalk, 2 building, 3 vegetation, 4 sky, 5 car, 6 person, 7 pole, 8 terrain,
    9 traffic_sign

The scene is sampled every half pixel (a ``(2H+1) x (2W+1)`` grid); the image is its tent-filtered
(anti-aliased) average and the mask is the label of the front-most surface at each pixel centre.
Poles, persons and signs are thin or small (a few pixels at 64x128).

Cities differ in layout statistics (same classes and appearance family, so models transfer, but
not perfectly):

============  ==============================================================================
city          what differs
============  ==============================================================================
source        a mix of suburb and town: 2-4 lanes, buildings 5-25 m with gaps, tree lines and
              fields, grass setbacks, any facade colour, moderate traffic, few persons
target        dense downtown: tall buildings (18-50 m, narrow sky), narrow 2-3 lanes, wide
              sidewalks, few trees or grass, grey/beige facades, many cars and persons
proximity     downtown like ``target`` but red-brown brick facades, reddish paving, wider 3-4
              lanes and hard building shadows across the road (sunny)
suburb        low houses (3-10 m), hedges, many trees, grass, fields, few cars and persons
============  ==============================================================================

Styles render the same content with the same mask: ``day`` (clean), ``dusk`` (warm sky gradient,
darker, first lights), ``night`` (dark, lit windows, street lamps and car lights with glow),
``fog`` (haze growing with each pixel's scene depth), ``rain`` (wet dark ground, grey sky,
streaks), ``snow`` (whitened ground and trees, flakes).

Splits are cached as ``<root>/v<VERSION>-<hash>/<city>/<style>/`` holding ``images/<split>/<i:05d>.png``,
``masks/<split>/<i:05d>.png`` (class ids, single channel), ``classes.txt`` and ``<split>.npz``
(written last: it marks a complete split). Bump ``VERSION`` whenever the rendering changes.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ...errors import KdkitError
from ...registry import DATASETS, did_you_mean
from ..base import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SegmentationTensorDataset,
    check_split,
    versioned_dir,
)
from ..embedded import generated_root
from .layout import CHUNK, CITIES, CLASSES, SPLIT_IDS, VERSION, Array, draw_content, palette
from .rendering import render_content
from .styles import STYLES, render

__all__ = ["CHUNK", "CITIES", "CLASSES", "STYLES", "VERSION", "generate", "palette", "road_scenes"]


def generate(
    city: str, split: str, styles: Sequence[str], count: int, image_size: tuple[int, int], seed: int
) -> tuple[dict[str, Array], Array]:
    """Render ``count`` items of a city's split in each style: ({style: uint8 [N,3,H,W]}, masks [N,H,W])."""
    out: dict[str, list[Array]] = {s: [] for s in styles}
    masks = []
    for chunk, start in enumerate(range(0, count, CHUNK)):
        stream = [seed, CITIES[city].id, SPLIT_IDS[split], chunk]
        content = draw_content(np.random.default_rng(stream), CITIES[city], image_size)
        scene = render_content({k: v[: count - start] for k, v in content.items()}, image_size)
        for style in styles:
            out[style].append(render(scene, style, stream))
        masks.append(scene["mask"])
    return {s: np.concatenate(v) for s, v in out.items()}, np.concatenate(masks)


# ---------------------------------------------------------------- cache on disk


def save_pngs(images: Array, masks: Array, image_dir: Path, mask_dir: Path) -> None:
    """``images`` (uint8 ``[N,3,H,W]``) and ``masks`` (``[N,H,W]``) as ``<dir>/<i:05d>.png`` (fast PNG)."""
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        Image.fromarray(image.transpose(1, 2, 0)).save(image_dir / f"{i:05d}.png", compress_level=1)
        Image.fromarray(mask).save(mask_dir / f"{i:05d}.png", compress_level=1)


def _write_split(style_dir: Path, split: str, images: Array, masks: Array) -> None:
    """Write PNGs, ``classes.txt`` and ``<split>.npz`` into a temp dir, then rename them into place."""
    style_dir.mkdir(parents=True, exist_ok=True)
    tmp = style_dir / f".{split}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    npz = style_dir / f"{split}.npz"
    try:
        for sub in ("images", "masks"):
            (tmp / sub).mkdir(parents=True)
        save_pngs(images, masks, tmp / "images", tmp / "masks")
        (tmp / "classes.txt").write_text("\n".join(CLASSES) + "\n")
        np.savez(tmp / npz.name, images=images, masks=masks)
        for sub in ("images", "masks"):
            dest = style_dir / sub / split
            dest.parent.mkdir(exist_ok=True)
            shutil.rmtree(dest, ignore_errors=True)  # left by an interrupted run
            os.rename(tmp / sub, dest)
        os.replace(tmp / "classes.txt", style_dir / "classes.txt")
        os.replace(tmp / npz.name, npz)  # last: marks the split complete
    except OSError:
        if not npz.is_file():  # a concurrent writer that finished first is fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_names(
    value: str | Sequence[str], choices: dict, what: str, dataset: str = "road_scenes"
) -> list[str]:
    """``value`` (one name or several) as a list of known ``choices`` (cities, styles); one-line errors."""
    names = [value] if isinstance(value, str) else list(value)
    if not names:
        raise KdkitError(f"{dataset} needs at least one {what} (available: {', '.join(choices)})")
    for name in names:
        if name not in choices:
            raise KdkitError(f"{dataset} has no {what} '{name}'{did_you_mean(str(name), list(choices))}")
    return names


def check_sizes(
    image_size: int | Sequence[int], train_size: int, test_size: int, dataset: str = "road_scenes"
) -> tuple[int, int]:
    """``(height, width)`` of ``image_size`` after checking it and the split sizes; one-line errors."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and 16 <= s <= 1024 for s in size):
        raise KdkitError(f"{dataset} image_size must be (height, width) in 16..1024, got {image_size!r}")
    for name, value in (("train_size", train_size), ("test_size", test_size)):
        if not isinstance(value, int) or value < 1:
            raise KdkitError(f"{dataset} {name} must be a positive integer, got {value!r}")
    return int(size[0]), int(size[1])


@DATASETS.register(
    "road_scenes",
    "procedural street scenes for segmentation; cities source/target/proximity/suburb; 6 styles",
)
def road_scenes(
    split: str,
    root: str | None = None,
    city: str | Sequence[str] = "source",
    styles: str | Sequence[str] = ("day",),
    train_size: int = 2000,
    test_size: int = 300,
    image_size: int | Sequence[int] = (64, 128),
    seed: int = 0,
    labeled: bool = True,
) -> SegmentationTensorDataset:
    """The built-in segmentation dataset, generated on first use and cached (see module docstring)
    under ``root`` (a folder of its own) or ``$KDKIT_CACHE/road_scenes``.

    Several cities or styles are concatenated, cities outer; ``val`` has ``test_size`` items.
    ``labeled=False`` sets every mask pixel to ``IGNORE_INDEX`` (unlabelled domains).
    """
    check_split(split, list(SPLIT_IDS), "road_scenes")
    cities, styles = check_names(city, CITIES, "city"), check_names(styles, STYLES, "style")
    size = check_sizes(image_size, train_size, test_size)
    params = dict(train_size=train_size, test_size=test_size, image_size=list(size), seed=seed)
    base = versioned_dir(generated_root(root, "road_scenes", "segmentation_folder"), VERSION, **params)
    images, masks = [], []
    for name in cities:
        missing = [s for s in styles if not (base / name / s / f"{split}.npz").is_file()]
        if missing:
            rendered, rendered_masks = generate(
                name, split, missing, train_size if split == "train" else test_size, size, seed
            )
            for style in missing:
                _write_split(base / name / style, split, rendered[style], rendered_masks)
        for style in styles:
            with np.load(base / name / style / f"{split}.npz") as z:
                images.append(torch.from_numpy(z["images"]))
                masks.append(torch.from_numpy(z["masks"]))
    image_t, mask_t = torch.cat(images), torch.cat(masks)
    if not labeled:
        mask_t = torch.full_like(mask_t, IGNORE_INDEX)
    # one normalisation for every city and style: a teacher trained on one city, or a model evaluated
    # on another style, sees inputs scaled as in training
    return SegmentationTensorDataset(image_t, mask_t, list(CLASSES), IMAGENET_MEAN, IMAGENET_STD)
