"""Road-scene styles: the same content and mask rendered at dusk, at night, in fog, rain and snow."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..embedded import _blur, _particles, _tint
from .layout import CHUNK, Array
from .rendering import F32, WARM


def _box(a: Array, r: int) -> Array:
    """Box blur of ``[N,H,W,C]`` with radius ``r`` (edges replicated)."""
    for axis in (1, 2):
        pad = [(0, 0)] * a.ndim
        pad[axis] = (r + 1, r)
        cs = np.cumsum(np.pad(a, pad, mode="edge"), axis)
        hi, lo = [slice(None)] * a.ndim, [slice(None)] * a.ndim
        hi[axis], lo[axis] = slice(2 * r + 1, None), slice(0, a.shape[axis])
        a = (cs[tuple(hi)] - cs[tuple(lo)]) / (2 * r + 1)
    return a


def _glow(light: Array) -> Array:
    """Halo around light sources."""
    r = max(1, light.shape[1] // 24)
    return _box(_box(light, r), 2 * r)


def _above(sc: dict[str, Array]) -> Array:
    """0 at the horizon rising to 1 at the top row, ``[N,H,1,1]``."""
    y = np.arange(sc["day"].shape[1], dtype=F32) + 0.5
    yh = sc["yh"][:, None]
    return np.clip((yh - y) / yh, 0, 1)[..., None, None]


def _streaks(
    prng: np.random.Generator, sc: dict[str, Array], cell: float, stretch: float, angle: Array, radius: float
) -> Array:
    """``embedded``'s particles at the pixel centres, ``[N,H,W,1]`` (its half-pixel grid, at half scale)."""
    n, h, w = sc["day"].shape[:3]
    field = _particles(prng, n, ((h + 1) // 2, (w + 1) // 2), cell / 2, stretch, angle, radius / 2)
    return field[:, :h, :w, None]


Draw = Callable[[float, float], Array]


def _dusk(sc: dict[str, Array], d: Draw, prng: np.random.Generator) -> Array:
    t, sky = _above(sc), sc["sky"][..., None]
    glow = np.array([1.0, 0.55, 0.3], F32) * d(0.8, 1.0)
    sky_colour = glow * (1 - t) + np.array([0.25, 0.22, 0.42], F32) * d(0.7, 1.0) * t
    out = _tint(sc["day"] * d(0.5, 0.65), (1.0, 0.78, 0.62))
    out = out * (1 - sky) + sky_colour * sky
    return out + 0.4 * sc["emission"] + 0.8 * _glow(sc["emission"])


def _night(sc: dict[str, Array], d: Draw, prng: np.random.Generator) -> Array:
    n, h, w = sc["day"].shape[:3]
    sky = sc["sky"][..., None]
    out = _tint((sc["day"] * 0.8 + 0.1) ** 1.6 * d(0.25, 0.4), (0.55, 0.7, 1.0))
    out = out * (1 - sky) + np.array([0.03, 0.04, 0.09], F32) * (1 - 0.5 * _above(sc)) * d(0.7, 1.3) * sky
    y = (np.arange(h, dtype=F32) + 0.5)[:, None]
    x = (np.arange(w, dtype=F32) + 0.5)[None]
    near = np.clip((y - sc["yh"][:, None, None]) / (h - sc["yh"][:, None, None]), 0, 1) ** 2  # own headlights
    beam = (near * np.exp(-(((x - w / 2) / (0.3 * w)) ** 2)))[..., None] * sc["ground"][..., None] * WARM
    return out + beam * d(0.2, 0.4) + sc["emission"] + 1.5 * _glow(sc["emission"])


def _fog(sc: dict[str, Array], d: Draw, prng: np.random.Generator) -> Array:
    t = 1 - np.exp(-sc["depth"][..., None] / d(15.0, 45.0))
    haze = d(0.68, 0.85) * np.array([0.98, 1.0, 1.03], F32)
    return _blur(sc["day"] * (1 - t) + haze * t + 0.3 * _glow(sc["emission"]), 0.5)


def _rain(sc: dict[str, Array], d: Draw, prng: np.random.Generator) -> Array:
    day, sky, wet = sc["day"], sc["sky"][..., None], sc["ground"][..., None]
    out = (day * 0.65 + day.mean(-1, keepdims=True) * 0.35) * d(0.6, 0.8) * (1 - wet * d(0.25, 0.45))
    out = out * (1 - sky) + d(0.45, 0.65) * sky
    streaks = _streaks(prng, sc, day.shape[1] / 8, 4.0, d(-0.35, 0.35)[:, 0, 0, 0], 0.5)
    return _blur(out + 0.45 * streaks + 0.3 * _glow(sc["emission"]), 0.4)


def _snow(sc: dict[str, Array], d: Draw, prng: np.random.Generator) -> Array:
    day, sky = sc["day"], sc["sky"][..., None]
    cover = np.clip(sc["ground"][..., None] * (d(0.6, 0.95) + 0.25 * _box(sc["noise"][..., :1], 1)), 0, 1)
    out = day * (1 - cover) + np.array([0.9, 0.92, 0.96], F32) * d(0.85, 1.0) * cover
    out = (out * (1 - sky) + d(0.75, 0.88) * sky) * 0.85 + 0.1
    flakes = _streaks(prng, sc, day.shape[1] / 9, 1.0, d(0.0, np.pi)[:, 0, 0, 0], 0.6)
    return _blur(out * (1 - flakes) + flakes, 0.3)


StyleFn = Callable[[dict[str, Array], Draw, np.random.Generator], Array]
STYLES: dict[str, tuple[StyleFn | None, float]] = {
    # style: (function of the scene maps, extra sensor noise); append new styles (the index seeds them)
    "day": (None, 0.0),
    "dusk": (_dusk, 0.015),
    "night": (_night, 0.04),
    "fog": (_fog, 0.01),
    "rain": (_rain, 0.02),
    "snow": (_snow, 0.02),
}


def render(scene: dict[str, Array], style: str, stream: Sequence[int]) -> Array:
    """One style of a rendered chunk as uint8 ``[N,3,H,W]``."""
    fn, extra = STYLES[style]
    sid = 1 + list(STYLES).index(style)
    rng, n = np.random.default_rng([*stream, sid]), len(scene["day"])

    def draw(lo: float, hi: float) -> Array:  # one value per item, drawn for a whole chunk
        return rng.uniform(lo, hi, CHUNK)[:n, None, None, None].astype(F32)

    img = scene["day"] if fn is None else fn(scene, draw, np.random.default_rng([*stream, sid, 1]))
    img = img + scene["noise"][..., 1:] * (scene["sigma"][:, None, None, None] + extra)
    return (img.clip(0, 1) * 255 + 0.5).astype(np.uint8).transpose(0, 3, 1, 2)
