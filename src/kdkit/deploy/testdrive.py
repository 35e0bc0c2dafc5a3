"""The embedded test drive (patent [0043]): a deterministic road-scene sequence whose style switches
abruptly (day, night from frame 40, day again from frame 80: the tunnel), generated on first use and
cached, with the ground-truth masks and the style of every frame. One scene is drawn from a city's
layout statistics (default ``target``, the city the demo students learn) and seen from a car driving
forward behind a lead car whose gap swings between 7 and 21 m; each style segment keeps one draw of
its style parameters, so only the switch changes the look at once; the masks do not depend on the
styles. Used by :mod:`kdkit.deploy.drive` and :mod:`kdkit.deploy.stability`."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.base import cache_dir, versioned_dir
from ..data.road_scenes import CITIES, CLASSES, STYLES, save_pngs
from ..data.road_scenes.layout import CAR_ROWS, CARS_PER_ROW, draw_content
from ..data.road_scenes.rendering import F32, render_content
from ..errors import KdkitError
from ..registry import did_you_mean

# ---------------------------------------------------------------- the embedded test drive

TEST_DRIVE_VERSION = 1
DEFAULT_SCHEDULE: tuple[tuple[int, str], ...] = ((0, "day"), (40, "night"), (80, "day"))
WRAP = 100.0  # metres: objects passed by reappear this far ahead (beyond OBJECT_FAR, so out of sight)
WRAP_CARS = 150.0  # car rows are longer
_OBJECTS = ("person", "pole", "sign", "tree")
LEAD = (14.0, 7.0)  # the lead car's mean gap and amplitude, metres


@dataclass
class TestDrive:
    """Frames ``uint8 [N,3,H,W]``, ground-truth masks ``[N,H,W]`` and the style of each frame.

    ``folder`` holds ``frames/<i:05d>.png``, ``masks/<i:05d>.png`` and ``styles.txt`` (one per line).
    """

    __test__ = False  # not a pytest class

    images: np.ndarray
    masks: np.ndarray
    styles: list[str]
    folder: Path
    classes: tuple[str, ...] = CLASSES

    @property
    def names(self) -> list[str]:
        return [f"{i:05d}.png" for i in range(len(self.images))]

    @property
    def changes(self) -> list[int]:
        """Frames whose style differs from the previous frame's."""
        return style_changes(self.styles)


def style_changes(styles: Sequence[str]) -> list[int]:
    return [t for t in range(1, len(styles)) if styles[t] != styles[t - 1]]


def _check_schedule(schedule: Sequence[tuple[int, str]], frames: int) -> list[tuple[int, str]]:
    sched = [(int(t), str(s)) for t, s in schedule]
    if not sched or sched[0][0] != 0:
        raise KdkitError(
            f"a test-drive schedule starts at frame 0, e.g. [[0, day], [40, night]]; got {schedule}"
        )
    for (a, _), (b, _) in zip(sched, sched[1:], strict=False):
        if not a < b < frames:
            raise KdkitError(
                f"test-drive schedule frames must increase and stay below {frames}; got {schedule}"
            )
    for _, style in sched:
        if style not in STYLES:
            raise KdkitError(f"test drive has no style '{style}'{did_you_mean(style, list(STYLES))}")
    return sched


def drive_content(
    city: str, frames: int, image_size: tuple[int, int], seed: int, step: float = 0.5, sway: float = 0.35
) -> dict[str, np.ndarray]:
    """The content of each frame: one scene of ``city`` (seeded), the camera ``step`` metres further per
    frame and ``sway`` metres to the side at most (a sine over the drive), behind a lead car whose gap
    swings between 7 and 21 m."""
    rng = np.random.default_rng([seed, CITIES[city].id, 7])
    one = draw_content(rng, CITIES[city], image_size, n=1)
    c = {k: np.repeat(v, frames, 0) for k, v in one.items()}
    t = np.arange(frames, dtype=np.float64)
    d = step * t  # distance driven
    lat = sway * np.sin(2 * np.pi * t / max(frames, 1) * 1.5)  # camera to the right of its start (m)
    # walls, hedges, crosswalk and lane dashes are fixed to the ground
    c["wbound"] = c["wbound"] - d[:, None, None]
    c["hbound"] = c["hbound"] - d[:, None, None]
    cw = c["crosswalk"]
    c["crosswalk"] = np.where(np.isfinite(cw), np.mod(np.where(np.isfinite(cw), cw, 0) - d, WRAP), np.inf)
    c["dash"] = c["dash"].copy()
    c["dash"][:, 2] = c["dash"][:, 2] + d
    for kind in _OBJECTS:
        c[f"{kind}_z"] = np.mod(c[f"{kind}_z"] - d[:, None], WRAP)
        c[f"{kind}_x"] = c[f"{kind}_x"] - lat[:, None]
    # cars: parked ones stand still, others drive at 0.5-0.95x our speed (we pass them: a car that
    # overtook us would pop up beside us when its distance wraps), oncoming ones towards us
    lane = np.repeat(np.arange(CAR_ROWS) - 1, CARS_PER_ROW)
    parked = (lane < 0) | (lane == CAR_ROWS - 2)
    own = np.where(parked, 0.0, rng.uniform(0.5, 0.95, lane.shape))
    sign = np.where(one["car_front"][0], -1.0, 1.0)
    rel = (own * sign - 1.0) * step  # change of each car's distance per frame
    c["car_z"] = np.mod(c["car_z"] + rel[None] * t[:, None], WRAP_CARS)
    # a lead car in our lane closes in and falls back (lead gap LEAD[0] +- LEAD[1] metres), with the
    # cars behind it keeping their gaps: the free road ahead, hence the target speed, varies smoothly
    ego = slice(int(one["ego"][0] + 1) * CARS_PER_ROW, int(one["ego"][0] + 2) * CARS_PER_ROW)
    lead = LEAD[0] - LEAD[1] * np.cos(2 * np.pi * t / max(frames, 1) * 2.5)
    c["car_z"][:, ego] = one["car_z"][:, ego] - one["car_z"][0, ego.start] + lead[:, None]
    c["car_on"][:, ego.start] = True
    c["car_x"] = c["car_x"] - lat[:, None]
    # the lateral offset moves the lane and curb edges: left side farther, right side nearer
    shift = np.stack([lat, -lat], 1)
    for key in ("drive", "red", "sed", "bed"):
        c[key] = c[key] + shift
    c["noise_seed"] = one["noise_seed"][0] + np.arange(frames)  # fresh sensor noise per frame
    return c


def _render_style(scene: dict[str, np.ndarray], style: str, stream: Sequence[int]) -> np.ndarray:
    """Like ``road_scenes.styles.render`` but with one draw of the style parameters for all frames
    (so a segment does not flicker), uint8 ``[N,3,H,W]``."""
    fn, extra = STYLES[style]
    sid = 1 + list(STYLES).index(style)
    rng, n = np.random.default_rng([*stream, sid]), len(scene["day"])

    def draw(lo: float, hi: float) -> np.ndarray:
        return np.full((n, 1, 1, 1), rng.uniform(lo, hi), F32)

    img = scene["day"] if fn is None else fn(scene, draw, np.random.default_rng([*stream, sid, 1]))
    img = img + scene["noise"][..., 1:] * (scene["sigma"][:, None, None, None] + extra)
    return (img.clip(0, 1) * 255 + 0.5).astype(np.uint8).transpose(0, 3, 1, 2)


def render_drive(
    frames: int = 120,
    image_size: tuple[int, int] = (64, 128),
    schedule: Sequence[tuple[int, str]] = DEFAULT_SCHEDULE,
    city: str = "target",
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Render a test drive in memory: (images uint8 ``[N,3,H,W]``, masks ``[N,H,W]``, style per frame)."""
    sched = _check_schedule(schedule, frames)
    if city not in CITIES:
        raise KdkitError(f"test drive has no city '{city}'{did_you_mean(city, list(CITIES))}")
    scene = render_content(drive_content(city, frames, image_size, seed), image_size)
    bounds = [t for t, _ in sched] + [frames]
    styles: list[str] = []
    parts = []
    for k, (start, style) in enumerate(sched):
        sl = slice(start, bounds[k + 1])
        part = {key: v[sl] for key, v in scene.items()}
        parts.append(_render_style(part, style, [seed, CITIES[city].id, 7, k]))
        styles += [style] * (bounds[k + 1] - start)
    return np.concatenate(parts), scene["mask"], styles


def test_drive(
    frames: int = 120,
    image_size: tuple[int, int] | Sequence[int] = (64, 128),
    schedule: Sequence[tuple[int, str]] = DEFAULT_SCHEDULE,
    city: str = "target",
    seed: int = 0,
    root: str | Path | None = None,
) -> TestDrive:
    """The embedded test drive, generated on first use and cached under ``root`` or
    ``$KDKIT_CACHE/test_drive/v<version>-<hash of the parameters>/`` (``drive.npz`` written last)."""
    size = tuple(int(s) for s in image_size)
    if len(size) != 2 or not all(16 <= s <= 1024 for s in size):
        raise KdkitError(f"test drive image_size must be (height, width) in 16..1024, got {image_size!r}")
    if not isinstance(frames, int) or frames < 2:
        raise KdkitError(f"a test drive needs at least 2 frames, got {frames!r}")
    sched = _check_schedule(schedule, frames)
    params = dict(frames=frames, image_size=list(size), schedule=sched, city=city, seed=seed)
    base = Path(root) if root else cache_dir("test_drive")
    folder = versioned_dir(base, TEST_DRIVE_VERSION, **params)
    npz = folder / "drive.npz"
    if not npz.is_file():
        images, masks, styles = render_drive(frames, size, sched, city, seed)
        _write_drive(folder, images, masks, styles)
    with np.load(npz) as z:
        images, masks = z["images"], z["masks"]
    styles = (folder / "styles.txt").read_text().split()
    return TestDrive(images, masks, styles, folder)


test_drive.__test__ = False  # type: ignore[attr-defined]  # not a pytest test when imported into one


def _write_drive(folder: Path, images: np.ndarray, masks: np.ndarray, styles: list[str]) -> None:
    """PNG frames and masks, ``styles.txt``, ``classes.txt`` and ``drive.npz`` via a temp dir (atomic)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        for sub in ("frames", "masks"):
            (tmp / sub).mkdir(parents=True)
        save_pngs(images, masks, tmp / "frames", tmp / "masks")
        (tmp / "styles.txt").write_text("\n".join(styles) + "\n")
        (tmp / "classes.txt").write_text("\n".join(CLASSES) + "\n")
        np.savez(tmp / "drive.npz", images=images, masks=masks)
        for sub in ("frames", "masks"):
            shutil.rmtree(folder / sub, ignore_errors=True)
            os.rename(tmp / sub, folder / sub)
        for name in ("styles.txt", "classes.txt", "drive.npz"):  # drive.npz last: marks it complete
            os.replace(tmp / name, folder / name)
    except OSError:
        if not (folder / "drive.npz").is_file():  # a concurrent writer that finished first is fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
