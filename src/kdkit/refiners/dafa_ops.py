"""The feature-map operations of DAFA's search space (SoKD, Shen et al. 2024, Sec. 3.1, "Feature Search
Space"): geometric ones (shear, translate, rotate), masking (cutout), Gaussian noise, channel shuffle and
channel drop, each on a ``(B, C, H, W)`` map with a magnitude ``m`` in [0, 1].

The paper names the kinds of operation, not their ranges; ours keep the feature inside its frame: at
``m = 1`` a shear of 0.3, a shift of a quarter of the side, a rotation of 30 degrees, a cut-out square of
half the shorter side, noise of half the sample's standard deviation, half of the channels shuffled or
dropped. Every operation reads its per-sample randomness from ``rand`` (uniform, ``(B, 4 + C)``: a sign,
a position, then one number per channel) and, for noise, ``noise`` (standard normal, like the map), so
that the caller can draw them for the global batch and slice them per process.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_SHEAR = 0.3
MAX_SHIFT = 0.25  # of the side
MAX_DEGREES = 30.0
MAX_CUTOUT = 0.5  # of the shorter side
MAX_NOISE = 0.5  # of the sample's standard deviation
MAX_CHANNELS = 0.5  # fraction shuffled or dropped


def _sign(rand: Tensor) -> Tensor:
    return torch.where(rand[:, 0] < 0.5, -1.0, 1.0).to(rand)


def _affine(features: Tensor, theta: Tensor) -> Tensor:
    """Resample ``features`` through the ``(B, 2, 3)`` affine map of normalised output to input coordinates
    (bilinear; positions that fall outside the map read 0)."""
    grid = F.affine_grid(theta.to(features.dtype), list(features.shape), align_corners=False)
    return F.grid_sample(features, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _theta(rand: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor, tx: Tensor, ty: Tensor) -> Tensor:
    return torch.stack([torch.stack([a, b, tx], -1), torch.stack([c, d, ty], -1)], 1).to(rand)


def shear_x(features: Tensor, m: Tensor, rand: Tensor, noise: Tensor | None = None) -> Tensor:
    s = _sign(rand) * m * MAX_SHEAR
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    return _affine(features, _theta(rand, one, s, zero, one, zero, zero))


def shear_y(features: Tensor, m: Tensor, rand: Tensor, noise: Tensor | None = None) -> Tensor:
    s = _sign(rand) * m * MAX_SHEAR
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    return _affine(features, _theta(rand, one, zero, s, one, zero, zero))


def translate_x(features: Tensor, m: Tensor, rand: Tensor, noise: Tensor | None = None) -> Tensor:
    """Content moves by ``m * MAX_SHIFT`` of the width (2 normalised units span the map)."""
    t = -_sign(rand) * m * MAX_SHIFT * 2
    one, zero = torch.ones_like(t), torch.zeros_like(t)
    return _affine(features, _theta(rand, one, zero, zero, one, t, zero))


def translate_y(features: Tensor, m: Tensor, rand: Tensor, noise: Tensor | None = None) -> Tensor:
    t = -_sign(rand) * m * MAX_SHIFT * 2
    one, zero = torch.ones_like(t), torch.zeros_like(t)
    return _affine(features, _theta(rand, one, zero, zero, one, zero, t))


def rotate(features: Tensor, m: Tensor, rand: Tensor, noise: Tensor | None = None) -> Tensor:
    angle = _sign(rand) * m * math.radians(MAX_DEGREES)
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    return _affine(features, _theta(rand, cos, -sin, sin, cos, zero, zero))


def cutout(features: Tensor, m: Tensor, rand: Tensor, noise: Tensor | None = None) -> Tensor:
    """Zero a square of side ``round(m * MAX_CUTOUT * min(H, W))`` cells centred on a random cell."""
    height, width = features.shape[-2:]
    side = int(round(float(m) * MAX_CUTOUT * min(height, width)))
    if side == 0:
        return features
    device = features.device
    top = ((rand[:, 1] * height).long().clamp(max=height - 1) - side // 2).to(device).view(-1, 1, 1)
    left = ((rand[:, 2] * width).long().clamp(max=width - 1) - side // 2).to(device).view(-1, 1, 1)
    ys = torch.arange(height, device=device)[None, :, None]
    xs = torch.arange(width, device=device)[None, None, :]
    inside = (ys >= top) & (ys < top + side) & (xs >= left) & (xs < left + side)
    return features * (~inside)[:, None].to(features.dtype)


def gaussian_noise(features: Tensor, m: Tensor, rand: Tensor, noise: Tensor | None = None) -> Tensor:
    """``F + m * MAX_NOISE * std(F_b) * n``, ``n`` standard normal, ``std`` per sample."""
    assert noise is not None
    scale = features.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    return features + m * MAX_NOISE * scale * noise


def channel_shuffle(features: Tensor, m: Tensor, rand: Tensor, noise: Tensor | None = None) -> Tensor:
    """Per sample, ``round(m * MAX_CHANNELS * C)`` channels (those with the smallest ``rand``) trade places
    in a cycle (channel ``j`` of the chosen takes the content of channel ``j - 1``); the rest stay."""
    channels = features.shape[1]
    count = int(round(float(m) * MAX_CHANNELS * channels))
    if count < 2:
        return features
    chosen = rand[:, 4 : 4 + channels].argsort(dim=1)[:, :count].to(features.device)
    index = torch.arange(channels, device=features.device).expand(features.shape[0], -1).clone()
    index.scatter_(1, chosen, chosen.roll(1, dims=1))
    return features.gather(1, index[:, :, None, None].expand_as(features))


def channel_drop(features: Tensor, m: Tensor, rand: Tensor, noise: Tensor | None = None) -> Tensor:
    """Each channel dropped with probability ``p = m * MAX_CHANNELS`` per sample, the rest scaled by
    ``1 / (1 - p)`` (as dropout, so the expected map is unchanged)."""
    p = float(m) * MAX_CHANNELS
    keep = (rand[:, 4 : 4 + features.shape[1]] >= p).to(features)
    return features * keep[:, :, None, None] / (1.0 - p)


Op = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], Tensor]
OPS: dict[str, Op] = {
    "shear_x": shear_x,
    "shear_y": shear_y,
    "translate_x": translate_x,
    "translate_y": translate_y,
    "rotate": rotate,
    "cutout": cutout,
    "noise": gaussian_noise,
    "channel_shuffle": channel_shuffle,
    "channel_drop": channel_drop,
}
