"""Connectors: small trainable adapters that map a student tap's tensor to a teacher tap's shape.

:func:`build_connector` picks the adapter from the two shapes seen in the dry run. Shapes include
the batch dimension, which is ignored (it may differ at run time). Three kinds of tensor exist:

* **vector** ``(B, C)``, e.g. a pooled embedding such as ``"fc:input"``;
* **map** ``(B, C, H, W)``, channels first, e.g. a CNN stage output;
* **tokens** ``(B, N, C)``, e.g. a ViT block output. The first ``k`` tokens may be extra tokens
  (class, distillation or register tokens): ``k`` is the smallest value in ``0..8`` for which
  ``N - k`` is a perfect square ``g * g``, and the remaining tokens form a ``g x g`` grid
  (:func:`token_grid`).

Rules (``src`` -> ``dst``):

* equal shapes: ``nn.Identity`` (no parameters);
* map -> map: 1x1 convolution (no bias) + ``BatchNorm2d`` when the channels differ, then a
  bilinear resize (``align_corners=False``) when the spatial size differs;
* vector -> vector: ``Linear`` (no bias) + ``BatchNorm1d``;
* tokens -> map: drop the extra tokens, fold the grid into a ``(B, C, g, g)`` map, then map -> map;
* map -> tokens: map -> map onto the teacher's token grid ``(g, g)``, then flatten to
  ``(B, g*g, C')``. The output holds **grid tokens only**: a term must compare it with
  ``grid_tokens(teacher)``, not with the teacher's full ``(B, N, C')`` tensor;
* tokens -> tokens with the same count: ``Linear`` on the channels;
* anything else (vector <-> map, token counts without a square grid, different token counts)
  raises :class:`~kdkit.errors.KdkitError` naming both taps and both shapes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import KdkitError

MAX_EXTRA_TOKENS = 8
_KINDS = {1: "vector", 2: "tokens", 3: "map"}


def token_grid(count: int) -> tuple[int, int] | None:
    """``(g, k)`` with ``count - k == g * g`` for the smallest ``k`` in ``0..8``, or None."""
    for extra in range(min(MAX_EXTRA_TOKENS, count - 1) + 1):
        side = math.isqrt(count - extra)
        if side * side == count - extra:
            return side, extra
    return None


def _no_grid(count: int) -> str:
    return f"{count} tokens do not form a square grid after dropping up to {MAX_EXTRA_TOKENS} leading tokens"


def _grid_or_raise(count: int) -> tuple[int, int]:
    grid = token_grid(count)
    if grid is None:
        raise KdkitError(f"{_no_grid(count)}; tap a layer whose tokens form a grid")
    return grid


def grid_tokens(x: Tensor) -> Tensor:
    """The grid part ``(B, g*g, C)`` of a token tensor ``(B, N, C)``: leading extra tokens dropped."""
    _side, extra = _grid_or_raise(x.shape[1])
    return x[:, extra:]


def tokens_to_map(x: Tensor) -> Tensor:
    """Fold the grid tokens of ``(B, N, C)`` into a channels-first map ``(B, C, g, g)``."""
    side, extra = _grid_or_raise(x.shape[1])
    return x[:, extra:].transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


class TokensToMap(nn.Module):
    """``(B, N, C)`` tokens -> ``(B, C, g, g)`` map (see :func:`tokens_to_map`)."""

    def forward(self, x: Tensor) -> Tensor:
        return tokens_to_map(x)


class MapToTokens(nn.Module):
    """``(B, C, H, W)`` map -> ``(B, H*W, C)`` tokens, row-major like a ViT's patch grid."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(2).transpose(1, 2)


class Resize(nn.Module):
    """Bilinear resize of a ``(B, C, H, W)`` map to ``size`` (``align_corners=False``)."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = tuple(size)

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"


def _map_layers(channels: int, out_channels: int, size: tuple[int, int], out_size: tuple[int, int]):
    layers: list[nn.Module] = []
    if channels != out_channels:
        layers += [nn.Conv2d(channels, out_channels, kernel_size=1, bias=False), nn.BatchNorm2d(out_channels)]
    if size != out_size:
        layers.append(Resize(out_size))
    return layers


def _shape_text(shape: torch.Size | tuple[int, ...]) -> str:
    return "(" + ", ".join(["B", *(str(d) for d in shape[1:])]) + ")"


def build_connector(
    src: torch.Size,
    dst: torch.Size,
    src_name: str,
    dst_name: str,
    *,
    src_role: str = "student",
    dst_role: str = "teacher",
) -> nn.Module:
    """A trainable module mapping tensors shaped like ``src`` to ``dst`` (rules in the module doc).

    ``src_name``/``dst_name`` are the tap keys and ``src_role``/``dst_role`` the models they come
    from; both only appear in the error raised when the shapes cannot be bridged.
    """
    s, d = tuple(src[1:]), tuple(dst[1:])

    def fail(why: str) -> KdkitError:
        return KdkitError(
            f"cannot connect {src_role} tap '{src_name}' {_shape_text(src)} to {dst_role} tap "
            f"'{dst_name}' {_shape_text(dst)}: {why}"
        )

    if s == d:
        return nn.Identity()
    kinds = (_KINDS.get(len(s), f"{len(s) + 1}-d tensor"), _KINDS.get(len(d), f"{len(d) + 1}-d tensor"))
    if kinds == ("vector", "vector"):
        return nn.Sequential(nn.Linear(s[0], d[0], bias=False), nn.BatchNorm1d(d[0]))
    if kinds == ("map", "map"):
        return nn.Sequential(*_map_layers(s[0], d[0], s[1:], d[1:]))
    if kinds == ("tokens", "tokens"):
        if s[0] != d[0]:
            raise fail(f"token counts differ ({s[0]} vs {d[0]}); tap layers with the same number of tokens")
        return nn.Linear(s[1], d[1])
    if kinds == ("tokens", "map"):
        grid = token_grid(s[0])
        if grid is None:
            raise fail(_no_grid(s[0]))
        return nn.Sequential(TokensToMap(), *_map_layers(s[1], d[0], (grid[0], grid[0]), d[1:]))
    if kinds == ("map", "tokens"):
        grid = token_grid(d[0])
        if grid is None:
            raise fail(_no_grid(d[0]))
        return nn.Sequential(*_map_layers(s[0], d[1], s[1:], (grid[0], grid[0])), MapToTokens())
    raise fail(
        f"a {kinds[0]} cannot be mapped onto a {kinds[1]}; pick taps of compatible kinds "
        f"(map/tokens to map/tokens, vector to vector)"
    )
