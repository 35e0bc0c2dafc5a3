"""TST meta-encoders f_E and their Stage I fitting (Li et al., TST, Sec. 3.4 Eq. 3 and Sec. 3.5).

Each primitive with a magnitude gets a small differentiable network that imitates the hand-made op
f_A of :mod:`kdkit.refiners.tst_ops`, so that Stage II can backpropagate to the magnitude:

- affine ops: :class:`AffineEncoder`, the spatial transformer of Jaderberg et al. (2015) as TST writes
  it, ``A = reshape(FC([theta_E, m]))`` then ``warp(x, A)``;
- colour ops: :class:`ColorEncoder`, "convolution + colour transformation" (see its docstring for the
  reading we use and why the paper's literal form is not enough).

Stage I (Eq. 3) fits each encoder by MSE to its hand-made op over magnitudes ``m_r ~ U(0, 1)`` (with a
random sign for signed ops) on real images, measures a held-out relative error, checks it against
:data:`BOUNDS`, and caches the fitted weights per image size (safetensors + a JSON of the errors).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..data.base import cache_dir
from ..errors import KdkitError
from .tst_ops import AFFINE_OPS, MAGNITUDE_OPS, SIGNED_OPS, affine_matrix, batched_op, check_op, warp

ROUNDS = 3  # at most this many rounds of `steps` fit steps per op, until its bound holds

ENCODER_VERSION = 1
THETA_DIM = 8  # length of theta_E (theta_E,V for the colour network)
BATCH = 64
LR = 0.02
TONE_LR = 0.01  # the tone table needs finer steps (Posterize moves pixels by a few uint8 levels)
DEFAULT_STEPS = 400
TONE_X_KNOTS = 256  # one knot per uint8 level: posterize is exact on them
TONE_M_KNOTS = 33
# ops that are a function of each pixel value alone get the tone table T(x, m) of ColorEncoder
TONE_OPS = ("Brightness", "Posterize", "Solarize")

# Relative error bound per op: mean ||f_E - f_A||^2 / mean ||x - f_A||^2 on held-out images and magnitudes
# (1.0 = no better than the identity). Measured with the default 400 steps at 32x32 on the embedded data
# (10000 images, seeds 0 and 1; 400 images, seed 1) -- the ranges in the comments.
BOUNDS: dict[str, float] = {
    "Brightness": 0.01,  # 0.0007-0.0023
    # 0.004-0.007; road scenes at 64x128 (little colour: a small denominator) 0.134 after 400 steps,
    # 0.040 after 800
    "Color": 0.05,
    "Contrast": 0.01,  # 0.0001-0.0006
    # 0.045-0.049: torchvision leaves the 1-px border unsharpened, which no convolution reproduces; the
    # ideal blur-blend with replicate padding already scores 0.047 (the floor)
    "Sharpness": 0.06,
    "Posterize": 0.05,  # 0.011-0.023: a staircase in m and x, read from a bilinear table
    "Solarize": 0.02,  # 0.008-0.009
    "ShearX": 0.001,
    "ShearY": 0.001,
    "TranslateX": 0.001,
    "TranslateY": 0.001,  # < 1e-9: exact
    # 0.087-0.101: the STN's FC is affine in m but a rotation's cos(30 m) is not; the best matrix affine in
    # m (least squares) scores 0.11, so the fit is at its floor; road scenes at 64x128: 0.126 after 800
    # steps, at 128x256: 0.154 after 3 x 400 (finer detail raises the floor of the same matrix error)
    "Rotate": 0.2,
}


def draw_magnitudes(name: str, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``m ~ U(0, 1)`` (Eq. 3), with a random sign for signed ops."""
    m = torch.rand(n, generator=generator)
    if name in SIGNED_OPS:
        m = m * (torch.randint(0, 2, (n,), generator=generator) * 2 - 1)
    return m


class AffineEncoder(nn.Module):
    """STN meta-encoder (TST Sec. 3.5): ``A = reshape(FC([theta_E, m]))``, output ``warp(x, A)``.

    ``theta_E`` has length 8 and ``FC`` is ``nn.Linear(9, 6)``; at initialisation ``A`` is the identity
    for every ``m`` (zero weight, identity bias). ``A`` is affine in ``m``: exact for shears and
    translations, a least-squares fit of ``cos``/``sin`` for Rotate.
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.randn(THETA_DIM, generator=generator))
        self.fc = nn.Linear(THETA_DIM + 1, 6)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))

    def matrix(self, m: Tensor) -> Tensor:
        m = m.reshape(-1, 1).to(self.theta.dtype)
        inp = torch.cat([self.theta.expand(m.shape[0], -1), m], dim=1)
        return self.fc(inp).reshape(-1, 2, 3)

    def forward(self, x: Tensor, m: Tensor) -> Tensor:
        return warp(x, self.matrix(m.to(x.device)))


class ColorEncoder(nn.Module):
    """Colour-network meta-encoder (TST Sec. 3.5: "convolution and colour transformation").

    ``form="paper"``: the paper's literal network ``C(x * (0.5 + sigmoid(s)) + sigmoid(t) - 0.5)`` with
    ``(s, t) = FC([theta_EV, m])`` (two scalars) and ``C`` a 3x3 convolution. Its scale is confined to
    [0.5, 1.5], so it cannot reach Brightness 0.1..1.9, and it cannot blend ``x`` with an image-dependent
    degenerate image as Color/Contrast/Sharpness do.

    ``form="blend"`` (default): ``out = clamp(D(x) + a(m) * (x - D(x)) + b(m), 0, 1)``, where the
    degenerate image ``D(x) = C(x) + G(mean_hw(x))`` is a learned 3x3 convolution plus a learned linear
    map of the per-channel image mean (0 for Brightness, grey for Color, the mean grey for Contrast, a
    blur for Sharpness), and ``(a, b) = FC([theta_EV, m])`` are per-channel (``FC: R^9 -> R^6``). This is
    AutoAugment's own blend ``factor * x + (1 - factor) * degenerate`` with the degenerate image learned.

    ``tone=True`` adds a learned tone curve ``T(x, m)`` to the output (before the clamp): a table of
    256 pixel levels x 33 magnitudes read bilinearly per pixel and channel, differentiable in ``x`` and
    ``m``. The blend is linear in the pixel values, so it cannot follow ops that are a nonlinear function
    of each pixel value (Solarize's threshold, Posterize's steps, Brightness's clipping); :func:`make_encoder`
    gives the table to those (:data:`TONE_OPS`). Both forms are clamped to [0, 1] like the hand-made ops,
    and start as the identity at every ``m`` (blend: ``a = 1``, ``b = 0``, ``T = 0``).
    """

    def __init__(
        self,
        form: str = "blend",
        tone: bool = False,
        signed: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if form not in ("blend", "paper"):
            raise KdkitError(f"unknown colour-network form '{form}'; use 'blend' or 'paper'")
        self.form, self.signed = form, signed
        # tone curve T(x, m): a learned table over (pixel value, magnitude), read bilinearly
        self.tone = nn.Parameter(torch.zeros(1, 1, TONE_M_KNOTS, TONE_X_KNOTS)) if tone else None
        self.theta = nn.Parameter(torch.randn(THETA_DIM, generator=generator))
        self.conv = nn.Conv2d(3, 3, 3, padding=1, padding_mode="replicate")
        if form == "blend":
            self.fc = nn.Linear(THETA_DIM + 1, 6)
            self.glob = nn.Linear(3, 3)
            with torch.no_grad():
                self.fc.weight.zero_()
                self.fc.bias.copy_(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]))
                self.conv.weight.zero_()  # start from a per-channel 3x3 box blur
                self.conv.weight[range(3), range(3)] = 1.0 / 9.0
                self.conv.bias.zero_()
                self.glob.weight.zero_()
                self.glob.bias.zero_()
        else:
            self.fc = nn.Linear(THETA_DIM + 1, 2)
            with torch.no_grad():
                self.fc.weight.zero_()
                self.fc.bias.zero_()
                self.conv.weight.zero_()
                self.conv.weight[range(3), range(3), 1, 1] = 1.0  # identity convolution
                self.conv.bias.zero_()

    def params(self, m: Tensor) -> Tensor:
        m = m.reshape(-1, 1).to(self.theta.dtype)
        return self.fc(torch.cat([self.theta.expand(m.shape[0], -1), m], dim=1))

    def forward(self, x: Tensor, m: Tensor) -> Tensor:
        p = self.params(m.to(x.device))[:, :, None, None]
        if self.form == "paper":
            scale, shift = p[:, :1], p[:, 1:]
            out = self.conv(x * (0.5 + torch.sigmoid(scale)) + torch.sigmoid(shift) - 0.5)
        else:
            a, b = p[:, :3], p[:, 3:]
            degenerate = self.conv(x) + self.glob(x.mean(dim=(2, 3)))[:, :, None, None]
            out = degenerate + a * (x - degenerate) + b
        if self.tone is not None:
            out = out + self._tone(x, m.to(x.device))
        return out.clamp(0, 1)

    def _tone(self, x: Tensor, m: Tensor) -> Tensor:
        """``T(x, m)`` per pixel and channel: bilinear read of the table at (x, m), both in [-1, 1] units."""
        b, c, h, w = x.shape
        mm = m.reshape(b, 1, 1).to(x.dtype)
        mm = mm if self.signed else 2 * mm - 1
        gx = (2 * x - 1).reshape(b, c * h, w)
        grid = torch.stack([gx, mm.expand(b, c * h, w)], dim=-1)
        table = self.tone.expand(b, -1, -1, -1).to(x.dtype)
        out = nn.functional.grid_sample(
            table, grid, mode="bilinear", padding_mode="border", align_corners=True
        )
        return out.reshape(b, c, h, w)


def make_encoder(name: str, generator: torch.Generator | None = None) -> nn.Module:
    """A fresh (unfitted) meta-encoder for magnitude op ``name``: an STN for affine ops, the blend colour
    network for colour ops, with the tone table for the pointwise ops (:data:`TONE_OPS`)."""
    check_op(name, MAGNITUDE_OPS)
    if name in AFFINE_OPS:
        return AffineEncoder(generator)
    return ColorEncoder("blend", tone=name in TONE_OPS, signed=name in SIGNED_OPS, generator=generator)


@torch.no_grad()
def relative_error(name: str, encoder: nn.Module, images: Tensor, magnitudes: Tensor) -> float:
    """``mean ||f_E(x, m) - f_A(x, m)||^2 / mean ||x - f_A(x, m)||^2`` (1.0: no better than identity)."""
    was_training = encoder.training
    encoder.eval()
    num = den = 0.0
    for start in range(0, len(images), 256):
        x, m = images[start : start + 256], magnitudes[start : start + 256]
        target = batched_op(name, x, m)
        num += float((encoder(x, m) - target).double().pow(2).sum())
        den += float((x - target).double().pow(2).sum())
    encoder.train(was_training)
    return num / max(den, 1e-12)


def _split(images: Tensor) -> tuple[Tensor, Tensor]:
    if images.ndim != 4 or images.shape[1] != 3 or len(images) < 5:
        raise KdkitError(
            f"TST meta-encoder fitting needs at least 5 images [N, 3, H, W], got "
            f"{list(images.shape)}; pass more training images"
        )
    if not images.is_floating_point():
        images = images.float() / 255.0
    cut = int(round(0.8 * len(images)))
    return images[:cut], images[cut:]


def fit_encoder(
    name: str, images: Tensor, steps: int, generator: torch.Generator, encoder: nn.Module | None = None
) -> tuple[nn.Module, float]:
    """Stage I (Eq. 3) for one op: Adam on ``mean ||f_A(x, m_r) - f_E(x, m_r)||^2``, ``m_r ~ U(0, 1)``.

    Batches of 64 are drawn from the first 80 % of ``images`` (float [N, 3, H, W] in [0, 1], or uint8);
    the returned error is :func:`relative_error` on the other 20 % with fresh magnitudes. The learning
    rate follows a cosine from 0.02 (0.01 for the tone table) to 0 over ``steps``. ``encoder`` defaults
    to :func:`make_encoder`.
    """
    if steps < 1:
        raise KdkitError(f"TST fit_steps must be >= 1, got {steps}; set a positive number of fit steps")
    train, held = _split(images)
    if encoder is None:
        encoder = make_encoder(name, generator)
        if name in AFFINE_OPS:
            warm_start_affine(encoder, name, tuple(images.shape[-2:]))
    encoder.train()
    tone = [p for n, p in encoder.named_parameters() if n == "tone"]
    rest = [p for n, p in encoder.named_parameters() if n != "tone"]
    opt = torch.optim.Adam([{"params": rest, "lr": LR}, {"params": tone, "lr": TONE_LR}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    for _ in range(steps):
        idx = torch.randint(0, len(train), (min(BATCH, len(train)),), generator=generator)
        x = train[idx]
        m = draw_magnitudes(name, len(x), generator)
        loss = (encoder(x, m) - batched_op(name, x, m)).pow(2).sum(dim=(1, 2, 3)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    encoder.eval()
    error = relative_error(name, encoder, held, draw_magnitudes(name, len(held), generator))
    return encoder, error


@torch.no_grad()
def warm_start_affine(encoder: AffineEncoder, name: str, size: tuple[int, int]) -> None:
    """Start an STN at the least-squares line ``A(m) = c + d m`` through the op's exact matrices
    (m in [-1, 1]); Eq. 3 then fits it on images. Without it, large shifts of images with big flat
    areas (road scenes at 64x128) stalled in local minima of the image MSE (relative errors 0.4-0.6)."""
    m = torch.linspace(-1.0, 1.0, 65)
    target = affine_matrix(name, m, size).reshape(len(m), 6).to(encoder.fc.weight.dtype)
    design = torch.stack([torch.ones_like(m), m], dim=1).to(target.dtype)
    coef = torch.linalg.lstsq(design, target).solution
    encoder.fc.weight.zero_()
    encoder.fc.bias.copy_(coef[0])
    encoder.fc.weight[:, -1] = coef[1]


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Tiny tensors run far faster on one intra-op thread than on several contending for busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_meta_encoders(
    images: Tensor,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[nn.ModuleDict, dict[str, float]]:
    """Stage I for every op with a magnitude: one fitted encoder per name of ``MAGNITUDE_OPS``.

    Fits on the first 80 % of ``images`` ([N, 3, H, W], uint8 or float in [0, 1]) and measures each
    relative error on the other 20 % with fresh magnitudes. Raises :class:`KdkitError` if an op misses its
    bound in :data:`BOUNDS`. Returns the encoders (frozen, eval mode) and the errors.
    """
    generator = torch.Generator().manual_seed(seed)
    if not images.is_floating_point():
        images = images.float() / 255.0  # once, not once per op
    encoders, errors = nn.ModuleDict(), {}
    h, w = images.shape[-2:]
    with _threads(1 if h * w <= 64 * 64 else torch.get_num_threads()):
        for name in MAGNITUDE_OPS:
            start = time.perf_counter()
            encoder, error = fit_encoder(name, images, steps, generator)
            for _ in range(ROUNDS - 1):  # "optimised to a very small error bound" (Sec. 3.4): go on
                if error <= BOUNDS[name]:
                    break
                encoder, error = fit_encoder(name, images, steps, generator, encoder)
            encoders[name], errors[name] = encoder, error
            if progress is not None:
                progress(
                    f"TST stage I: {name} fitted in {time.perf_counter() - start:.1f}s, relative error "
                    f"{error:.4f} (bound {BOUNDS[name]})"
                )
    return freeze(encoders), errors


def check_bounds(errors: dict[str, float], steps: int) -> None:
    """Raise the one-line :class:`KdkitError` for the first op whose error exceeds its bound."""
    for name, error in errors.items():
        if not error <= BOUNDS[name]:
            raise KdkitError(
                f"TST meta-encoder '{name}' missed its error bound: held-out relative error "
                f"{error:.4f} > {BOUNDS[name]} after {ROUNDS} x {steps} fit steps; raise "
                f"fit_steps (e.g. to {2 * steps}) or pass more training images"
            )


def freeze(encoders: nn.ModuleDict) -> nn.ModuleDict:
    """Frozen meta-encoders (TST keeps theta_E fixed after Stage I): no gradients, eval mode."""
    for p in encoders.parameters():
        p.requires_grad_(False)
    return encoders.eval()


def build_encoders() -> nn.ModuleDict:
    """Unfitted encoders for every op of ``MAGNITUDE_OPS`` (the structure a cache file is loaded into)."""
    return nn.ModuleDict({name: make_encoder(name) for name in MAGNITUDE_OPS})


def cache_path(size: tuple[int, int], steps: int, seed: int = 0) -> Path:
    h, w = size
    return cache_dir("tst", f"meta-encoders-v{ENCODER_VERSION}-{h}x{w}-steps{steps}-seed{seed}.safetensors")


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_or_fit(
    size: tuple[int, int],
    images: Tensor,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    cache: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[nn.ModuleDict, dict[str, float]]:
    """Fitted meta-encoders for images of ``size`` (H, W): loaded from the cache, or fitted and cached.

    The cache file is ``cache`` or :func:`cache_path` (safetensors, no pickle), with the errors in a JSON
    beside it (same name, ``.json``); both are written atomically. A cache is reused only if the bounds
    still hold. Returns frozen encoders (eval mode) and the held-out relative errors.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(images.shape[-2:]) != size:
        raise KdkitError(
            f"TST meta-encoders for size {size[0]}x{size[1]} got images of size "
            f"{images.shape[-2]}x{images.shape[-1]}; resize them or pass their size"
        )
    path = Path(cache) if cache is not None else cache_path(size, steps, seed)
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            encoders = build_encoders()
            encoders.load_state_dict(load_file(str(path)))
            errors = {name: float(meta["errors"][name]) for name in MAGNITUDE_OPS}
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError):
            pass  # unreadable or from another layout: fit again and overwrite
        else:
            if meta.get("version") == ENCODER_VERSION and all(errors[n] <= BOUNDS[n] for n in MAGNITUDE_OPS):
                if progress is not None:
                    progress(f"TST stage I: meta-encoders loaded from {path}")
                return freeze(encoders), errors
    encoders, errors = fit_meta_encoders(images, steps, seed, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in encoders.state_dict().items()}
    _atomic_write(path, lambda p: save_file(state, str(p)))
    meta = {
        "version": ENCODER_VERSION,
        "size": list(size),
        "steps": steps,
        "seed": seed,
        "errors": errors,
        "bounds": {n: BOUNDS[n] for n in MAGNITUDE_OPS},
    }
    _atomic_write(meta_path, lambda p: p.write_text(json.dumps(meta, indent=1)))
    check_bounds(errors, steps)  # after caching: a missed bound is reported, the long fit is kept
    return encoders, errors
