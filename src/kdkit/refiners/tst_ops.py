"""TST's 14 hand-made augmentation primitives f_A (Li et al., TST, Sec. 3.4) and the exact affine warp.

Images are float ``[B, 3, H, W]`` in [0, 1]; each image has its own magnitude ``m`` (a float tensor of
shape ``[B]``). Signed ops take ``m`` in [-1, 1], unsigned ops (Posterize, Solarize) ``m`` in [0, 1].
``m`` maps linearly onto AutoAugment's range (Cubuk et al. 2019, as torchvision's ``AutoAugment``
``_augmentation_space`` gives it for ``num_bins=10`` at its largest bin):

============================  =========================================================================
op                            parameter at magnitude ``m``
============================  =========================================================================
Brightness/Color/Contrast/    blend factor ``1 + 0.9 m`` (``adjust_brightness``, ``adjust_saturation``,
Sharpness                     ``adjust_contrast``, ``adjust_sharpness``)
ShearX / ShearY               shear ``0.3 m``: torchvision's affine shear angle ``degrees(atan(0.3 m))``,
                              about the top-left corner (``center=[0, 0]``, as torchvision's AutoAugment)
TranslateX / TranslateY       ``150/331 * W * m`` (``H`` for Y) pixels, not truncated to whole pixels
                              (AutoAugment truncates; a continuous shift keeps the op continuous in ``m``)
Rotate                        ``30 m`` degrees, counter-clockwise, about the image centre
Posterize                     ``round(8 - 4 m)`` bits kept, on the uint8 image (``m = 1`` -> 4 bits)
Solarize                      threshold ``1 - m``: pixels ``>= 1 - m`` become ``1 - x``; ``m = 0`` is the
                              identity (no pixel is inverted), ``m = 1`` inverts every pixel
Equalize / Invert             no magnitude (``equalize`` on the uint8 image, ``1 - x``)
Cutout                        no magnitude: one square of side ``round(16/32 * min(H, W))`` (the 16 px
                              CIFAR cutout of DeVries & Taylor 2017), centre uniform over the image (drawn
                              from ``generator``, clipped at the borders), filled with 0.5 grey
============================  =========================================================================

Affine ops use bilinear interpolation and leave out-of-frame pixels at 0 (torchvision's ``fill=None``,
i.e. plain zero padding, which is what :func:`warp` does, so the two agree to float precision).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from ..errors import KdkitError
from ..registry import did_you_mean

MAGNITUDE_OPS = (
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)
PLAIN_OPS = ("Equalize", "Invert", "Cutout")
PRIMITIVES = MAGNITUDE_OPS + PLAIN_OPS
AFFINE_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
COLOR_OPS = tuple(op for op in MAGNITUDE_OPS if op not in AFFINE_OPS)
SIGNED_OPS = tuple(op for op in MAGNITUDE_OPS if op not in ("Posterize", "Solarize"))

BLEND_MAX = 0.9  # Brightness/Color/Contrast/Sharpness factor 1 + 0.9 m
SHEAR_MAX = 0.3
TRANSLATE_MAX = 150.0 / 331.0  # fraction of the width (height)
ROTATE_MAX = 30.0  # degrees
CUTOUT_FRACTION = 16.0 / 32.0
CUTOUT_FILL = 0.5


def check_op(name: str, kinds: tuple[str, ...] = PRIMITIVES) -> None:
    if name not in kinds:
        raise KdkitError(f"unknown TST primitive '{name}'{did_you_mean(name, kinds)}")


def _magnitudes(name: str, magnitude: Tensor | None, batch: int) -> Tensor:
    if magnitude is None:
        raise KdkitError(
            f"TST primitive '{name}' needs a magnitude per image; pass a tensor of shape [{batch}]"
        )
    m = torch.as_tensor(magnitude, dtype=torch.float64).detach().cpu().reshape(-1)
    if m.numel() == 1 and batch != 1:
        m = m.expand(batch)
    if m.numel() != batch:
        raise KdkitError(
            f"TST primitive '{name}' got {m.numel()} magnitudes for {batch} images; pass one per image"
        )
    return m


def _affine_params(name: str, m: float, size: tuple[int, int]) -> dict:
    """torchvision ``affine`` keyword arguments of an affine op at magnitude ``m``."""
    h, w = size
    params = dict(angle=0.0, translate=[0.0, 0.0], scale=1.0, shear=[0.0, 0.0], center=None)
    if name == "ShearX":
        params.update(shear=[math.degrees(math.atan(SHEAR_MAX * m)), 0.0], center=[0, 0])
    elif name == "ShearY":
        params.update(shear=[0.0, math.degrees(math.atan(SHEAR_MAX * m))], center=[0, 0])
    elif name == "TranslateX":
        params.update(translate=[TRANSLATE_MAX * w * m, 0.0])
    elif name == "TranslateY":
        params.update(translate=[0.0, TRANSLATE_MAX * h * m])
    elif name == "Rotate":
        # F.rotate(angle) is counter-clockwise; F.affine's angle is clockwise
        params.update(angle=-ROTATE_MAX * m)
    return params


def _one(name: str, img: Tensor, m: float) -> Tensor:
    """One image ``[3, H, W]`` (float, [0, 1]) through op ``name`` at magnitude ``m``."""
    if name in ("Brightness", "Color", "Contrast", "Sharpness"):
        factor = 1.0 + BLEND_MAX * m
        fn = {
            "Brightness": TF.adjust_brightness,
            "Color": TF.adjust_saturation,
            "Contrast": TF.adjust_contrast,
            "Sharpness": TF.adjust_sharpness,
        }[name]
        return fn(img, factor)
    if name == "Posterize":
        bits = int(round(8.0 - 4.0 * m))
        u8 = img.mul(255).round_().to(torch.uint8)
        return TF.posterize(u8, bits).to(img.dtype) / 255.0
    if name == "Solarize":
        return TF.solarize(img, 1.0 - m) if m > 0 else img
    if name in AFFINE_OPS:
        return TF.affine(
            img,
            interpolation=TF.InterpolationMode.BILINEAR,
            fill=None,
            **_affine_params(name, m, tuple(img.shape[-2:])),
        )
    raise AssertionError(name)


def cutout(images: Tensor, centres: Tensor) -> Tensor:
    """A ``CUTOUT_FILL`` square of side ``CUTOUT_FRACTION * min(H, W)`` centred at each image's
    ``centres[i] = (row, column)`` (integer pixels), clipped at the borders."""
    _, _, h, w = images.shape
    side = max(1, int(round(CUTOUT_FRACTION * min(h, w))))
    top, left = centres[:, 0] - side // 2, centres[:, 1] - side // 2
    rows = torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device)
    in_rows = (rows[None] >= top[:, None]) & (rows[None] < (top + side)[:, None])  # [B, H]
    in_cols = (cols[None] >= left[:, None]) & (cols[None] < (left + side)[:, None])  # [B, W]
    mask = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # [B, 1, H, W]
    return torch.where(mask, torch.full_like(images, CUTOUT_FILL), images)


def _cutout(images: Tensor, generator: torch.Generator | None) -> Tensor:
    b, _, h, w = images.shape
    cy = torch.randint(0, h, (b,), generator=generator)
    cx = torch.randint(0, w, (b,), generator=generator)
    return cutout(images, torch.stack([cy, cx], dim=1).to(images.device))


@torch.no_grad()
def hand_op(
    name: str, images: Tensor, magnitude: Tensor | None, generator: torch.Generator | None = None
) -> Tensor:
    """Apply hand-made primitive ``name`` to each image with its own magnitude (see the module docstring).

    ``images``: float ``[B, 3, H, W]`` in [0, 1]; ``magnitude``: ``[B]`` (ignored by Equalize, Invert,
    Cutout); ``generator`` draws the Cutout centres. Returns a new tensor clamped to [0, 1]; not
    differentiable (the meta-encoders of :mod:`kdkit.refiners.tst_encoders` are its differentiable stand-ins).
    """
    check_op(name)
    if images.ndim != 4 or images.shape[1] != 3:
        raise KdkitError(f"TST primitive '{name}' needs images [B, 3, H, W], got {list(images.shape)}")
    if name == "Invert":
        return TF.invert(images).clamp(0, 1)
    if name == "Equalize":
        u8 = images.mul(255).round_().to(torch.uint8)
        return (TF.equalize(u8).to(images.dtype) / 255.0).clamp(0, 1)
    if name == "Cutout":
        return _cutout(images, generator)
    m = _magnitudes(name, magnitude, images.shape[0])
    out = torch.stack([_one(name, img, float(mi)) for img, mi in zip(images, m.tolist())])
    return out.clamp_(0, 1)


def batched_op(name: str, images: Tensor, magnitude: Tensor) -> Tensor:
    """Batched twin of :func:`hand_op` for the magnitude ops (same formulas as torchvision's kernels, one
    vectorised call instead of one call per image); the tests check it against :func:`hand_op`.

    Used where speed matters (Stage I fitting draws fresh magnitudes every step). Not differentiable in
    ``magnitude`` (Posterize, Solarize are step functions) but differentiable in ``images`` where the op is.
    """
    check_op(name, MAGNITUDE_OPS)
    m = torch.as_tensor(magnitude, dtype=images.dtype, device=images.device).reshape(-1)
    m = m.expand(images.shape[0]) if m.numel() == 1 else m
    x = images
    if name in AFFINE_OPS:
        return warp(x, affine_matrix(name, m, tuple(x.shape[-2:]))).clamp(0, 1)
    col = m[:, None, None, None]
    if name in ("Brightness", "Color", "Contrast", "Sharpness"):
        factor = 1.0 + BLEND_MAX * col
        if name == "Brightness":
            return (x * factor).clamp(0, 1)
        gray = TF.rgb_to_grayscale(x, num_output_channels=1)
        if name == "Color":
            return (factor * x + (1 - factor) * gray).clamp(0, 1)
        if name == "Contrast":
            mean = gray.mean(dim=(-3, -2, -1), keepdim=True)
            return (factor * x + (1 - factor) * mean).clamp(0, 1)
        kernel = torch.ones(3, 3, dtype=x.dtype, device=x.device)
        kernel[1, 1] = 5.0
        kernel = (kernel / 13.0).expand(3, 1, 3, 3)
        out = x.clone()
        blurred = nnf.conv2d(x, kernel, groups=3)
        inner = x[..., 1:-1, 1:-1]
        out[..., 1:-1, 1:-1] = inner + (1 - factor) * (blurred - inner)
        return out.clamp(0, 1)
    if name == "Posterize":
        shift = (8 - torch.round(8.0 - 4.0 * m.double()).to(torch.int64)).to(x.device)
        u8 = x.mul(255).round().to(torch.int64)
        keep = (255 >> shift << shift)[:, None, None, None]
        return (u8 & keep).to(x.dtype) / 255.0
    threshold = 1.0 - col
    return torch.where((x >= threshold) & (col > 0), 1.0 - x, x)


def affine_matrix(name: str, magnitude: Tensor, size: tuple[int, int]) -> Tensor:
    """The exact normalised ``theta`` ``[B, 2, 3]`` of affine op ``name`` at ``magnitude`` ``[B]``.

    ``theta`` is what :func:`torch.nn.functional.affine_grid` takes (``align_corners=False``): it maps
    output coordinates to input coordinates, both in [-1, 1]. Derived from torchvision's inverse affine
    matrix in pixel units (origin at the image centre) conjugated by ``diag(2/W, 2/H)``; with ``t`` the
    shear, ``s`` the shift in pixels and ``a`` the angle:
    ShearX ``[[1, t H/W, t H/W], [0, 1, 0]]`` (top row fixed), ShearY ``[[1, 0, 0], [t W/H, 1, t W/H]]``,
    TranslateX ``[[1, 0, -2 s/W], [0, 1, 0]]``, TranslateY ``[[1, 0, 0], [0, 1, -2 s/H]]``,
    Rotate ``[[cos a, -sin a H/W, 0], [sin a W/H, cos a, 0]]``. Differentiable in ``magnitude``.
    """
    check_op(name, AFFINE_OPS)
    h, w = size
    m = torch.as_tensor(magnitude).reshape(-1)
    if not m.is_floating_point():
        m = m.float()
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    if name == "ShearX":
        t = SHEAR_MAX * m
        rows = [one, t * h / w, t * h / w, zero, one, zero]
    elif name == "ShearY":
        t = SHEAR_MAX * m
        rows = [one, zero, zero, t * w / h, one, t * w / h]
    elif name == "TranslateX":
        rows = [one, zero, -2.0 * TRANSLATE_MAX * m, zero, one, zero]
    elif name == "TranslateY":
        rows = [one, zero, zero, zero, one, -2.0 * TRANSLATE_MAX * m]
    else:
        a = torch.deg2rad(ROTATE_MAX * m)
        rows = [torch.cos(a), -torch.sin(a) * h / w, zero, torch.sin(a) * w / h, torch.cos(a), zero]
    return torch.stack(rows, dim=1).reshape(-1, 2, 3)


def warp(images: Tensor, theta: Tensor, mode: str = "bilinear", fill: float = 0.0) -> Tensor:
    """Differentiable affine warp: ``affine_grid(theta)`` + ``grid_sample`` (zeros, ``align_corners=False``).

    Pixels that come from outside the frame get ``fill`` (for ``mode="bilinear"`` in proportion to how
    much of them is outside), so a segmentation mask warped with ``mode="nearest"`` and ``fill=255`` marks
    them as ignored. ``images``: ``[B, C, H, W]`` (integer masks are converted to float and back).
    """
    if mode not in ("bilinear", "nearest"):
        raise KdkitError(f"warp mode '{mode}' is not supported; use 'bilinear' or 'nearest'")
    dtype = images.dtype
    x = images if dtype.is_floating_point else images.float()
    theta = theta.to(device=x.device, dtype=x.dtype).expand(x.shape[0], 2, 3)
    grid = nnf.affine_grid(theta, list(x.shape), align_corners=False)
    out = nnf.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)
    if fill != 0.0:
        inside = nnf.grid_sample(
            torch.ones_like(x[:, :1]), grid, mode=mode, padding_mode="zeros", align_corners=False
        )
        out = out + (1.0 - inside) * fill
    if not dtype.is_floating_point:
        out = out.round().to(dtype)
    return out


def warp_boxes(targets: Tensor, theta: Tensor, size: tuple[int, int], min_size: float = 2.0) -> Tensor:
    """Padded box targets ``[B, M, 5]`` (``x1, y1, x2, y2, cls`` in pixels, ``cls = -1`` padding) moved
    by the warp :func:`warp` applies with ``theta`` ``[B, 2, 3]`` to ``size`` (h, w) images.

    ``theta`` maps output to input coordinates in [-1, 1] (``u = 2 x / W - 1`` for a pixel-edge
    coordinate ``x``, ``align_corners=False``), so a box corner moves by its inverse,
    ``u_out = A^-1 (u_in - b)``. Each box becomes the enclosing box of its four moved corners (as
    torchvision's affine on ``BoundingBoxes``), clamped to the frame; boxes thinner than ``min_size``
    pixels after clamping (they left the frame) become padding. No gradient (boxes are labels)."""
    h, w = (float(v) for v in size)
    theta = theta.detach().to(targets.device, torch.float32).expand(targets.shape[0], 2, 3)
    x1, y1, x2, y2 = targets[..., :4].float().unbind(-1)
    u = torch.stack([x1, x2, x2, x1], -1) * (2 / w) - 1  # corners [B, M, 4]
    v = torch.stack([y1, y1, y2, y2], -1) * (2 / h) - 1
    inv = torch.linalg.inv(theta[:, :, :2]).view(-1, 1, 1, 2, 2)
    du, dv = u - theta[:, 0, 2].view(-1, 1, 1), v - theta[:, 1, 2].view(-1, 1, 1)
    xo = (inv[..., 0, 0] * du + inv[..., 0, 1] * dv + 1) * (w / 2)
    yo = (inv[..., 1, 0] * du + inv[..., 1, 1] * dv + 1) * (h / 2)
    low = torch.stack([xo.amin(-1).clamp(0, w), yo.amin(-1).clamp(0, h)], -1)
    boxes = torch.cat([low, torch.stack([xo.amax(-1).clamp(0, w), yo.amax(-1).clamp(0, h)], -1)], -1)
    sides = boxes[..., 2:] - boxes[..., :2]
    keep = (targets[..., 4] >= 0) & (sides >= min_size).all(-1)
    padding = torch.tensor([0.0, 0.0, 0.0, 0.0, -1.0], device=targets.device)
    return torch.where(keep.unsqueeze(-1), torch.cat([boxes, targets[..., 4:].float()], -1), padding)
