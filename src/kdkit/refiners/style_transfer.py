"""Style transfer for style-augmented distillation (US 2025/0265822 A1, paragraphs [0014]-[0024], claims 2-4).

From a training image ``x`` and a style source image ``y`` a transfer makes ``x'`` with ``x``'s content and
``y``'s style. Every transfer is a callable ``transfer(content, style, alpha) -> x'``: ``content`` float
``[B,3,H,W]`` and ``style`` float ``[B,3,h,w]`` in [0, 1] (one style image per content image), ``alpha``
float ``[B]`` in [0, 1] interpolating between ``x``'s own style (0) and ``y``'s (1) (claim 4, [0023]);
``x'`` is ``[B,3,H,W]``, clamped to [0, 1], on ``content``'s device and dtype, computed without autograd.

Two transfers:

* :class:`FourierStyle`: Fourier domain adaptation (Yang & Soatto, FDA, CVPR 2020), training-free.
* :class:`AdaINStyle`: an encoder ``F`` and a generator ``G`` ([0021]-[0022]) with adaptive instance
  normalisation in between (Huang & Belongie, AdaIN, ICCV 2017); trained by
  :func:`train_style_autoencoder`, saved and loaded by :func:`save_style_model` / :func:`load_style_model`.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import KdkitError
from ..models.weights import load_weights, save_weights

SPEC_FORMAT = "kdkit-style-adain/1"
TRAIN_HINT = "train one with `kdkit train-style`"


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (CPU FFTs and many kernels lack them), the dtype itself otherwise."""
    return torch.promote_types(dtype, torch.float32)


class StyleTransfer(nn.Module):
    """Base class: ``forward(content, style, alpha)`` checks the contract, subclasses implement
    :meth:`stylize`.

    A transfer is inference-only: it stays in eval mode whatever ``train()`` asks, so a parent module's
    ``.train()`` never switches BatchNorm or Dropout inside ``F`` or ``G`` into training behaviour.
    """

    name = "style"

    def train(self, mode: bool = True) -> StyleTransfer:
        return super().train(False)

    def stylize(self, content: Tensor, style: Tensor, alpha: Tensor) -> Tensor:
        """``x'`` before clamping; ``alpha`` is a ``[B]`` tensor on ``content``'s device and dtype."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, content: Tensor, style: Tensor, alpha: Tensor | float) -> Tensor:
        if content.dim() != 4 or content.shape[1] != 3:
            raise ValueError(
                f"{self.name} style transfer needs content [B,3,H,W], got {tuple(content.shape)}"
            )
        batch = content.shape[0]
        if style.dim() != 4 or style.shape[:2] != (batch, 3):
            raise ValueError(
                f"{self.name} style transfer needs one style image per content image, [{batch},3,h,w]; "
                f"got {tuple(style.shape)}"
            )
        dtype = _work_dtype(content.dtype)
        alpha = torch.as_tensor(alpha, dtype=dtype, device=content.device)
        if alpha.dim() == 0:
            alpha = alpha.expand(batch)
        if alpha.shape != (batch,):
            raise ValueError(f"alpha must be a number or a [{batch}] tensor, got shape {tuple(alpha.shape)}")
        out = self.stylize(content.to(dtype), style.to(device=content.device, dtype=dtype), alpha)
        return out.clamp(0, 1).to(content.dtype)


# --- Fourier domain adaptation ---------------------------------------------------------------------


def fda_band_halfwidth(height: int, width: int, beta: float) -> int:
    """Half-width ``b = floor(beta * min(H, W))`` of FDA's low-frequency square; -1 (no band) for beta 0."""
    return math.floor(beta * min(height, width)) if beta > 0 else -1


def _band(height: int, width: int, beta: float, device: torch.device) -> Tensor:
    """Bool mask ``[H, W//2+1]`` over the ``rfft2`` half-spectrum: ``|k_h| <= b`` and ``k_w <= b``."""
    b = fda_band_halfwidth(height, width, beta)
    rows = (torch.fft.fftfreq(height, device=device) * height).round().abs() <= b
    cols = (torch.fft.rfftfreq(width, device=device) * width).round() <= b
    return rows[:, None] & cols[None, :]


def fda_mix(content: Tensor, style: Tensor, alpha: Tensor, beta: float) -> Tensor:
    """FDA (Yang & Soatto 2020, Sec. 3, eq. 3) with claim 4's interpolation, unclamped.

    Per channel ``A, P`` = amplitude and phase of the 2-D FFT. ``x' = IFFT(polar(A', P_x))`` with
    ``A' = (1 - alpha) A_x + alpha A_y`` inside the low-frequency band and ``A_x`` outside. ``style`` is
    resized to ``content``'s size first (bilinear, antialiased when shrinking, so high frequencies do
    not alias into the band). Band: the square of signed frequencies ``|k_h| <= b, |k_w| <= b`` around DC
    with ``b = floor(beta * min(H, W))`` (FDA's reference code: ``h1 = c_h - b, h2 = c_h + b + 1``), so
    any ``beta > 0`` moves at least the DC term (the mean colour), ``beta = 0`` moves nothing, and
    ``b >= max(H, W) / 2`` covers the whole spectrum. The band is symmetric under ``k -> -k``, so the
    mixed spectrum stays Hermitian and ``x'`` is real.
    """
    height, width = content.shape[-2:]
    if style.shape[-2:] != (height, width):
        style = F.interpolate(
            style, size=(height, width), mode="bilinear", align_corners=False, antialias=True
        )
    spec_x = torch.fft.rfft2(content)
    amp_x, amp_y = spec_x.abs(), torch.fft.rfft2(style).abs()
    a = alpha.to(amp_x.dtype).view(-1, 1, 1, 1)
    mixed = torch.polar((1 - a) * amp_x + a * amp_y, spec_x.angle())
    spec = torch.where(_band(height, width, beta, content.device), mixed, spec_x)
    return torch.fft.irfft2(spec, s=(height, width))


class FourierStyle(StyleTransfer):
    """Fourier domain adaptation: swap the low-frequency amplitude spectrum, keep the phase (:func:`fda_mix`).

    ``beta`` is FDA's ``L``: the band's half-width as a fraction of ``min(H, W)`` (the paper uses 0.01-0.09).
    """

    name = "fourier"

    def __init__(self, beta: float = 0.01) -> None:
        super().__init__()
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
            raise KdkitError(f"fourier style: beta must be a number >= 0, got {beta!r}")
        self.beta = float(beta)

    def stylize(self, content: Tensor, style: Tensor, alpha: Tensor) -> Tensor:
        if self.beta == 0:
            return content
        return fda_mix(content, style, alpha, self.beta)


# --- AdaIN -----------------------------------------------------------------------------------------


def feature_stats(features: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Channel-wise mean and ``sqrt(var + eps)`` over H, W (AdaIN eqs. 5-6, biased var.): ``[B,C,1,1]``."""
    var, mean = torch.var_mean(features, dim=(-2, -1), keepdim=True, correction=0)
    return mean, (var + eps).sqrt()


def adain(content_features: Tensor, style_mean: Tensor, style_std: Tensor, eps: float = 1e-5) -> Tensor:
    """AdaIN (Huang & Belongie 2017, eq. 8): ``std_s * (f - mean_c) / std_c + mean_s``, per channel."""
    mean_c, std_c = feature_stats(content_features, eps)
    return style_std * (content_features - mean_c) / std_c + style_mean


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


def _check_arch(kind: str, width: int, depth: int) -> None:
    if width < 1 or depth < 1:
        raise KdkitError(f"{kind}: width and depth must be >= 1, got width={width}, depth={depth}")


class StyleEncoder(nn.Sequential):
    """A small encoder ``F`` ([0021]): 3x3 convs with ReLU, ``depth - 1`` of them stride 2, channels doubling.

    Maps ``[B,3,H,W]`` images in [0, 1] to ``[B, width * 2**(depth-1), H / 2**(depth-1), W / 2**(depth-1)]``.
    """

    def __init__(self, width: int = 32, depth: int = 3) -> None:
        _check_arch("style encoder", width, depth)
        layers: list[nn.Module] = [_conv(3, width), nn.ReLU(inplace=True)]
        for i in range(1, depth):
            layers += [_conv(width * 2 ** (i - 1), width * 2**i, stride=2), nn.ReLU(inplace=True)]
        super().__init__(*layers)
        self.width, self.depth = width, depth
        self.out_channels = width * 2 ** (depth - 1)


class StyleDecoder(nn.Sequential):
    """The generator ``G`` ([0017], [0022]), the encoder's mirror: nearest x2 upsampling + 3x3 conv + ReLU.

    A first conv maps ``in_channels`` features to ``width * 2**(depth-1)`` channels (so ``F`` may be any
    feature module); ``depth - 1`` upsampling stages halve the channels; a last conv and a sigmoid give
    an image in [0, 1] at ``2**(depth-1)`` times the feature size.
    """

    def __init__(self, in_channels: int, width: int = 32, depth: int = 3) -> None:
        _check_arch("style decoder", width, depth)
        layers: list[nn.Module] = [_conv(in_channels, width * 2 ** (depth - 1)), nn.ReLU(inplace=True)]
        for i in range(depth - 1, 0, -1):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(width * 2**i, width * 2 ** (i - 1))]
            layers.append(nn.ReLU(inplace=True))
        layers += [_conv(width, 3), nn.Sigmoid()]
        super().__init__(*layers)
        self.in_channels, self.width, self.depth = in_channels, width, depth


def _device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def encoder_channels(encoder: nn.Module, image_size: int = 64) -> int:
    """Output channel count of a feature module ``F``, by a dry forward of a zero image (in eval mode)."""
    device, dtype = _device_dtype(encoder)
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            out = encoder(torch.zeros(1, 3, image_size, image_size, device=device, dtype=dtype))
    finally:
        encoder.train(was_training)
    if not isinstance(out, Tensor) or out.dim() != 4:
        found = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise KdkitError(f"a style encoder must return one [B,C,h,w] feature map, got {found}")
    return out.shape[1]


class AdaINStyle(StyleTransfer):
    """AdaIN transfer ``x' = G(AdaIN(F(x), s))`` ([0014]-[0022]): content = ``F(x)``'s normalised features,
    style ``s`` = channel-wise mean and std, interpolated as ``(1-alpha) stats(F(x)) + alpha stats(F(y))``
    (claim 4). Because AdaIN is affine in the style statistics, this equals the AdaIN paper's content-style
    trade-off ``(1-alpha) F(x) + alpha AdaIN(F(x), F(y))`` (Sec. 7), and alpha 0 gives ``G(F(x))``.

    ``encoder`` is any module mapping [0, 1] images to ``[B,C,h,w]`` features (a :class:`StyleEncoder`, or
    a frozen front part of the teacher); ``decoder`` maps them back to an image (resized to the content
    size when it differs). The style image is encoded at its own size: statistics need no resizing.
    """

    name = "adain"

    def __init__(self, encoder: nn.Module, decoder: nn.Module, eps: float = 1e-5) -> None:
        super().__init__()
        expected = getattr(decoder, "in_channels", None)
        if expected is not None and (found := encoder_channels(encoder)) != expected:
            raise KdkitError(
                f"style decoder expects {expected}-channel features but the encoder gives {found}"
            )
        self.encoder, self.decoder, self.eps = encoder, decoder, eps
        self.spec: dict[str, Any] = {}
        self.eval()

    def mix_features(self, content: Tensor, style: Tensor, alpha: Tensor) -> Tensor:
        """The features fed to ``G``: ``AdaIN(F(x), (1-alpha) stats(F(x)) + alpha stats(F(y)))``."""
        f_x, f_y = self.encoder(content), self.encoder(style)
        mean_x, std_x = feature_stats(f_x, self.eps)
        mean_y, std_y = feature_stats(f_y, self.eps)
        a = alpha.to(f_x.dtype).view(-1, 1, 1, 1)
        return adain(f_x, (1 - a) * mean_x + a * mean_y, (1 - a) * std_x + a * std_y, self.eps)

    def stylize(self, content: Tensor, style: Tensor, alpha: Tensor) -> Tensor:
        _, dtype = _device_dtype(self.decoder)
        out = self.decoder(self.mix_features(content.to(dtype), style.to(dtype), alpha))
        if out.shape[-2:] != content.shape[-2:]:
            out = F.interpolate(out, size=content.shape[-2:], mode="bilinear", align_corners=False)
        return out


# --- training --------------------------------------------------------------------------------------


def _as_float(batch: object) -> Tensor:
    if isinstance(batch, (tuple, list)):  # (images, labels) from a DataLoader
        batch = batch[0]
    if not isinstance(batch, Tensor) or batch.dim() != 4 or batch.shape[1] != 3:
        found = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
        raise KdkitError(
            f"style training needs image batches [B,3,H,W] (uint8 or float in [0, 1]), got {found}"
        )
    return batch.float() / 255 if batch.dtype == torch.uint8 else batch.float()


def _batches(images: Tensor | Iterable[Any], batch_size: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Endless batches: random subsets of a tensor, or passes over an iterable (ends when a pass is empty)."""
    if isinstance(images, Tensor):
        _as_float(images[:1])  # checks the shape
        if len(images) == 0:
            raise KdkitError("style training got no images")
        while True:
            yield _as_float(images[torch.randperm(len(images), generator=gen)[:batch_size]])
    first = True
    while True:
        empty = True
        for batch in images:
            empty = False
            yield _as_float(batch)
        if empty:
            if first:
                raise KdkitError("style training got no image batches")
            return
        first = False


def train_style_autoencoder(
    images: Tensor | Iterable[Any],
    encoder: nn.Module,
    decoder: nn.Module,
    steps: int = 1000,
    batch_size: int = 16,
    lr: float = 1e-3,
    generator: torch.Generator | int = 0,
    freeze_encoder: bool = False,
    callback: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``F`` and ``G`` in tandem so that ``G(F(x))`` reconstructs ``x`` ([0022]); returns step losses.

    Loss: pixel MSE between ``G(F(x))`` (resized to ``x``'s size if needed) and ``x``, Adam. ([0022]
    decomposes ``x`` into its own content and style and regenerates it; AdaIN of ``F(x)`` with its own
    statistics is ``F(x)``, so this is that reconstruction.) ``images``: a uint8 ``[N,3,H,W]`` tensor
    (each step takes a random subset of ``batch_size``) or an iterable of batches, uint8 or float in
    [0, 1], or ``(images, labels)`` pairs, re-iterated when it runs out (training stops early if a
    one-shot iterator runs dry). With ``freeze_encoder`` (``F`` = a frozen front of the teacher) only ``G``
    trains and ``F`` runs in eval mode, so its parameters and buffers stay as they are. Batches go to
    the decoder's device. Deterministic on CPU given ``generator`` (a seed or a ``torch.Generator``) and
    the initial weights. ``callback(step, loss)`` runs after each step (steps count from 1). The
    modules' train/eval modes are restored at the end.
    """
    if steps < 1 or batch_size < 1:
        raise KdkitError(f"style training needs steps >= 1 and batch_size >= 1, got {steps}, {batch_size}")
    gen = generator if isinstance(generator, torch.Generator) else torch.Generator().manual_seed(generator)
    device, _ = _device_dtype(decoder)
    modes = encoder.training, decoder.training
    encoder.train(not freeze_encoder)
    decoder.train()
    params = list(decoder.parameters())
    if not freeze_encoder:
        seen = {id(p) for p in params}
        params += [p for p in encoder.parameters() if id(p) not in seen]
    optimizer = torch.optim.Adam(params, lr=lr)
    losses: list[float] = []
    try:
        for step, batch in zip(range(1, steps + 1), _batches(images, batch_size, gen)):
            x = batch.to(device)
            with torch.set_grad_enabled(not freeze_encoder):
                features = encoder(x)
            out = decoder(features)
            if out.shape[-2:] != x.shape[-2:]:
                out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.mse_loss(out, x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if callback is not None:
                callback(step, losses[-1])
    finally:
        encoder.train(modes[0])
        decoder.train(modes[1])
    return losses


# --- save / load -----------------------------------------------------------------------------------


def _spec_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_style_model(
    path: str | os.PathLike[str],
    encoder: nn.Module,
    decoder: StyleDecoder,
    spec: Mapping[str, Any] | None = None,
) -> None:
    """Write an AdaIN style model: weights to ``path`` (``*.safetensors``), a JSON spec beside it (``.json``).

    A :class:`StyleEncoder` is saved with the decoder; any other encoder (a frozen front of the teacher) is
    not, and :func:`load_style_model` must be given it. ``spec`` holds extra JSON-able facts to keep with
    the model (image size, steps, ...). Both files are written atomically (temp file, then rename).
    """
    path = Path(path)
    if not isinstance(decoder, StyleDecoder):
        raise KdkitError(f"save_style_model saves a StyleDecoder, got {type(decoder).__name__}")
    own = isinstance(encoder, StyleEncoder)
    document = {
        "format": SPEC_FORMAT,
        "encoder": {"width": encoder.width, "depth": encoder.depth} if own else "external",
        "decoder": {"in_channels": decoder.in_channels, "width": decoder.width, "depth": decoder.depth},
        "spec": dict(spec or {}),
    }
    try:
        text = json.dumps(document, indent=2, sort_keys=True)
    except TypeError as err:
        raise KdkitError(f"cannot save style model {path}: spec is not JSON-serialisable ({err})") from err
    modules = nn.ModuleDict({"encoder": encoder, "decoder": decoder} if own else {"decoder": decoder})
    save_weights(modules, path)
    spec_path = _spec_path(path)
    tmp = spec_path.with_name(f".{spec_path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, spec_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_style_spec(path: Path) -> dict[str, Any]:
    spec_path = _spec_path(path)
    if not path.is_file() or not spec_path.is_file():
        missing = path if not path.is_file() else spec_path
        raise KdkitError(f"style model not found: {missing} is missing; {TRAIN_HINT}")
    try:
        document = json.loads(spec_path.read_text(encoding="utf-8"))
        if document["format"] != SPEC_FORMAT:
            raise ValueError(f"format {document['format']!r}, expected {SPEC_FORMAT!r}")
        dec = document["decoder"]
        arch = [dec["in_channels"], dec["width"], dec["depth"]]
        if document["encoder"] != "external":
            arch += [document["encoder"]["width"], document["encoder"]["depth"]]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in arch):
            raise ValueError("widths, depths and channels must be integers")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise KdkitError(f"corrupt style model spec {spec_path} ({err}); re-save it or {TRAIN_HINT}") from err
    return document


def load_style_model(path: str | os.PathLike[str], encoder: nn.Module | None = None) -> AdaINStyle:
    """Load a model written by :func:`save_style_model` (safetensors only: nothing is unpickled) on CPU.

    ``encoder`` is required (and only allowed) when the model was saved with an external encoder.
    The saved JSON document is kept as ``style.spec``.
    """
    path = Path(path)
    document = read_style_spec(path)
    dec = document["decoder"]
    decoder = StyleDecoder(dec["in_channels"], dec["width"], dec["depth"])
    external = document["encoder"] == "external"
    if external != (encoder is not None):
        saved, need = ("without", "pass that encoder to") if external else ("with", "pass no encoder to")
        raise KdkitError(f"style model {path} was saved {saved} its encoder; {need} load_style_model")
    if external:
        modules = nn.ModuleDict({"decoder": decoder})
    else:
        encoder = StyleEncoder(document["encoder"]["width"], document["encoder"]["depth"])
        modules = nn.ModuleDict({"encoder": encoder, "decoder": decoder})
    try:
        load_weights(modules, path)
    except KdkitError as err:
        raise KdkitError(f"{err}; re-save the style model or {TRAIN_HINT}") from err
    style = AdaINStyle(encoder, decoder)
    style.spec = document
    return style


# --- alpha -----------------------------------------------------------------------------------------


def interpolate_alpha(
    spec: float | tuple[float, float] | list[float], count: int, generator: torch.Generator | None = None
) -> Tensor:
    """Per-image style weights ``[count]`` (claim 4): a number is a fixed alpha, ``[lo, hi]`` draws
    ``alpha ~ Uniform(lo, hi)`` per image from ``generator``; ``0 <= lo <= hi <= 1``. float32 on CPU."""

    def number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if number(spec):
        bounds = (float(spec), float(spec))
    elif isinstance(spec, (tuple, list)) and len(spec) == 2 and all(number(v) for v in spec):
        bounds = (float(spec[0]), float(spec[1]))
    else:
        bounds = (math.nan, math.nan)  # fails the range check below
    lo, hi = bounds
    if not 0 <= lo <= hi <= 1:
        raise KdkitError(
            f"style alpha must be a number in [0, 1] or a pair [lo, hi] with 0 <= lo <= hi <= 1, got {spec!r}"
        )
    if number(spec):
        return torch.full((count,), lo)
    return lo + (hi - lo) * torch.rand(count, generator=generator)
