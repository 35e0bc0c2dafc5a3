"""``embedded``: a procedural, deterministic shape-and-texture dataset with weather styles.

Each content item is drawn once from the seed: a main object whose (pattern, shape) is the
class, plus smaller distractor objects of any shape and pattern, random colours, positions,
sizes and rotations, occlusion, and a noisy two-colour background. Every style renders the
same content with the same label: ``day`` is clean, the others degrade it (``night``,
``fog``, ``rain``, ``snow``, ``dusk``). Only the requested styles are rendered.

Splits are written once as an image-folder tree that :func:`kdkit.data.folders.image_folder`
reads, ``<root>/<version-hash>/<style>/<split>/<class>/<index>.png``, plus a ``tensors.npz``
of the same pixels for fast loading. The hash covers the generator version and parameters;
bump ``VERSION`` whenever the rendering changes.

Difficulty (defaults, day, 25 epochs of SGD with crop+flip): ResNet-20 reaches about 84-87%
top-1 and ResNet-8 about 68-74%. Both sit near chance for the first ~5 epochs, so very short
schedules (or a few thousand images) leave even the teacher untrained.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import KdkitError
from ..registry import DATASETS, did_you_mean
from .base import ImageDataset, TensorDataset, cache_dir, channel_stats, check_split, versioned_dir
from .folders import image_folder

VERSION = 1
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
CHUNK = 500  # items per random stream and render batch (bounds memory)
SUPERSAMPLE = 2  # render at 2x and average down (anti-aliasing)
DISTRACTORS = (2, 4)  # min, max number of distractor objects
MAIN_RADIUS = (0.2, 0.3)  # object radii as fractions of the image size
DISTRACTOR_RADIUS = (0.09, 0.17)
PATTERN_CONTRAST = (0.5, 0.9)  # how far the pattern's second colour moves from the first

Array = np.ndarray

# ---------------------------------------------------------------- shapes (local coords, radius ~1)


def _polygon(n: int, apothem: float) -> Callable[[Array, Array], Array]:
    angles = np.pi / 2 + 2 * np.pi * np.arange(n) / n

    def inside(u: Array, v: Array) -> Array:
        out = np.ones(u.shape, bool)
        for a in angles:
            out &= u * np.cos(a) + v * np.sin(a) <= apothem
        return out

    return inside


def _star(u: Array, v: Array) -> Array:
    phi = np.arctan2(v, u)
    return np.hypot(u, v) <= 0.62 + 0.38 * np.cos(5 * phi)


def _plus(u: Array, v: Array) -> Array:
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.32) & (av <= 0.95)) | ((av <= 0.32) & (au <= 0.95))


def _ring(u: Array, v: Array) -> Array:
    r = np.hypot(u, v)
    return (r >= 0.5) & (r <= 0.95)


def _moon(u: Array, v: Array) -> Array:
    return (np.hypot(u, v) <= 0.95) & (np.hypot(u - 0.5, v) > 0.7)


SHAPES: dict[str, Callable[[Array, Array], Array]] = {
    "circle": lambda u, v: u * u + v * v <= 0.85,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.78,
    "triangle": _polygon(3, 0.55),
    "hexagon": _polygon(6, 0.82),
    "star": _star,
    "plus": _plus,
    "ring": _ring,
    "moon": _moon,
}

# ---------------------------------------------------------------- patterns (local pixel coords)


def _waves(x: Array, y: Array, period: Array, phase: Array) -> tuple[Array, Array]:
    k = 2 * np.pi / period
    return np.sin(k * x + phase), np.sin(k * y + phase)


PATTERNS: dict[str, Callable[[Array, Array, Array, Array], Array]] = {
    "plain": lambda x, y, p, f: np.zeros(x.shape, bool),
    "striped": lambda x, y, p, f: _waves(x, y, p, f)[0] > 0,
    "checked": lambda x, y, p, f: np.multiply(*_waves(x, y, p, f)) > 0,
    "dotted": lambda x, y, p, f: np.add(*_waves(x, y, p, f)) > 1.0,
    "banded": lambda x, y, p, f: np.sin(2 * np.pi * np.hypot(x, y) / p + f) > 0,
}

# The first ``num_classes`` (pattern, shape) pairs are the classes; each shape and each pattern
# appears in several classes, so a class is a conjunction of two attributes of the same object.
# fmt: off
CLASS_TABLE: tuple[tuple[str, str], ...] = (
    ("striped", "circle"), ("dotted", "square"), ("checked", "triangle"), ("plain", "star"),
    ("banded", "hexagon"), ("dotted", "circle"), ("striped", "square"), ("plain", "triangle"),
    ("checked", "hexagon"), ("banded", "star"), ("striped", "triangle"), ("checked", "circle"),
    ("dotted", "hexagon"), ("banded", "square"), ("plain", "plus"), ("striped", "ring"),
    ("dotted", "star"), ("checked", "moon"), ("banded", "plus"), ("plain", "ring"),
)
# fmt: on


def class_names(num_classes: int) -> list[str]:
    """Readable class names (``"striped-circle"``), sorted so image-folder order matches labels."""
    if not 2 <= num_classes <= len(CLASS_TABLE):
        raise KdkitError(f"embedded num_classes must be between 2 and {len(CLASS_TABLE)}, got {num_classes}")
    return sorted(f"{p}-{s}" for p, s in CLASS_TABLE[:num_classes])


# ---------------------------------------------------------------- content


def _rand_colours(rng: np.random.Generator, shape: tuple[int, ...]) -> Array:
    """Saturated-ish random RGB colours in [0,1]."""
    hue = rng.random(shape)
    sat = rng.uniform(0.35, 1.0, shape)
    val = rng.uniform(0.35, 1.0, shape)
    k = (np.array([5.0, 3.0, 1.0]) + hue[..., None] * 6) % 6
    return val[..., None] * (1 - sat[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1))


def draw_content(rng: np.random.Generator, labels: Array, num_classes: int, size: int) -> dict[str, Array]:
    """Every random choice of a batch of items (style independent), as arrays."""
    n, layers = len(labels), 1 + DISTRACTORS[1]
    names = class_names(num_classes)
    table = [name.split("-") for name in names]
    pattern_ids, shape_ids = list(PATTERNS), list(SHAPES)
    shape = rng.integers(0, len(SHAPES), (n, layers))
    pattern = rng.integers(0, len(PATTERNS), (n, layers))
    shape[:, 0] = [shape_ids.index(table[c][1]) for c in labels]
    pattern[:, 0] = [pattern_ids.index(table[c][0]) for c in labels]
    count = rng.integers(DISTRACTORS[0], DISTRACTORS[1] + 1, n)
    radius = size * np.concatenate(
        [rng.uniform(*MAIN_RADIUS, (n, 1)), rng.uniform(*DISTRACTOR_RADIUS, (n, layers - 1))], axis=1
    )
    centre = rng.uniform(0, 1, (n, layers, 2)) * (size - 2 * radius[..., None]) + radius[..., None]
    fg = _rand_colours(rng, (n, layers))
    fg2 = _rand_colours(rng, (n, layers))
    mix = rng.uniform(*PATTERN_CONTRAST, (n, layers, 1))
    return {
        "labels": np.asarray(labels),
        "shape": shape,
        "pattern": pattern,
        "present": np.arange(layers) <= count[:, None],
        "depth": rng.random((n, layers)).argsort(1),  # drawing order, back to front
        "radius": radius,
        "centre": centre,
        "angle": rng.uniform(0, 2 * np.pi, (n, layers)),
        "period": size * rng.uniform(0.09, 0.13, (n, layers)),
        "phase": rng.uniform(0, 2 * np.pi, (n, layers)),
        "fg": fg,
        "fg2": fg * (1 - mix) + fg2 * mix,
        "bg": _rand_colours(rng, (n, 2)),
        "bg_waves": rng.normal(0, 1, (n, 3, 3)),  # 3 waves: x freq, y freq, phase
        "noise_sigma": rng.uniform(0.02, 0.06, n),
        "noise_seed": rng.integers(0, 2**31, n),
    }


def _grid(size: int | tuple[int, int]) -> tuple[Array, Array]:
    """Pixel-centre coordinates (output-pixel units) of the supersampled canvas; ``size`` is S or (H, W)."""
    h, w = (size, size) if isinstance(size, int) else size
    gx, gy = (((np.arange(k * SUPERSAMPLE) + 0.5) / SUPERSAMPLE).astype(np.float32) for k in (w, h))
    return gx[None, None, :], gy[None, :, None]


def _layer(c: dict[str, Array], layer: Array) -> dict[str, Array]:
    """Per-object parameters of object ``layer[i]`` of each item i."""
    keys = ("shape", "pattern", "present", "radius", "centre", "angle", "period", "phase", "fg", "fg2")
    return {
        k: np.take_along_axis(c[k], layer.reshape((-1, 1) + (1,) * (c[k].ndim - 2)), 1)[:, 0] for k in keys
    }


def render_content(c: dict[str, Array], size: int) -> Array:
    """Day rendering at supersampled resolution, float32 ``[N,S,S,3]`` in [0,1]."""
    xs, ys = _grid(size)
    w = c["bg_waves"].astype(np.float32)
    field = sum(
        np.sin(
            w[:, k, 0, None, None] * xs * 6 / size
            + w[:, k, 1, None, None] * ys * 6 / size
            + w[:, k, 2, None, None] * 3
        )
        for k in range(3)
    )
    t = (0.5 + field / 4).clip(0, 1)[..., None]
    bg = c["bg"].astype(np.float32)
    img = bg[:, None, None, 0] * (1 - t) + bg[:, None, None, 1] * t
    for slot in range(c["shape"].shape[1]):
        o = _layer(c, c["depth"][:, slot])
        cos, sin = np.cos(o["angle"])[:, None, None], np.sin(o["angle"])[:, None, None]
        dx, dy = xs - o["centre"][:, 0, None, None], ys - o["centre"][:, 1, None, None]
        px, py = (dx * cos + dy * sin).astype(np.float32), (dy * cos - dx * sin).astype(np.float32)
        r = o["radius"][:, None, None]
        mask, stripe = np.zeros(px.shape, bool), np.zeros(px.shape, bool)
        for sid, fn in enumerate(SHAPES.values()):
            idx = np.nonzero((o["shape"] == sid) & o["present"])[0]
            mask[idx] = fn(px[idx] / r[idx], py[idx] / r[idx])
        for pid, fn in enumerate(PATTERNS.values()):
            idx = np.nonzero((o["pattern"] == pid) & o["present"])[0]
            stripe[idx] = fn(px[idx], py[idx], o["period"][idx, None, None], o["phase"][idx, None, None])
        colour = np.where(stripe[..., None], o["fg2"][:, None, None], o["fg"][:, None, None])
        img = np.where(mask[..., None], colour, img)
    return img.astype(np.float32)


# ---------------------------------------------------------------- styles


def _hash01(*ints: Array) -> Array:
    """Deterministic integer hash of broadcastable int arrays, as floats in [0,1)."""
    h = np.uint64(0x9E3779B97F4A7C15)
    for k, a in enumerate(ints):
        h = h ^ (np.asarray(a).astype(np.int64).astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9 + 2 * k))
        h = (h ^ (h >> np.uint64(31))) * np.uint64(0x94D049BB133111EB)
    return ((h >> np.uint64(40)).astype(np.float64) / 2**24).astype(np.float32)


def _particles(
    rng: np.random.Generator,
    n: int,
    size: int | tuple[int, int],
    cell: float,
    stretch: float,
    angle: Array,
    radius: float,
) -> Array:
    """Soft particles (one per cell at a random offset) on a rotated, stretched lattice: ``[N,H,W]``."""
    xs, ys = _grid(size)
    seed = rng.integers(0, 2**31, n)[:, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    a = (xs * cos + ys * sin) / cell
    b = (ys * cos - xs * sin) / (cell * stretch)
    ia, ib = np.floor(a), np.floor(b)
    oa, ob = 0.2 + 0.6 * _hash01(ia, ib, seed, 1), 0.2 + 0.6 * _hash01(ia, ib, seed, 2)
    keep = _hash01(ia, ib, seed, 3) < 0.6
    da, db = (a - ia - oa) * cell, (b - ib - ob) * cell  # along b, distances shrink by `stretch`
    return np.where(keep, np.exp(-(da * da + db * db) / (2 * radius * radius)), 0).astype(np.float32)


def _tint(img: Array, rgb: Sequence[float]) -> Array:
    return img * np.asarray(rgb, np.float32)


def _gradient(rng: np.random.Generator, n: int, size: int) -> Array:
    """A random linear ramp over the image, 0..1, ``[N,S,S,1]``."""
    xs, ys = _grid(size)
    a = rng.uniform(-0.5, 0.5, n)[:, None, None] + np.pi / 2  # mostly top-to-bottom
    ramp = (xs - size / 2) * np.cos(a) + (ys - size / 2) * np.sin(a)
    return ((ramp / size + 0.5).clip(0, 1))[..., None].astype(np.float32)


def _night(img: Array, rng: np.random.Generator, size: int) -> Array:
    n = len(img)
    out = _tint((img * 0.8 + 0.1) ** 1.6 * 0.45, (0.55, 0.7, 1.0))
    xs, ys = _grid(size)
    for _ in range(2):  # light sources
        cx, cy = rng.uniform(0, size, (2, n, 1, 1))
        glow = rng.uniform(0, 0.8, (n, 1, 1)) * np.exp(
            -((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * (size / 10) ** 2)
        )
        out = out + glow[..., None] * np.array([1.0, 0.85, 0.5], np.float32)
    return out


def _fog(img: Array, rng: np.random.Generator, size: int) -> Array:
    t = 0.35 + 0.5 * _gradient(rng, len(img), size)
    return img * (1 - t) + 0.75 * t


def _rain(img: Array, rng: np.random.Generator, size: int) -> Array:
    n = len(img)
    angle = rng.uniform(-0.35, 0.35, n)
    streaks = _particles(rng, n, size, size / 10, 3.5, angle, 0.45)
    return _tint(img * 0.7, (0.9, 0.95, 1.0)) + 0.35 * streaks[..., None]


def _snow(img: Array, rng: np.random.Generator, size: int) -> Array:
    flakes = _particles(rng, len(img), size, size / 9, 1.0, rng.uniform(0, np.pi, len(img)), 0.6)
    return (img * 0.7 + 0.25) * (1 - flakes[..., None]) + flakes[..., None]


def _dusk(img: Array, rng: np.random.Generator, size: int) -> Array:
    t = _gradient(rng, len(img), size)  # warm glow near the horizon, darker sky above
    glow = (1 - t) * np.array([0.15, 0.075, 0.045], np.float32)
    return _tint(img * 0.6, (1.0, 0.75, 0.6)) * (1 - 0.5 * t) + glow


STYLES: dict[str, tuple[Callable[[Array, np.random.Generator, int], Array] | None, float, float]] = {
    # style: (function on the supersampled image, extra noise sigma, blur weight)
    "day": (None, 0.0, 0.0),
    "night": (_night, 0.05, 0.0),
    "fog": (_fog, 0.01, 0.5),
    "rain": (_rain, 0.02, 0.5),
    "snow": (_snow, 0.02, 0.3),
    "dusk": (_dusk, 0.02, 0.0),
}


def _blur(img: Array, weight: float) -> Array:
    """Mix of the image with its 3x3 box blur (edge replicated), ``[N,H,W,3]``."""
    p = np.pad(img, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = img.shape[1:3]
    box = sum(p[:, i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9
    return img * (1 - weight) + box * weight


def render(content: dict[str, Array], day: Array, style: str, rng: np.random.Generator, size: int) -> Array:
    """One style of a batch as uint8 ``[N,3,H,W]`` from its day rendering."""
    fn, extra_noise, blur = STYLES[style]
    img = day if fn is None else fn(day, rng, size)
    n = len(img)
    img = img.reshape(n, size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean((2, 4))
    if blur:
        img = _blur(img, blur)
    noise = np.stack(
        [np.random.default_rng(s).standard_normal((size, size, 3), np.float32) for s in content["noise_seed"]]
    )
    img = img + noise * content["noise_sigma"][:, None, None, None]
    if extra_noise:
        img = img + rng.standard_normal(img.shape, np.float32) * extra_noise
    return (img.clip(0, 1) * 255 + 0.5).astype(np.uint8).transpose(0, 3, 1, 2)


def generate(
    split: str, styles: Sequence[str], size: int, num_classes: int, image_size: int, seed: int
) -> tuple[dict[str, Array], Array]:
    """Render ``size`` items of a split in every requested style: ({style: uint8 [N,3,H,W]}, labels)."""
    out: dict[str, list[Array]] = {s: [] for s in styles}
    labels = []
    for chunk, start in enumerate(range(0, size, CHUNK)):
        stream = [seed, SPLIT_IDS[split], chunk]
        rng = np.random.default_rng(stream)
        chunk_labels = rng.permutation(np.arange(start, min(start + CHUNK, size)) % num_classes)
        content = draw_content(rng, chunk_labels, num_classes, image_size)
        day = render_content(content, image_size)
        for style in styles:
            style_rng = np.random.default_rng([*stream, 1 + list(STYLES).index(style)])
            out[style].append(render(content, day, style, style_rng, image_size))
        labels.append(chunk_labels)
    return {s: np.concatenate(v) for s, v in out.items()}, np.concatenate(labels)


# ---------------------------------------------------------------- cache on disk

GENERATED_DIR = re.compile(r"v\d+-[0-9a-f]{12}")  # versioned_dir's names


def generated_root(root: str | None, dataset: str, yours: str = "image_folder") -> Path:
    """The folder a generated dataset writes to: ``root`` when given (``data.root``; created when
    missing), else ``$KDKIT_CACHE/<dataset>``. A ``root`` holding anything but this cache (e.g. your
    own images, which a generated dataset would never read) is refused with one line."""
    if not root:
        return cache_dir(dataset)
    path = Path(root).expanduser()
    if path.exists() and not path.is_dir():
        raise KdkitError(
            f"data.root {path} is a file; dataset '{dataset}' needs a folder to write its images to"
        )
    if path.is_dir():
        other = sorted(
            p.name
            for p in path.iterdir()
            if not p.name.startswith(".") and not GENERATED_DIR.fullmatch(p.name)
        )
        if other:
            shown = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
            raise KdkitError(
                f"data.root {path} holds other files ({shown}), but dataset '{dataset}' generates its own "
                f"images and only writes them there: to train on your images set data.name: {yours}; to keep "
                f"the generated data in a folder of your choice, give an empty or new one"
            )
    return path


def _write_split(dest: Path, images: Array, labels: Array, classes: list[str]) -> None:
    """Write PNG tree + tensors.npz into a temp dir beside ``dest``, then rename it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        for name in classes:
            (tmp / name).mkdir(parents=True)
        width = len(str(len(labels) - 1))
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            Image.fromarray(image.transpose(1, 2, 0)).save(
                tmp / classes[label] / f"{i:0{width}d}.png", compress_level=1
            )
        np.savez(tmp / "tensors.npz", images=images, labels=labels.astype(np.int64))
        os.rename(tmp, dest)
    except OSError:
        if not dest.exists():  # a concurrent writer that won the race is fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@DATASETS.register(
    "embedded", "procedural shapes x textures with clutter; styles day/night/fog/rain/snow/dusk"
)
def embedded(
    split: str,
    root: str | None = None,
    styles: Sequence[str] | str = ("day",),
    num_classes: int = 10,
    train_size: int = 10_000,
    test_size: int = 2_000,
    image_size: int = 32,
    seed: int = 0,
) -> ImageDataset:
    """The built-in dataset, generated on first use and cached (see module docstring) under ``root``
    (a folder of its own) or ``$KDKIT_CACHE/embedded``."""
    check_split(split, list(SPLIT_IDS), "embedded")
    styles = [styles] if isinstance(styles, str) else list(styles)
    for style in styles:
        if style not in STYLES:
            raise KdkitError(f"embedded has no style '{style}'{did_you_mean(style, list(STYLES))}")
    if not styles:
        raise KdkitError(f"embedded needs at least one style (available: {', '.join(STYLES)})")
    classes = class_names(num_classes)
    params = dict(
        num_classes=num_classes, train_size=train_size, test_size=test_size, image_size=image_size, seed=seed
    )
    base = versioned_dir(generated_root(root, "embedded"), VERSION, **params)
    missing = [s for s in styles if not (base / s / split).is_dir()]
    if missing:
        count = train_size if split == "train" else test_size
        images, labels = generate(split, missing, count, num_classes, image_size, seed)
        for style in missing:
            _write_split(base / style / split, images[style], labels, classes)
    parts = [_load(base / style, split) for style in styles]
    images = torch.cat([p[0] for p in parts])
    mean, std = channel_stats(images)
    return TensorDataset(images, torch.cat([p[1] for p in parts]), classes, mean, std)


def _load(style_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = style_dir / split / "tensors.npz"
    if tensors.is_file():
        with np.load(tensors) as z:
            return torch.from_numpy(z["images"]), torch.from_numpy(z["labels"])
    folder = image_folder(split, root=str(style_dir), cache=True)
    assert folder.images is not None and folder.labels is not None
    return folder.images, folder.labels
