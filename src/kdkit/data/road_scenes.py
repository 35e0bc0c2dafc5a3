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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import KdkitError
from ..registry import DATASETS, did_you_mean
from .base import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SegmentationTensorDataset,
    check_split,
    versioned_dir,
)
from .embedded import _blur, _hash01, _particles, _tint, generated_root

VERSION = 1
CLASSES = (
    "road", "sidewalk", "building", "vegetation", "sky", "car", "person", "pole", "terrain", "traffic_sign",
)  # fmt: skip
ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, CAR, PERSON, POLE, TERRAIN, SIGN = range(len(CLASSES))
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
CHUNK = 100  # items per random stream
BATCH = 8  # items rendered together (small: the half-pixel grids stay in cache)
SKY_DEPTH = 1000.0  # metres
WALL_FAR = 400.0  # walls end here (the street runs on to the horizon)
OBJECT_FAR = 90.0  # objects farther away are not drawn
SEGMENTS, HEDGES = 12, 6  # wall / hedge segments per side
CAR_ROWS, CARS_PER_ROW = 6, 4  # parking left, lanes 0-3, parking right
PERSONS, POLES, SIGNS, TREES = 14, 8, 3, 10
PARKING_LANE = 2.3
WALL_TYPES = ("building", "vegetation", "open", "street")
SIGN_KINDS = (  # plate shape, rim colour, face colour
    ("circle", (0.8, 0.1, 0.1), (0.95, 0.95, 0.95)),
    ("triangle", (0.8, 0.1, 0.1), (0.95, 0.95, 0.95)),
    ("circle", (0.95, 0.95, 0.95), (0.1, 0.3, 0.75)),
    ("square", (0.95, 0.95, 0.95), (0.1, 0.3, 0.75)),
    ("diamond", (0.15, 0.15, 0.15), (0.95, 0.8, 0.1)),
)

Array = np.ndarray
Range = tuple[float, float]


@dataclass(frozen=True)
class City:
    """Layout statistics of a city: (low, high) ranges and probabilities (per slot or per side)."""

    id: int
    lanes: tuple[int, int]
    lane_width: Range
    sidewalk: Range
    setback: Range
    grass: float  # a setback is terrain (else paved)
    height: Range  # building height, metres
    length: Range  # wall segment length along the road
    walls: tuple[float, float, float, float]  # P(building, vegetation, open, street) per segment
    facade_hue: Range
    facade_sat: Range
    facade_val: Range
    paving_hue: Range
    paving_sat: Range
    cars: float
    parked: float
    persons: float
    poles: float
    signs: float
    trees: float
    hedges: float
    shadows: float
    crosswalk: float


CITIES: dict[str, City] = {
    "source": City(
        id=0, lanes=(2, 4), lane_width=(2.9, 3.6), sidewalk=(1.5, 4.0), setback=(0.0, 8.0), grass=0.6,
        height=(5.0, 25.0), length=(8.0, 30.0), walls=(0.6, 0.2, 0.12, 0.08),
        facade_hue=(0.0, 1.0), facade_sat=(0.05, 0.45), facade_val=(0.35, 0.85),
        paving_hue=(0.0, 1.0), paving_sat=(0.0, 0.15), cars=0.3, parked=0.4, persons=0.15, poles=0.75,
        signs=0.3, trees=0.45, hedges=0.3, shadows=0.25, crosswalk=0.2,
    ),
    "target": City(
        id=1, lanes=(2, 3), lane_width=(2.8, 3.3), sidewalk=(2.5, 5.0), setback=(0.0, 1.0), grass=0.1,
        height=(18.0, 50.0), length=(10.0, 25.0), walls=(0.88, 0.03, 0.01, 0.08),
        facade_hue=(0.05, 0.16), facade_sat=(0.0, 0.22), facade_val=(0.4, 0.85),
        paving_hue=(0.05, 0.15), paving_sat=(0.0, 0.1), cars=0.6, parked=0.8, persons=0.5, poles=0.9,
        signs=0.45, trees=0.2, hedges=0.05, shadows=0.2, crosswalk=0.5,
    ),
    "proximity": City(
        id=2, lanes=(3, 4), lane_width=(3.2, 3.7), sidewalk=(2.5, 5.0), setback=(0.0, 2.0), grass=0.15,
        height=(15.0, 45.0), length=(10.0, 25.0), walls=(0.84, 0.06, 0.02, 0.08),
        facade_hue=(-0.02, 0.07), facade_sat=(0.3, 0.6), facade_val=(0.3, 0.7),
        paving_hue=(-0.03, 0.05), paving_sat=(0.15, 0.35), cars=0.55, parked=0.7, persons=0.45,
        poles=0.85, signs=0.4, trees=0.25, hedges=0.1, shadows=0.9, crosswalk=0.4,
    ),
    "suburb": City(
        id=3, lanes=(2, 2), lane_width=(2.8, 3.4), sidewalk=(1.2, 2.5), setback=(3.0, 12.0), grass=0.9,
        height=(3.0, 10.0), length=(8.0, 22.0), walls=(0.45, 0.3, 0.2, 0.05),
        facade_hue=(0.0, 1.0), facade_sat=(0.1, 0.5), facade_val=(0.45, 0.9),
        paving_hue=(0.0, 1.0), paving_sat=(0.0, 0.1), cars=0.12, parked=0.25, persons=0.06, poles=0.6,
        signs=0.2, trees=0.7, hedges=0.6, shadows=0.3, crosswalk=0.05,
    ),
}  # fmt: skip

# Cityscapes colours for masks.
PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (107, 142, 35), (70, 130, 180),
    (0, 0, 142), (220, 20, 60), (153, 153, 153), (152, 251, 152), (220, 220, 0),
)  # fmt: skip


def palette() -> Array:
    """Mask colours, uint8 ``[256,3]``: Cityscapes colours for the classes, black elsewhere (ignore)."""
    out = np.zeros((256, 3), np.uint8)
    out[: len(PALETTE)] = PALETTE
    return out


# ---------------------------------------------------------------- content


def _hsv(h: Array | float, s: Array | float, v: Array | float) -> Array:
    """RGB in [0,1] from hue/saturation/value arrays (broadcast), ``[...,3]``."""
    h, s, v = np.broadcast_arrays(np.asarray(h, float), np.asarray(s, float), np.asarray(v, float))
    k = (np.array([5.0, 3.0, 1.0]) + (h % 1.0)[..., None] * 6) % 6
    return v[..., None] * (1 - s[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1))


class _Sampler:
    """Draws ``[n, *shape]`` arrays from one generator."""

    def __init__(self, rng: np.random.Generator, n: int) -> None:
        self.rng, self.n = rng, n

    def u(self, lo: float, hi: float, *shape: int) -> Array:
        return self.rng.uniform(lo, hi, (self.n, *shape))

    def p(self, prob: float, *shape: int) -> Array:
        return self.rng.random((self.n, *shape)) < prob

    def integers(self, lo: int, hi: int, *shape: int) -> Array:
        return self.rng.integers(lo, hi + 1, (self.n, *shape))

    def hsv(self, h: Range, s: Range, v: Range, *shape: int) -> Array:
        return _hsv(self.u(*h, *shape), self.u(*s, *shape), self.u(*v, *shape))


def draw_content(
    rng: np.random.Generator, city: City, size: tuple[int, int], n: int = CHUNK
) -> dict[str, Array]:
    """Every random choice of ``n`` scenes (style independent) as arrays; lengths in metres.

    Sides are indexed 0 = left, 1 = right; lateral positions ``X`` are signed (left negative).
    """
    s, (h, w) = _Sampler(rng, n), size
    c: dict[str, Array] = {"f": w * s.u(0.95, 1.15), "cx": w * s.u(0.42, 0.58), "yh": h * s.u(0.36, 0.5)}
    c["ch"] = s.u(1.2, 1.7)  # camera height
    # road: driving lanes 0..nl-1 from the left, the left half oncoming, the camera in the right half
    nl = s.integers(*city.lanes)
    lw = s.u(*city.lane_width)
    ego = nl // 2 + np.floor(s.u(0, 1) * (nl - nl // 2))
    shift = s.u(-0.3, 0.3)
    drive = np.stack([(ego + 0.5) * lw + shift, (nl - ego - 0.5) * lw - shift], 1)  # |X| of the lane edges
    park = s.p(city.parked, 2)
    red = drive + PARKING_LANE * park  # |X| of the curbs
    sed = red + s.u(*city.sidewalk, 2)
    c.update(nl=nl, lw=lw, ego=ego, drive=drive, park=park, red=red, sed=sed)
    c["bed"] = sed + s.u(*city.setback, 2)  # |X| of the wall line
    c["grass"] = s.p(city.grass, 2)  # setback is terrain (else paved)
    _draw_walls(c, s, city)
    # markings: dash period, duty, phase, line width; crosswalk depth (inf: none); paving tile size
    c["dash"] = np.stack([s.u(6.0, 12.0), s.u(0.3, 0.55), s.u(0.0, 12.0), s.u(0.1, 0.16)], 1)
    c["yellow"], c["solid"], c["edge_lines"] = s.p(0.3), s.p(0.5), s.p(0.6)
    c["crosswalk"] = np.where(s.p(city.crosswalk), s.u(8.0, 30.0), np.inf)
    c["tile"] = s.u(0.5, 1.2)
    # colours and light
    horizon = s.hsv((0.55, 0.62), (0.03, 0.2), (0.8, 0.97))
    zenith = np.where(s.p(0.3)[:, None], horizon * 0.85, s.hsv((0.56, 0.63), (0.25, 0.65), (0.6, 0.9)))
    c["sky"] = np.stack([horizon, zenith], 1)
    c["clouds"] = s.u(0, 1, 3, 4) * [3.0, 3.0, 2 * np.pi, 0.5] + [0.5, 0.5, 0, 0]  # x/y freq, phase, amount
    c["road"] = s.hsv((0, 1), (0.0, 0.08), (0.22, 0.42))
    c["mark"] = s.hsv((0, 1), (0.0, 0.05), (0.75, 0.95))
    c["mark_y"] = s.hsv((0.11, 0.14), (0.6, 0.85), (0.7, 0.9))
    c["paving"] = s.hsv(city.paving_hue, city.paving_sat, (0.45, 0.7))
    c["curb"] = np.minimum(c["paving"] * s.u(1.1, 1.3)[:, None], 1)
    c["terrain"] = s.hsv((0.15, 0.28), (0.3, 0.6), (0.3, 0.55))
    c["leaves"] = s.hsv((0.22, 0.36), (0.35, 0.7), (0.15, 0.4))
    c["gain"] = s.u(0.85, 1.15)[:, None] * np.exp(s.u(-0.05, 0.05, 3))
    sun = s.integers(0, 1)
    c["light"] = np.where(np.arange(2) == sun[:, None], 1.0, s.u(0.6, 0.85, 2))  # facade brightness per side
    # shadows of the shady side's walls on the ground: length per metre of height (0: none), darkness
    c["shadow"] = np.stack([np.where(s.p(city.shadows), s.u(0.3, 1.2), 0.0), s.u(0.45, 0.65)], 1)
    c["shadow_side"] = 1 - sun
    c["lit"] = s.u(0.2, 0.6)  # share of windows lit at night
    _draw_cars(c, s, city)
    _draw_street(c, s, city)
    c["noise_seed"] = s.integers(0, 2**31 - 1)
    c["noise"] = s.u(0.005, 0.02)
    return c


def _draw_walls(c: dict[str, Array], s: _Sampler, city: City) -> None:
    """Wall segments along each side (building, tree line, open field, cross street) and hedges."""
    seg = (2, SEGMENTS)
    wtype = s.rng.choice(len(WALL_TYPES), (s.n, *seg), p=city.walls)
    length = np.where(wtype == 3, s.u(8.0, 14.0, *seg), s.u(*city.length, *seg))
    start = -s.u(0.0, 12.0, 2, 1)
    c["wbound"] = np.concatenate([start, start + np.cumsum(length, -1)], -1)
    c["wtype"] = wtype
    c["wheight"] = np.select([wtype == 0, wtype == 1], [s.u(*city.height, *seg), s.u(4.0, 11.0, *seg)], 0.0)
    c["facade"] = s.hsv(city.facade_hue, city.facade_sat, city.facade_val, *seg)
    dark, shiny = (
        s.hsv((0.55, 0.65), (0.1, 0.4), (0.08, 0.3), *seg),
        s.hsv((0.55, 0.62), (0.05, 0.25), (0.45, 0.75), *seg),
    )
    c["glass"] = np.where(s.p(0.25, *seg)[..., None], shiny, dark)
    c["floor"], c["bay"] = s.u(2.8, 3.8, *seg), s.u(1.6, 3.4, *seg)  # storey height, window spacing
    c["win_w"], c["win_h"] = s.u(0.3, 0.75, *seg), s.u(0.35, 0.7, *seg)  # window share of a bay / storey
    c["shop"] = np.where(s.p(0.5, *seg), s.u(3.0, 4.5, *seg), 0.0)  # shop-front storey height (0: none)
    c["bump"] = s.u(0, 1, *seg, 3) * [2.0, 0.6, 2 * np.pi] + [0.5, 0.25, 0]  # tree-line top: amp, freq, phase
    start = -s.u(0.0, 10.0, 2, 1)
    c["hbound"] = np.concatenate([start, start + np.cumsum(s.u(5.0, 20.0, 2, HEDGES), -1)], -1)
    c["hheight"] = np.where(s.p(city.hedges, 2, HEDGES), s.u(0.7, 1.5, 2, HEDGES), 0.0)


def _draw_cars(c: dict[str, Array], s: _Sampler, city: City) -> None:
    """Cars in rows (parking left, lanes 0-3, parking right), front to back with random gaps."""
    rows, per = CAR_ROWS, CARS_PER_ROW
    lane = np.arange(rows) - 1
    parked = (lane < 0) | (lane == rows - 2)
    x = -c["drive"][:, :1] + (lane + 0.5) * c["lw"][:, None]
    x[:, 0], x[:, -1] = -c["red"][:, 0] + PARKING_LANE / 2, c["red"][:, 1] - PARKING_LANE / 2
    valid = np.where(parked, c["park"][:, (lane > 0).astype(int)], lane < c["nl"][:, None])
    first = np.where(lane == c["ego"][:, None], s.u(6.0, 20.0, rows), s.u(3.0, 15.0, rows))
    length = s.u(3.9, 4.8, rows, per)
    step = length + np.where(parked[:, None], s.u(0.8, 6.0, rows, per), s.u(3.0, 30.0, rows, per))
    van = s.p(0.15, rows, per)
    height = np.where(van, s.u(1.9, 2.3, rows, per), s.u(1.35, 1.6, rows, per))
    grey = _hsv(0, 0, s.u(0.08, 0.92, rows, per))
    paint = np.where(
        s.p(0.55, rows, per)[..., None], grey, s.hsv((0, 1), (0.4, 0.9), (0.25, 0.85), rows, per)
    )
    prob = np.where(parked, city.parked, city.cars)[:, None]
    oncoming = (lane < c["nl"][:, None] // 2) & ~parked
    cars = {
        "x": x[..., None] + s.u(-0.25, 0.25, rows, per) * ~parked[:, None],
        "z": first[..., None] + np.cumsum(step, -1) - step,
        "w": s.u(1.65, 1.95, rows, per),
        "l": length,
        "h": height,
        "hb": height * np.where(van, 0.55, s.u(0.52, 0.62, rows, per)),  # top of the lower body
        "van": van,
        "front": np.repeat(oncoming[..., None], per, -1),
        "on": valid[..., None] & (s.rng.random((s.n, rows, per)) < prob),
        "paint": paint,
        "glass": s.hsv((0.55, 0.65), (0.1, 0.3), (0.05, 0.2), rows, per),
    }
    c.update({f"car_{k}": v.reshape(s.n, rows * per, *v.shape[3:]) for k, v in cars.items()})


def _draw_street(c: dict[str, Array], s: _Sampler, city: City) -> None:
    """Persons, poles (street lamps) with signs, sign posts and trees."""
    red, sed = c["red"], c["sed"]
    # persons on the sidewalks, a few crossing near the curb
    side = s.integers(0, 1, PERSONS)
    curb, outer = np.take_along_axis(red, side, 1), np.take_along_axis(sed, side, 1)
    walk = curb + 0.3 + (outer - curb - 0.6) * s.u(0, 1, PERSONS)
    c["person_x"] = (2 * side - 1) * np.where(s.p(0.1, PERSONS), curb - s.u(0.3, 2.5, PERSONS), walk)
    c["person_z"] = 4.0 + 56.0 * s.u(0, 1, PERSONS) ** 1.4
    c["person_h"], c["person_w"] = s.u(1.5, 1.9, PERSONS), s.u(0.85, 1.2, PERSONS)
    c["person_stride"] = s.u(0.0, 0.2, PERSONS)
    c["person_on"] = s.p(city.persons, PERSONS)
    c["person_skin"] = s.hsv((0.03, 0.1), (0.2, 0.6), (0.3, 0.9), PERSONS)
    c["person_hair"] = s.hsv((0.02, 0.1), (0.2, 0.7), (0.05, 0.45), PERSONS)
    c["person_top"] = s.hsv((0, 1), (0.0, 0.9), (0.1, 0.95), PERSONS)
    c["person_legs"] = s.hsv((0, 1), (0.0, 0.6), (0.05, 0.6), PERSONS)
    # poles near the curb, evenly spaced on one or both sides; lamp arms reach over the road
    both = s.p(0.5)[:, None]
    k = np.arange(POLES)
    side = np.where(both, k % 2, s.integers(0, 1, 1))
    spacing = s.u(12.0, 30.0, 1)
    c["pole_z"] = 5.0 + (s.u(0, 1, 1) + np.where(both, k // 2, k)) * spacing + s.u(-2.0, 2.0, POLES)
    c["pole_x"] = (2 * side - 1) * (np.take_along_axis(red, side, 1) + s.u(0.3, 0.6, POLES))
    c["pole_h"], c["pole_r"] = s.u(5.0, 9.0, POLES), s.u(0.06, 0.12, POLES)
    c["pole_arm"] = np.where(s.p(0.6, POLES), s.u(0.8, 2.2, POLES), 0.0) * (1 - 2 * side)
    c["pole_on"] = s.p(city.poles, POLES)
    c["pole_colour"] = s.hsv((0.2, 0.5), (0.0, 0.3), (0.15, 0.6), POLES)
    # a sign on a pole: present, kind, size, height of its centre
    c["pole_sign"], c["pole_kind"] = s.p(city.signs, POLES), s.integers(0, len(SIGN_KINDS) - 1, POLES)
    c["pole_size"], c["pole_sign_v"] = s.u(0.55, 0.85, POLES), s.u(2.2, 3.0, POLES)
    # sign posts
    side = s.integers(0, 1, SIGNS)
    c["sign_x"] = (2 * side - 1) * (np.take_along_axis(red, side, 1) + s.u(0.3, 1.2, SIGNS))
    c["sign_z"], c["sign_kind"] = s.u(6.0, 50.0, SIGNS), s.integers(0, len(SIGN_KINDS) - 1, SIGNS)
    c["sign_size"], c["sign_v"] = s.u(0.5, 0.8, SIGNS), s.u(1.8, 2.6, SIGNS)
    c["sign_on"] = s.p(city.signs * 0.7, SIGNS)
    # trees along the outer sidewalk edge, or in the middle of wide grass setbacks
    side = np.arange(TREES) % 2
    spacing = s.u(7.0, 15.0, 2)[:, side]
    c["tree_z"] = 4.0 + (s.u(0, 1, 2)[:, side] + np.arange(TREES) // 2) * spacing + s.u(-1.0, 1.0, TREES)
    in_grass = (c["grass"] & (c["bed"] - sed > 2.0))[:, side]
    x = np.where(in_grass, (sed + (c["bed"] - sed) / 2)[:, side], sed[:, side] - s.u(0.5, 0.9, TREES))
    c["tree_x"] = (2 * side - 1) * x
    c["tree_h"], c["tree_r"], c["tree_crown"] = (
        s.u(1.8, 3.2, TREES),
        s.u(0.1, 0.2, TREES),
        s.u(1.3, 2.8, TREES),
    )
    c["tree_on"] = s.p(city.trees, TREES)
    c["tree_leaves"] = s.hsv((0.2, 0.36), (0.35, 0.7), (0.15, 0.45), TREES)
    c["tree_bark"] = s.hsv((0.05, 0.1), (0.3, 0.6), (0.15, 0.35), TREES)
    c["tree_lobes"] = s.u(0, 1, TREES, 4, 3) * [1.2, 0.9, 0.3] + [-0.6, -0.4, 0.55]  # du, dv, radius / crown
    c["tree_phase"] = s.u(0.0, 2 * np.pi, TREES)


# ---------------------------------------------------------------- rendering: background

M_SKY, M_ROAD, M_MARK, M_MARK_Y, M_PAVING, M_CURB, M_TERRAIN, M_LEAVES = range(8)
M_FACADE = 8  # + side * SEGMENTS + segment; glass follows the facades
MAT_CLASS = np.array(
    [SKY, ROAD, ROAD, ROAD, SIDEWALK, SIDEWALK, TERRAIN, VEGETATION] + [BUILDING] * 4 * SEGMENTS, np.uint8
)
WARM = np.array([1.0, 0.8, 0.45], np.float32)  # lamp and window light
F32 = np.float32


def _background(c: dict[str, Array], size: tuple[int, int]) -> tuple[Array, Array, Array, Array]:
    """Ground, walls, hedges and sky on the half-pixel grid.

    Returns colour ``[n,3,Hs,Ws]`` (sky black), label, depth and window lights ``[n,Hs,Ws]``.
    """
    h, w = size
    n = len(c["f"])
    xs, ys = np.arange(2 * w + 1, dtype=F32) / 2, np.arange(2 * h + 1, dtype=F32) / 2
    f, cx, yh, ch = (c[k].astype(F32)[:, None] for k in ("f", "cx", "yh", "ch"))
    ii = np.arange(n)[:, None]
    dy = ys - yh  # [n,Hs]: rows below the horizon
    ground = dy > 0.02
    z_row = np.where(ground, f * ch / np.maximum(dy, 0.02), F32(SKY_DEPTH))  # ground depth per row
    dxf = (xs - cx) / f  # [n,Ws]: X / z
    side = (dxf >= 0).astype(np.intp)  # which side each column looks at
    adx = np.maximum(np.abs(dxf), F32(1e-4))

    def per_col(a: Array) -> Array:  # [n,2] per side -> [n,1,Ws]
        return np.take_along_axis(a, side, 1)[:, None, :]

    # walls: the wall line of a column is a vertical plane at one depth
    zc = per_col(c["bed"].astype(F32))[:, 0] / adx
    bounds = c["wbound"][ii, side]  # [n,Ws,K+1]
    seg = np.minimum((bounds[..., 1:] <= zc[..., None]).sum(-1), SEGMENTS - 1)
    along = zc - np.take_along_axis(bounds, seg[..., None], -1)[..., 0]

    def col(key: str) -> Array:  # per-column value of the wall segment, [n,1,Ws]
        return c[key][ii, side, seg].astype(F32)[:, None]

    wtype, top, bump = c["wtype"][ii, side, seg][:, None], col("wheight"), c["bump"][ii, side, seg]
    top = np.where(wtype == 1, top + (bump[..., 0] * np.sin(zc * bump[..., 1] + bump[..., 2]))[:, None], top)
    height = ch[..., None] - dy[..., None] * (zc / f)[:, None]  # height above ground on the wall plane
    wall = ((wtype <= 1) & (zc < WALL_FAR)[:, None]) & (height >= 0) & (height <= top)
    bay, floor, shop = col("bay"), col("floor"), col("shop")
    in_bay = np.abs(np.mod(along[:, None], bay) / bay - 0.5)
    storey = (height - shop) / floor  # in storeys above the shop front
    level = np.floor(storey)
    fy = storey - level
    building = wall & (wtype == 0)
    windows = (in_bay < col("win_w") / 2) & (np.abs(fy - 0.5) < col("win_h") / 2) & (storey > 0.3 / floor)
    windows &= height < top - 0.8
    shops = (in_bay < 0.42) & (height > 0.4) & (height < shop - 0.5)
    glass = building & (windows | shops)

    # hedges: another line of planes, in front of the walls
    zh = (per_col(c["sed"].astype(F32))[:, 0] + 0.3) / adx
    hb = c["hbound"][ii, side]
    hseg = np.minimum((hb[..., 1:] <= zh[..., None]).sum(-1), HEDGES - 1)
    htop = np.where(
        c["hheight"][ii, side, hseg] > 0, c["hheight"][ii, side, hseg] + 0.12 * np.sin(zh * 2.3), -1
    )
    hh = ch[..., None] - dy[..., None] * (zh / f)[:, None]
    hedge = (hh >= 0) & (hh <= htop[:, None].astype(F32)) & (zh < zc)[:, None]

    # ground: lateral position X of each ground sample
    x = dxf[:, None, :] * z_row[:, :, None]
    ax = np.abs(x)
    red, sed, bed, drive = (per_col(c[k].astype(F32)) for k in ("red", "sed", "bed", "drive"))
    row_seg = [
        np.minimum((c["wbound"][:, s, None, 1:] <= z_row[..., None]).sum(-1), SEGMENTS - 1) for s in (0, 1)
    ]
    street_row = [np.take_along_axis(c["wtype"][:, s], row_seg[s], 1) == 3 for s in (0, 1)]
    street = np.where(side[:, None] == 1, street_row[1][..., None], street_row[0][..., None])
    setback = per_col(np.where(c["grass"], M_TERRAIN, M_PAVING).astype(np.uint8))
    mat = np.where(ax <= sed, np.uint8(M_PAVING), np.where(ax <= bed, setback, np.uint8(M_TERRAIN)))
    mat[ax <= red + 0.2] = M_CURB
    road = ax <= red
    mat[road | street] = M_ROAD
    period, duty, phase, width = (c["dash"][:, k].astype(F32)[:, None] for k in range(4))
    lw, nl = c["lw"].astype(F32)[:, None, None], c["nl"][:, None, None]
    across = x + c["drive"][:, :1, None].astype(F32)  # from the left lane edge
    j = np.rint(across / lw)
    lines = (np.abs(across - j * lw) < width[..., None] / 2) & (j >= 1) & (j <= nl - 1)
    centre = j == nl // 2
    dashed = (np.mod(z_row + phase, period) < duty * period)[..., None]
    lines &= dashed | (centre & c["solid"][:, None, None])
    edge = c["edge_lines"][:, None, None] & (ax <= drive - 0.2) & (ax >= drive - 0.2 - width[..., None])
    cw = c["crosswalk"][:, None]
    mat[(lines | edge) & road] = M_MARK
    mat[lines & road & centre & c["yellow"][:, None, None]] = M_MARK_Y
    rows = (z_row >= cw) & (z_row <= cw + 3.5)  # crosswalk stripes
    stripes = (np.mod(x[rows], 1.2) < 0.6) & (ax[rows] < np.broadcast_to(red, ax.shape)[rows] - 0.3)
    mat[rows] = np.where(stripes, np.uint8(M_MARK), mat[rows])

    # shading: facade light per side, storey lines, window reflections, paving joints, wall shadows
    shade = np.where(wall, per_col(c["light"].astype(F32)) * np.where(fy < 0.05, F32(0.85), F32(1)), F32(1))
    bays = np.broadcast_to(np.floor(along / bay[:, 0])[:, None], glass.shape)
    rnd = _hash01(bays[glass].astype(np.int32), level[glass].astype(np.int32))  # one number per window
    shade[glass] = 0.75 + 0.5 * rnd
    tile = c["tile"].astype(F32)[:, None, None]
    paved = mat == M_PAVING
    across_tiles = np.mod(ax[paved], np.broadcast_to(tile, ax.shape)[paved])
    along_tiles = np.mod(
        np.broadcast_to(z_row[..., None], ax.shape)[paved], np.broadcast_to(tile, ax.shape)[paved]
    )
    shade[paved] = np.where((across_tiles < 0.05) | (along_tiles < 0.05), F32(0.85), shade[paved])
    ss = c["shadow_side"]
    cast = np.where(
        ss[:, None] == 1, *[np.take_along_axis(c["wheight"][:, s], row_seg[s], 1) for s in (1, 0)]
    )
    reach = (c["bed"][np.arange(n), ss][:, None] - cast * c["shadow"][:, :1]).astype(F32)
    shadow = ((2 * ss - 1)[:, None, None] * x >= reach[..., None]) & (cast > 0)[..., None] & ground[..., None]
    shade[shadow] *= np.broadcast_to(c["shadow"][:, 1, None, None].astype(F32), shadow.shape)[shadow]

    # compose: ground, walls, glass, hedges, sky
    mat = np.where(ground[..., None], mat, np.uint8(M_SKY))
    facade = (M_FACADE + side * SEGMENTS + seg).astype(np.uint8)[:, None]
    mat = np.where(wall, np.where(wtype == 0, facade, np.uint8(M_LEAVES)), mat)
    mat = np.where(glass, facade + np.uint8(2 * SEGMENTS), mat)
    mat = np.where(hedge, np.uint8(M_LEAVES), mat)
    depth = np.where(ground, z_row, F32(SKY_DEPTH))[..., None]
    depth = np.where(hedge, zh[:, None], np.where(wall, zc[:, None], depth))
    parts = ["road", "mark", "mark_y", "paving", "curb", "terrain", "leaves"]
    walls = [c["facade"].reshape(n, -1, 3), c["glass"].reshape(n, -1, 3)]
    pal = np.concatenate([np.zeros((n, 1, 3)), *[c[k][:, None] for k in parts], *walls], 1).astype(F32)
    index = mat + (np.arange(n, dtype=np.int32) * pal.shape[1])[:, None, None]
    img = np.stack([np.take(pal[..., k].ravel(), index) * shade for k in range(3)], 1)  # [n,3,Hs,Ws]
    lights = np.zeros(mat.shape, F32)
    lit = np.broadcast_to(c["lit"].astype(F32)[:, None, None], glass.shape)[glass]
    lights[glass] = np.where(rnd < lit, 0.5 + 0.5 * rnd, 0)
    return img, MAT_CLASS[mat], depth, lights


def _sky(c: dict[str, Array], size: tuple[int, int]) -> Array:
    """Sky colour at the pixel centres: a vertical gradient with soft clouds, ``[N,3,H,W]``."""
    h, w = size
    x, y = np.arange(w, dtype=F32) + 0.5, (np.arange(h, dtype=F32) + 0.5)[:, None]
    yh = c["yh"].astype(F32)[:, None]
    t = (np.clip((yh - y[:, 0]) / np.maximum(yh, 1), 0, 1) ** 0.7)[:, None, :, None]  # [n,1,H,1]
    sky = (c["sky"][:, 0, :, None, None] * (1 - t) + c["sky"][:, 1, :, None, None] * t).astype(F32)
    cl = c["clouds"].astype(F32)[..., None, None]
    field = sum(
        cl[:, k, 3]
        * np.sin(cl[:, k, 0] * 6.28 * x / w + cl[:, k, 2])
        * np.sin(cl[:, k, 1] * 6.28 * y / h + 1.7 * cl[:, k, 2])
        for k in range(3)
    )
    return sky + (0.95 - sky) * np.clip(field, 0, 1)[:, None]


# ---------------------------------------------------------------- rendering: objects
# Objects of one kind are evaluated together on the flat list of grid samples inside their screen
# boxes, then every object sample is z-buffered into the grid in one pass.

Layer = tuple[Array, Array, Array, Array, Array, Array, Array]  # item, row, col, depth, label, colour, glow
SIGN_SHAPES = ("circle", "triangle", "square", "diamond")
SIGN_SHAPE = np.array([SIGN_SHAPES.index(k[0]) for k in SIGN_KINDS])
SIGN_RIM, SIGN_FACE = (np.array([k[i] for k in SIGN_KINDS], F32) for i in (1, 2))
LAMP = (1.0, 0.95, 0.85)


def _instances(c: dict[str, Array], kind: str) -> dict[str, Array]:
    """Per-object parameters of the drawn objects of one kind, with their item index and camera."""
    on = c[kind + "_on"] & (c[kind + "_z"] > 2.5) & (c[kind + "_z"] < OBJECT_FAR)
    item, slot = np.nonzero(on)
    o = {k[len(kind) + 1 :]: c[k][item, slot] for k in c if k.startswith(kind + "_")}
    return {**o, "item": item, **{k: c[k][item] for k in ("f", "cx", "yh", "ch")}}


def _subset(o: dict[str, Array], keep: Array) -> dict[str, Array]:
    return {k: v[keep] for k, v in o.items()}


def _samples(x0: Array, x1: Array, y0: Array, y1: Array, hs: int, ws: int) -> tuple[Array, Array, Array]:
    """(object, row, column) of every grid sample inside each object's output-pixel box."""
    ix0, ix1 = (np.clip(e, 0, ws).astype(np.int64) for e in (np.ceil(2 * x0), np.floor(2 * x1) + 1))
    iy0, iy1 = (np.clip(e, 0, hs).astype(np.int64) for e in (np.ceil(2 * y0), np.floor(2 * y1) + 1))
    w, size = np.maximum(ix1 - ix0, 0), np.maximum(ix1 - ix0, 0) * np.maximum(iy1 - iy0, 0)
    obj = np.repeat(np.arange(len(size)), size)
    off = np.arange(len(obj)) - np.repeat(np.cumsum(size) - size, size)
    return obj, iy0[obj] + off // w[obj], ix0[obj] + off % w[obj]


def _billboard(
    o: dict[str, Array], u0: Array, u1: Array, v0: Array, v1: Array, hs: int, ws: int, z: Array
) -> tuple[Array, Array, Array, Array, Array]:
    """Samples of camera-facing planes standing at (x, z): object, row, column, u across and v up (metres)."""
    k = o["f"] / z
    xc, yg = o["cx"] + o["x"] * k, o["yh"] + o["ch"] * k
    obj, iy, ix = _samples(xc + u0 * k, xc + u1 * k, yg - v1 * k, yg - v0 * k, hs, ws)
    k, xc, yg = (a.astype(F32)[obj] for a in (k, xc, yg))
    return obj, iy, ix, (ix.astype(F32) / 2 - xc) / k, (yg - iy.astype(F32) / 2) / k


def _layer(
    o: dict[str, Array],
    obj: Array,
    iy: Array,
    ix: Array,
    keep: Array,
    depth: Array,
    cls: int,
    colour: Array,
    glow: Array | None = None,
) -> Layer:
    """The samples of ``keep`` as a layer for :func:`_draw_objects`."""
    count = int(keep.sum())
    shine = np.zeros(count, F32) if glow is None else glow[keep].astype(F32)
    label = np.full(count, cls, np.uint8)
    return (
        o["item"][obj[keep]],
        iy[keep],
        ix[keep],
        depth[keep].astype(F32),
        label,
        colour[keep].astype(F32),
        shine,
    )


def _g(o: dict[str, Array], obj: Array, *keys: str) -> list[Array]:
    """Per-sample float32 values of per-object parameters."""
    return [o[k].astype(F32)[obj] for k in keys]


def _car_colours(o: dict[str, Array], shade: float) -> Array:
    """Per car ``[K,7,3]``: -, paint, bumper, glass, lamp (head or tail), number plate or hub, tyre."""
    paint, k = o["paint"] * shade, len(o["paint"])
    lamp = np.where(o["front"][:, None], (1.0, 0.95, 0.8), (0.85, 0.05, 0.05))
    plate = np.full((k, 3), 0.85 if shade == 1 else 0.45)
    return np.stack([paint, paint, paint * 0.55, o["glass"], lamp, plate, np.full((k, 3), 0.05)], 1)


def _car_rears(o: dict[str, Array], hs: int, ws: int) -> Layer:
    """The rear (or, oncoming, front) faces of cars: body, cabin, glass, lamps, number plate, tyres."""
    half = o["w"] / 2
    obj, iy, ix, u, v = _billboard(o, -half, half, 0 * half, o["h"], hs, ws, o["z"])
    hw, h, hb = _g(o, obj, "w", "h", "hb")
    hw, au = hw / 2, np.abs(u)
    inset = np.where(o["van"][obj], F32(0.05), 0.1 + 0.2 * np.clip((v - hb) / (h - hb), 0, 1))
    cabin = (au <= hw - inset) & (v > hb) & (v <= h)
    glass = cabin & (au <= hw - inset - 0.08) & (v >= hb + 0.05) & (v <= h - 0.06)
    body = (au <= hw) & (v >= 0.18) & (v <= hb)
    part = np.where(body, np.where(v <= 0.32, 2, 1), np.where(glass, 3, cabin.astype(np.intp)))
    part[(au >= hw - 0.3) & (au <= hw - 0.05) & (v < 0.18)] = 6
    part[(au >= hw - 0.35) & (au <= hw - 0.07) & (v >= hb - 0.27) & (v <= hb - 0.1)] = 4
    part[(au <= 0.26) & (v >= 0.34) & (v <= 0.46)] = 5
    colour = _car_colours(o, 1.0)[obj, part]
    return _layer(o, obj, iy, ix, part > 0, o["z"][obj], CAR, colour, part == 4)


def _car_sides(o: dict[str, Array], hs: int, ws: int) -> Layer:
    """The side of each car that faces the camera axis, a plane in perspective: body, windows, wheels."""
    half = o["w"] / 2
    plane = np.where(
        o["x"] + half < -0.1, o["x"] + half, np.where(o["x"] - half > 0.1, o["x"] - half, np.nan)
    )
    o = {**_subset(o, ~np.isnan(plane)), "plane": plane[~np.isnan(plane)]}
    f, cx, yh, ch, z, length = (o[k] for k in ("f", "cx", "yh", "ch", "z", "l"))
    xa, xb = cx + f * o["plane"] / z, cx + f * o["plane"] / (z + length)
    obj, iy, ix = _samples(
        np.minimum(xa, xb), np.maximum(xa, xb), yh + (ch - o["h"]) * f / z, yh + ch * f / z, hs, ws
    )
    f, cx, yh, ch, z, length, h, hb, plane = _g(o, obj, "f", "cx", "yh", "ch", "z", "l", "h", "hb", "plane")
    zs = f * plane / (ix.astype(F32) / 2 - cx)  # depth on the side plane
    v = ch - (iy.astype(F32) / 2 - yh) * zs / f
    a = np.where(o["front"][obj], z + length - zs, zs - z)  # distance from the rear
    lift = v - hb
    van = o["van"][obj]
    slope = (a >= 0.15 * length + 0.6 * lift) & (a <= 0.75 * length - 0.9 * lift)  # rear window, windscreen
    window = np.where(van, (a >= 0.05 * length) & (a <= 0.95 * length), slope)
    cabin = (lift > 0) & (v <= h) & window
    part = np.where((v >= 0.18) & (lift <= 0), 1, np.where(cabin, np.where(v <= h - 0.07, 3, 1), 0))
    wheel = np.minimum((a - 0.8) ** 2, (a - length + 0.85) ** 2) + (v - 0.32) ** 2
    part = np.where(wheel <= 0.1, np.where(wheel < 0.025, 5, 6), part)
    keep = (part > 0) & (a >= 0) & (a <= length)
    return _layer(o, obj, iy, ix, keep, zs, CAR, _car_colours(o, 0.8)[obj, part])


def _persons(o: dict[str, Array], hs: int, ws: int) -> Layer:
    """Legs, torso, arms and head, about 0.5 m wide."""
    reach = 0.3 * o["w"] + o["stride"]
    obj, iy, ix, u, v = _billboard(o, -reach, reach, 0 * reach, o["h"], hs, ws, o["z"])
    ht, wf, stride = _g(o, obj, "h", "w", "stride")
    au, r = np.abs(u), 0.11 * ht / 1.75
    neck, sh = ht - 2 * r, 0.19 * wf
    head = u * u + (v - ht + r) ** 2 <= r * r
    arms = (au > sh) & (au <= sh + 0.07 * wf) & (v >= 0.45 * ht) & (v <= neck - 0.04)
    legs = (np.abs(au - 0.085 * wf - stride * np.clip(1 - v / (0.5 * ht), 0, 1)) < 0.065 * wf) & (
        v < 0.5 * ht
    )
    part = (((au <= sh) & (v >= 0.48 * ht) & (v <= neck + 0.03)) | arms).astype(np.intp)  # 1: top
    part[legs] = 2
    part[legs & (v < 0.07)] = 3  # shoes
    part[(arms & (v < 0.62 * ht)) | head] = 4  # skin
    part[head & (v > ht - 0.8 * r)] = 5
    k = len(o["top"])
    table = np.stack([o["top"], o["top"], o["legs"], np.full((k, 3), 0.08), o["skin"], o["hair"]], 1)
    return _layer(o, obj, iy, ix, part > 0, o["z"][obj], PERSON, table[obj, part])


def _poles(o: dict[str, Array], hs: int, ws: int) -> list[Layer]:
    """Thin shafts; street lamps have an arm (signed length ``arm``) ending in a lamp head."""
    r = o["r"]
    obj, iy, ix, u, v = _billboard(o, -r, r, 0 * r, o["h"], hs, ws, o["z"])
    colour = o["colour"].astype(F32)
    shafts = _layer(o, obj, iy, ix, np.abs(u) <= r[obj], o["z"][obj], POLE, colour[obj])
    lamps = _subset({**o, "colour": colour}, o["arm"] != 0)
    arm, ht = lamps["arm"], lamps["h"]
    obj, iy, ix, u, v = _billboard(
        lamps, np.minimum(0, arm - 0.35), np.maximum(0, arm + 0.35), ht - 0.22, ht, hs, ws, lamps["z"]
    )
    arm, ht = _g(lamps, obj, "arm", "h")
    head = np.abs(u - arm) <= 0.35
    lamp = head & (v <= ht - 0.15)
    keep = head | ((v >= ht - 0.12) & (u * arm >= 0) & (np.abs(u) <= np.abs(arm)))
    colour = np.where(lamp[:, None], np.asarray(LAMP, F32), lamps["colour"][obj])
    return [shafts, _layer(lamps, obj, iy, ix, keep, lamps["z"][obj], POLE, colour, lamp)]


def _plate(shape: Array, a: Array, b: Array, r: float) -> Array:
    """Inside a sign plate of each sample's shape (an index into SIGN_SHAPES), half-size ``r``."""
    aa, ab = np.abs(a), np.abs(b)
    triangle = (b >= -0.575 * r) & (b <= 1.15 * r - 1.732 * aa)
    return np.choose(shape, [a * a + b * b <= r * r, triangle, np.maximum(aa, ab) <= 0.9 * r, aa + ab <= r])


def _signs(o: dict[str, Array], hs: int, ws: int) -> Layer:
    """Sign plates facing the camera, centred ``v`` metres up, just in front of their post."""
    half = o["size"] / 2
    z = o["z"] - 0.05
    obj, iy, ix, u, v = _billboard(o, -half, half, o["v"] - half, o["v"] + half, hs, ws, z)
    size, vc = _g(o, obj, "size", "v")
    kind = o["kind"][obj]
    a, b = u / size, (v - vc) / size
    inner = _plate(SIGN_SHAPE[kind], a, b, 0.37)
    colour = np.where(inner[:, None], SIGN_FACE[kind], SIGN_RIM[kind])
    return _layer(o, obj, iy, ix, _plate(SIGN_SHAPE[kind], a, b, 0.5), z[obj], SIGN, colour)


def _trees(o: dict[str, Array], hs: int, ws: int) -> list[Layer]:
    """A trunk and a crown of four rough lobes, lighter on top."""
    big, ht, r, lobes = o["crown"], o["h"], o["r"], o["lobes"]
    obj, iy, ix, u, v = _billboard(o, -r, r, 0 * r, ht + big, hs, ws, o["z"])
    trunks = _layer(o, obj, iy, ix, np.abs(u) <= r[obj], o["z"][obj], VEGETATION, o["bark"].astype(F32)[obj])
    du, dv, reach = lobes[..., 0], lobes[..., 1], 1.06 * lobes[..., 2]  # lobe radii with roughness
    u0, u1 = big * (du - reach).min(1), big * (du + reach).max(1)
    v0, v1 = ht + big * (1 + (dv - reach).min(1)), ht + big * (1 + (dv + reach).max(1))
    obj, iy, ix, u, v = _billboard(o, u0, u1, v0, v1, hs, ws, o["z"])
    big, ht, phase = _g(o, obj, "crown", "h", "phase")
    rough = 1 + 0.12 * np.sin(u * 9 / big + phase) * np.sin(v * 9 / big - phase)
    crown = np.zeros(len(u), bool)
    for j in range(4):
        du, dv, rs = (lobes[:, j, q].astype(F32)[obj] for q in range(3))
        pu, pv = u - du * big, v - ht - big * (1 + dv)
        crown |= pu * pu + pv * pv <= (rs * big) ** 2 * rough
    shade = 0.7 + 0.4 * np.clip((v - ht) / (2.5 * big), 0, 1)
    colour = o["leaves"].astype(F32)[obj] * shade[:, None]
    return [trunks, _layer(o, obj, iy, ix, crown, o["z"][obj], VEGETATION, colour)]


def _draw_objects(c: dict[str, Array], img: Array, lab: Array, dep: Array, glow: Array) -> None:
    """Cars, persons, poles, signs and trees, z-buffered into the grids (in place)."""
    hs, ws = lab.shape[1:]
    cars, poles, posts = _instances(c, "car"), _instances(c, "pole"), _instances(c, "sign")
    shafts = {k: np.concatenate([poles[k], posts[k]]) for k in ("item", "f", "cx", "yh", "ch", "x", "z")}
    shafts.update(
        h=np.concatenate([poles["h"], posts["v"]]),
        r=np.concatenate([poles["r"], np.full(len(posts["v"]), 0.04)]),
        arm=np.concatenate([poles["arm"], np.zeros(len(posts["v"]))]),
        colour=np.concatenate([poles["colour"], np.full((len(posts["v"]), 3), 0.5)]),
    )
    signed = _subset(poles, poles["sign"].astype(bool))
    plates = {
        k: np.concatenate([signed[k], posts[k]])
        for k in ("item", "f", "cx", "yh", "ch", "x", "z", "kind", "size")
    }
    plates["v"] = np.concatenate([signed["sign_v"], posts["v"]])
    layers = [
        _car_rears(cars, hs, ws),
        _car_sides(cars, hs, ws),
        _persons(_instances(c, "person"), hs, ws),
        *_poles(shafts, hs, ws),
        _signs(plates, hs, ws),
        *_trees(_instances(c, "tree"), hs, ws),
    ]
    item, iy, ix, depth, label, colour, shine = (np.concatenate(a) for a in zip(*layers))
    key = (item * hs + iy) * ws + ix
    flat = dep.reshape(-1)
    np.minimum.at(flat, key, depth)
    win = depth <= flat[key]
    key = key[win]
    lab.reshape(-1)[key] = label[win]
    glow.reshape(-1)[key] = shine[win]
    key = key + item[win] * (2 * hs * ws)  # channel-first colour
    for k in range(3):
        img.reshape(-1)[key + k * hs * ws] = colour[win, k]


# ---------------------------------------------------------------- rendering: output resolution and styles

# per class: multiplicative texture noise, and how much snow/wetness the surface takes
TEXTURE = np.array([0.08, 0.06, 0.05, 0.3, 0.01, 0.03, 0.05, 0.05, 0.2, 0.03], F32)
GROUND = np.array([0.6, 0.9, 0.1, 0.45, 0.0, 0.2, 0.0, 0.0, 1.0, 0.0], F32)


def _tent(a: Array, axis: int = 1) -> Array:
    """Half-pixel samples (``2H+1``, ``2W+1`` along ``axis``, ``axis + 1``) to pixels: 1-2-1 tent filter."""
    for ax in (axis, axis + 1):
        pick = [slice(None)] * a.ndim
        pick[ax] = slice(0, -2, 2)
        left = a[tuple(pick)]
        pick[ax] = slice(1, None, 2)
        mid = a[tuple(pick)]
        pick[ax] = slice(2, None, 2)
        a = 0.25 * (left + a[tuple(pick)]) + 0.5 * mid
    return a


def _render_batch(c: dict[str, Array], size: tuple[int, int]) -> dict[str, Array]:
    """A few items on the half-pixel grid, reduced to pixels."""
    img, lab, dep, glow = _background(c, size)
    _draw_objects(c, img, lab, dep, glow)
    mask = lab[:, 1::2, 1::2]
    sky = _tent((lab == SKY).astype(F32))
    return {
        "day": (_tent(img, 2) + sky[:, None] * _sky(c, size)).transpose(0, 2, 3, 1),
        "mask": mask,
        "depth": _tent(np.minimum(dep, F32(300))),  # metres
        "emission": glow[:, 1::2, 1::2, None]
        * np.where((mask == BUILDING)[..., None], WARM, img[:, :, 1::2, 1::2].transpose(0, 2, 3, 1)),
        "ground": _tent(GROUND[lab]),
        "sky": sky,
    }


def render_content(c: dict[str, Array], size: tuple[int, int]) -> dict[str, Array]:
    """The day image ``[N,H,W,3]`` in [0,1], the mask, and the per-pixel maps the styles use."""
    n = len(c["f"])
    parts = [_render_batch({k: v[a : a + BATCH] for k, v in c.items()}, size) for a in range(0, n, BATCH)]
    scene = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    noise = np.stack([np.random.default_rng(s).standard_normal((*size, 4), F32) for s in c["noise_seed"]])
    texture = 1 + TEXTURE[scene["mask"]] * noise[..., 0]
    scene["day"] = np.clip(scene["day"] * texture[..., None] * c["gain"][:, None, None].astype(F32), 0, 1)
    scene.update(noise=noise, sigma=c["noise"].astype(F32), yh=c["yh"].astype(F32))  # noise: texture, sensor
    return scene


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


def _write_split(style_dir: Path, split: str, images: Array, masks: Array) -> None:
    """Write PNGs, ``classes.txt`` and ``<split>.npz`` into a temp dir, then rename them into place."""
    style_dir.mkdir(parents=True, exist_ok=True)
    tmp = style_dir / f".{split}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    npz = style_dir / f"{split}.npz"
    try:
        for sub in ("images", "masks"):
            (tmp / sub).mkdir(parents=True)
        for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
            Image.fromarray(image.transpose(1, 2, 0)).save(tmp / "images" / f"{i:05d}.png", compress_level=1)
            Image.fromarray(mask).save(tmp / "masks" / f"{i:05d}.png", compress_level=1)
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


def _names(value: str | Sequence[str], choices: dict, what: str) -> list[str]:
    names = [value] if isinstance(value, str) else list(value)
    if not names:
        raise KdkitError(f"road_scenes needs at least one {what} (available: {', '.join(choices)})")
    for name in names:
        if name not in choices:
            raise KdkitError(f"road_scenes has no {what} '{name}'{did_you_mean(str(name), list(choices))}")
    return names


def _check_sizes(image_size: int | Sequence[int], train_size: int, test_size: int) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and 16 <= s <= 1024 for s in size):
        raise KdkitError(f"road_scenes image_size must be (height, width) in 16..1024, got {image_size!r}")
    for name, value in (("train_size", train_size), ("test_size", test_size)):
        if not isinstance(value, int) or value < 1:
            raise KdkitError(f"road_scenes {name} must be a positive integer, got {value!r}")
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
    cities, styles = _names(city, CITIES, "city"), _names(styles, STYLES, "style")
    size = _check_sizes(image_size, train_size, test_size)
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
