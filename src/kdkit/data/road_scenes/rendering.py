"""Road-scene rendering: materials, background, sky and object layers on a half-pixel grid, z-buffered."""

from __future__ import annotations

import numpy as np

from ..embedded import _hash01
from .layout import (
    BATCH,
    BUILDING,
    CAR,
    CAR_ROWS,
    CARS_PER_ROW,
    HEDGES,
    M_CURB,
    M_LEAVES,
    M_MARK,
    M_MARK_Y,
    M_PAVING,
    M_ROAD,
    M_SKY,
    M_TERRAIN,
    OBJECT_FAR,
    PERSON,
    PERSONS,
    POLE,
    POLES,
    ROAD,
    SEGMENTS,
    SIDEWALK,
    SIGN,
    SIGN_KINDS,
    SIGNS,
    SKY,
    SKY_DEPTH,
    TERRAIN,
    VEGETATION,
    WALL_FAR,
    Array,
)

M_FACADE = 8  # + side * SEGMENTS + segment; glass follows the facades
MAT_CLASS = np.array(
    [SKY, ROAD, ROAD, ROAD, SIDEWALK, SIDEWALK, TERRAIN, VEGETATION] + [BUILDING] * 4 * SEGMENTS, np.uint8
)
# Instance ids of the objects (per item; 0: background or a tree), in blocks by kind and slot:
# cars, persons, pole shafts (with lamp arms), sign-post shafts, signs on poles, signs on posts.
_BLOCKS = (
    ("car", CAR, CAR_ROWS * CARS_PER_ROW), ("person", PERSON, PERSONS), ("pole", POLE, POLES),
    ("post", POLE, SIGNS), ("pole_sign", SIGN, POLES), ("post_sign", SIGN, SIGNS),
)  # fmt: skip
INSTANCE_BASE = dict(zip([b[0] for b in _BLOCKS], 1 + np.cumsum([0] + [b[2] for b in _BLOCKS[:-1]])))
INSTANCE_CLASS = np.array([255] + [cls for _, cls, n in _BLOCKS for _ in range(n)], np.uint8)
"""Class of each instance id (255 for id 0): the mask label of every pixel that shows the instance."""
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

Layer = tuple[Array, Array, Array, Array, Array, Array, Array, Array]
# item, row, col, depth, label, colour, glow, instance id
SIGN_SHAPES = ("circle", "triangle", "square", "diamond")
SIGN_SHAPE = np.array([SIGN_SHAPES.index(k[0]) for k in SIGN_KINDS])
SIGN_RIM, SIGN_FACE = (np.array([k[i] for k in SIGN_KINDS], F32) for i in (1, 2))
LAMP = (1.0, 0.95, 0.85)


def _instances(c: dict[str, Array], kind: str) -> dict[str, Array]:
    """Per-object parameters of the drawn objects of one kind, with their item index and camera."""
    on = c[kind + "_on"] & (c[kind + "_z"] > 2.5) & (c[kind + "_z"] < OBJECT_FAR)
    item, slot = np.nonzero(on)
    o = {k[len(kind) + 1 :]: c[k][item, slot] for k in c if k.startswith(kind + "_")}
    return {**o, "item": item, "slot": slot, **{k: c[k][item] for k in ("f", "cx", "yh", "ch")}}


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
    ids = o["inst"][obj[keep]].astype(np.uint8) if "inst" in o else np.zeros(count, np.uint8)
    return (
        o["item"][obj[keep]],
        iy[keep],
        ix[keep],
        depth[keep].astype(F32),
        label,
        colour[keep].astype(F32),
        shine,
        ids,
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


def _draw_objects(
    c: dict[str, Array], img: Array, lab: Array, dep: Array, glow: Array, ids: Array | None = None
) -> None:
    """Cars, persons, poles, signs and trees, z-buffered into the grids (in place); ``ids`` (uint8 like
    ``lab``) receives the instance id (:data:`INSTANCE_CLASS`) of the front-most object sample."""
    hs, ws = lab.shape[1:]
    cars, poles, posts = _instances(c, "car"), _instances(c, "pole"), _instances(c, "sign")
    persons = _instances(c, "person")
    base = INSTANCE_BASE
    cars["inst"], persons["inst"] = base["car"] + cars["slot"], base["person"] + persons["slot"]
    shafts = {k: np.concatenate([poles[k], posts[k]]) for k in ("item", "f", "cx", "yh", "ch", "x", "z")}
    shafts.update(
        inst=np.concatenate([base["pole"] + poles["slot"], base["post"] + posts["slot"]]),
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
    plates["inst"] = np.concatenate([base["pole_sign"] + signed["slot"], base["post_sign"] + posts["slot"]])
    plates["v"] = np.concatenate([signed["sign_v"], posts["v"]])
    layers = [
        _car_rears(cars, hs, ws),
        _car_sides(cars, hs, ws),
        _persons(persons, hs, ws),
        *_poles(shafts, hs, ws),
        _signs(plates, hs, ws),
        *_trees(_instances(c, "tree"), hs, ws),
    ]
    item, iy, ix, depth, label, colour, shine, instance = (np.concatenate(a) for a in zip(*layers))
    key = (item * hs + iy) * ws + ix
    flat = dep.reshape(-1)
    np.minimum.at(flat, key, depth)
    win = depth <= flat[key]
    key = key[win]
    lab.reshape(-1)[key] = label[win]
    glow.reshape(-1)[key] = shine[win]
    if ids is not None:
        ids.reshape(-1)[key] = instance[win]
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
    ids = np.zeros(lab.shape, np.uint8)
    _draw_objects(c, img, lab, dep, glow, ids)
    mask = lab[:, 1::2, 1::2]
    sky = _tent((lab == SKY).astype(F32))
    return {
        "day": (_tent(img, 2) + sky[:, None] * _sky(c, size)).transpose(0, 2, 3, 1),
        "mask": mask,
        "instance": ids[:, 1::2, 1::2],  # instance ids at the pixel centres, like the mask
        "depth": _tent(np.minimum(dep, F32(300))),  # metres
        "emission": glow[:, 1::2, 1::2, None]
        * np.where((mask == BUILDING)[..., None], WARM, img[:, :, 1::2, 1::2].transpose(0, 2, 3, 1)),
        "ground": _tent(GROUND[lab]),
        "sky": sky,
    }


def render_content(c: dict[str, Array], size: tuple[int, int]) -> dict[str, Array]:
    """The day image ``[N,H,W,3]`` in [0,1], the mask, the instance ids of the objects (uint8 ``[N,H,W]``,
    see :data:`INSTANCE_CLASS`) and the per-pixel maps the styles use."""
    n = len(c["f"])
    parts = [_render_batch({k: v[a : a + BATCH] for k, v in c.items()}, size) for a in range(0, n, BATCH)]
    scene = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    noise = np.stack([np.random.default_rng(s).standard_normal((*size, 4), F32) for s in c["noise_seed"]])
    texture = 1 + TEXTURE[scene["mask"]] * noise[..., 0]
    scene["day"] = np.clip(scene["day"] * texture[..., None] * c["gain"][:, None, None].astype(F32), 0, 1)
    scene.update(noise=noise, sigma=c["noise"].astype(F32), yh=c["yh"].astype(F32))  # noise: texture, sensor
    return scene
