"""Road-scene layout: cities, cameras and the content of each scene (walls, cars, street)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
