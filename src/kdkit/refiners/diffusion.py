"""Diffusion backend of style augmentation (US 2025/0265822 A1, [0033] and claim 7).

A trained text-to-image diffusion model D, used image-to-image, renders a training image x in the style
a text prompt names ("at night, heavy rain"): :class:`DiffusionStyle` makes x' from x during training,
:func:`generate_style_sources` writes style source images y into a folder once, for ``unlabeled_folder``.

Pipelines are read from a local diffusers folder only (``model_index.json`` and safetensors weights;
nothing is downloaded, nothing is unpickled). Needs the extra: ``pip install 'kdkit[diffusion]'``.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..engine.checkpoint import atomic_write, atomic_write_text
from ..errors import KdkitError
from .style_transfer import StyleTransfer

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

INDEX = "model_index.json"
# Safety checkers are not used: x' and y are training material, never shown to anyone.
NO_SAFETY_CHECKER = {"safety_checker": None, "requires_safety_checker": False}


def load_img2img_pipeline(
    model_dir: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DiffusionPipeline:
    """The image-to-image pipeline of the diffusers folder ``model_dir`` (local files and safetensors
    only), safety checker and progress bar off, on ``device`` in ``dtype``."""
    try:
        from diffusers import AutoPipelineForImage2Image
    except ImportError:
        raise KdkitError(
            "the diffusion style backend needs diffusers and transformers: pip install 'kdkit[diffusion]'"
        ) from None
    path = Path(model_dir).expanduser()
    expected = f"a diffusers pipeline folder with {INDEX} (as written by save_pretrained)"
    if not path.is_dir():
        raise KdkitError(f"diffusion model folder '{path}' does not exist; expected {expected}")
    if not (path / INDEX).is_file():
        raise KdkitError(
            f"'{path}' is not a diffusers pipeline folder: it has no {INDEX}; expected {expected}"
        )
    try:
        index = json.loads((path / INDEX).read_text())
        pipeline = AutoPipelineForImage2Image.from_pretrained(
            path,
            local_files_only=True,
            use_safetensors=True,
            low_cpu_mem_usage=False,
            **{key: value for key, value in NO_SAFETY_CHECKER.items() if key in index},
        )
    except (OSError, ValueError) as e:
        raise KdkitError(f"cannot load the diffusion pipeline in '{path}': {e}") from None
    pipeline.to(torch.device(device))
    if dtype != torch.float32:  # loaded in float32; cast on the device (from_pretrained's keyword varies)
        pipeline.to(dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, call, image)."""
    return int(np.random.SeedSequence(values).generate_state(1, np.uint64)[0] >> np.uint64(1))


class DiffusionStyle(StyleTransfer):
    """x' = D(x, prompt): image-to-image diffusion with a text prompt naming the style (claim 7).

    ``model`` is a local diffusers folder (loaded on the CPU in float32) or a loaded pipeline. The
    pipeline runs on the device of the content images, moved there (and cast to ``dtype`` when given,
    e.g. float16 on a GPU) on first use. The style source argument of :meth:`forward` is ignored: the
    prompt is the style.

    Claim 4 (x' in a style interpolated between x's own and the target style by ``alpha``) reads here
    as the img2img strength: image i is denoised with ``alpha_i * strength``, so alpha 0 returns x
    unchanged (the pipeline does not run) and alpha 1 applies the full ``strength``. The pipeline
    takes ``int(steps * alpha_i * strength)`` denoising steps; an image for which that is 0 is
    returned unchanged as well.

    ``size``: the shorter side the pipeline works at (None: x's size), rounded to the VAE's multiple;
    x' is resized back to x's size. Noise is drawn from a CPU generator per image: seeded with
    ``seeds[i]`` when :meth:`forward` gets ``seeds`` (the style refiner passes seeds drawn per global
    sample position from the step's generator, so resumed and DDP runs repeat one process's noise),
    otherwise with ``(seed, call count, index in batch)``, so a fresh module with the same seed repeats
    its outputs.
    """

    name = "diffusion"

    def __init__(
        self,
        model: str | os.PathLike[str] | DiffusionPipeline,
        prompt: str,
        negative_prompt: str | None = None,
        strength: float = 0.5,
        steps: int = 20,
        guidance: float = 7.5,
        seed: int = 0,
        size: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not prompt or not prompt.strip():
            raise KdkitError("diffusion style needs a prompt naming the style, e.g. 'at night, heavy rain'")
        if not 0.0 < strength <= 1.0:
            raise KdkitError(f"diffusion style: strength must be in (0, 1], got {strength}")
        if steps < 1:
            raise KdkitError(f"diffusion style: steps must be at least 1, got {steps}")
        if size is not None and size < 8:
            raise KdkitError(f"diffusion style: size must be at least 8 px, got {size}")
        if isinstance(model, str | os.PathLike):
            model = load_img2img_pipeline(model)
        self.pipeline = model
        self.prompt, self.negative_prompt = prompt, negative_prompt
        self.strength, self.steps, self.guidance = strength, steps, guidance
        self.seed, self.size, self.pipeline_dtype = seed, size, dtype
        self.calls = 0

    def _work_size(self, height: int, width: int) -> tuple[int, int]:
        multiple = int(getattr(self.pipeline, "vae_scale_factor", 8))
        scale = 1.0 if self.size is None else self.size / min(height, width)
        return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (height, width))

    @torch.no_grad()
    def forward(
        self,
        content: Tensor,
        style: Tensor | None = None,
        alpha: Tensor | float = 1.0,
        seeds: Sequence[int] | None = None,
    ) -> Tensor:
        """x' ``[B,3,H,W]`` in [0, 1] from ``content`` in [0, 1]; ``style`` is ignored; ``alpha``: a
        number or ``[B]`` in [0, 1]; ``seeds``: the noise seed of each image (default: from ``seed``
        and the call count)."""
        if content.dim() != 4 or content.shape[1] != 3:
            raise ValueError(f"diffusion style transfer needs content [B,3,H,W], got {tuple(content.shape)}")
        batch = content.shape[0]
        alpha = torch.as_tensor(alpha, dtype=torch.float32).detach().cpu()
        weights = (alpha.expand(batch) if alpha.dim() == 0 else alpha).tolist()
        if alpha.shape not in ((), (batch,)) or not all(0.0 <= a <= 1.0 for a in weights):
            raise ValueError(f"alpha must be a number or a [{batch}] tensor in [0, 1], got {alpha.tolist()}")
        if seeds is not None and len(seeds) != batch:
            raise ValueError(f"seeds must hold one seed per image ({batch}), got {len(seeds)}")
        call, self.calls = self.calls, self.calls + 1
        noise = [int(s) for s in seeds] if seeds is not None else None
        noise = noise or [_seed(self.seed, call, i) for i in range(batch)]
        # The pipeline only uses strength through int(steps * strength), so images sharing that step
        # count run in one call, with a strength that rounds down to exactly the count.
        groups: dict[int, list[int]] = {}
        for i, a in enumerate(weights):
            count = int(self.steps * (a * self.strength))
            if count > 0:
                groups.setdefault(count, []).append(i)
        out = content.clone()
        if not groups:
            return out
        if self.pipeline.device != content.device:
            self.pipeline.to(content.device)
        if self.pipeline_dtype is not None and self.pipeline.dtype != self.pipeline_dtype:
            self.pipeline.to(dtype=self.pipeline_dtype)
        height, width = content.shape[-2:]
        work = self._work_size(height, width)
        for count, index in groups.items():
            x = content[index].float()
            if work != (height, width):
                x = F.interpolate(x, size=work, mode="bilinear", align_corners=False, antialias=True)
            styled = self.pipeline(
                prompt=[self.prompt] * len(index),
                negative_prompt=None if self.negative_prompt is None else [self.negative_prompt] * len(index),
                image=x.clamp(0, 1),
                strength=min(1.0, (count + 0.5) / self.steps),
                num_inference_steps=self.steps,
                guidance_scale=self.guidance,
                generator=[torch.Generator().manual_seed(noise[i]) for i in index],
                output_type="pt",
            ).images.to(content.device, torch.float32)
            if styled.shape[-2:] != (height, width):
                styled = F.interpolate(
                    styled, size=(height, width), mode="bilinear", align_corners=False, antialias=True
                )
            out[index] = styled.clamp(0, 1).to(content.dtype)
        return out


def _write_png(path: Path, image: Tensor) -> None:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def generate_style_sources(
    model: str | os.PathLike[str] | DiffusionPipeline,
    prompt: str,
    out_dir: str | os.PathLike[str],
    *,
    images: Tensor | None = None,
    count: int | None = None,
    size: Sequence[int] | None = None,
    negative_prompt: str | None = None,
    strength: float = 0.8,
    steps: int = 30,
    guidance: float = 7.5,
    seed: int = 0,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> list[Path]:
    """Style source images y in the style ``prompt`` names (claims 5-7), as PNGs in ``out_dir``.

    Either ``images`` (uint8 ``[N,3,H,W]``, e.g. training images) are re-rendered image-to-image at
    ``strength``, or ``count`` images of ``size`` ``[H, W]`` are made from a flat grey canvas at strength
    1 (in effect text-to-image). ``out_dir`` must be new or empty; each PNG is written atomically, and
    ``prompt.txt`` records the prompt, i.e. the aspect in which y differs (claims 5-6). The pipeline runs
    on ``device``, cast to ``dtype`` when given (e.g. float16 on a GPU). Returns the PNGs' paths.
    """
    if (images is None) == (count is None):
        raise KdkitError("generate_style_sources needs exactly one of images and count (with size)")
    if images is not None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise KdkitError(
                f"style source images must be uint8 [N,3,H,W], got {images.dtype} {list(images.shape)}"
            )
        canvas = images
    else:
        if count < 1 or size is None or len(size) != 2:
            raise KdkitError("generate_style_sources with count needs count >= 1 and size [H, W]")
        canvas = torch.full((count, 3, *size), 128, dtype=torch.uint8)
        strength = 1.0
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KdkitError(f"style source folder '{out}' is not empty; choose a new folder")
    transfer = DiffusionStyle(
        model,
        prompt,
        negative_prompt,
        strength=strength,
        steps=steps,
        guidance=guidance,
        seed=seed,
        dtype=dtype,
    )
    paths: list[Path] = []
    for start in range(0, canvas.shape[0], batch_size):
        x = canvas[start : start + batch_size].to(device).float().div(255)
        y = transfer(x, None, torch.ones(x.shape[0], device=device))
        for image in y.mul(255).round().to(torch.uint8).cpu():
            paths.append(out / f"style_{len(paths):05d}.png")
            _write_png(paths[-1], image)
    atomic_write_text(out / "prompt.txt", prompt + "\n")
    return paths
