"""``style``: style-augmented distillation (Li, Khoreva, Zhang; US 2025/0265822 A1, claims 1-13).

From each training image x and a style source image y the refiner makes x' with x's content and a
style taken from y ([0014]-[0017]), interpolated between x's own style and y's by ``alpha`` (claim 4,
[0023]). The batch the teacher and the student see is then ``[x; x']`` (claim 1, [0008]): the KD
terms compare them on both, and the task loss uses x's labels for x' too (claim 13, [0041]) unless
``label_styled: false`` (then x' only carries distillation terms: its labels, or masks, are the ignore
index, so the task loss skips x' and only label-free terms see it).

Reusing x's mask for x' assumes x' keeps x's geometry. Fourier and AdaIN styles do; a diffusion
pipeline may move, add or remove objects. So in segmentation, ``method: diffusion`` needs an explicit
``label_styled``: ``true`` reuses x's masks (with a warning, once per run), ``false`` gives x' no mask.

Content/style splits (``method``):

- ``fourier``: low-frequency amplitude spectrum as style, phase as content (training-free);
- ``adain``: a trained encoder F and generator G (``kdkit train-style``; [0021]-[0022]), style =
  channel-wise mean and std of F's features;
- ``diffusion``: a text-prompted image-to-image diffusion pipeline from a local folder (claim 7);
  it makes x' directly from the prompt, so it needs no style source. The noise of each image is seeded
  from the step's refine generator (run seed, stage, epoch, step) and the image's position in the global
  batch, so a resumed run and every process of a DDP run draw what one uninterrupted process draws.

Style sources (``sources``) are datasets whose images serve as y: an ``unlabeled_folder`` of night or
fog images, images made by ``kdkit.refiners.diffusion.generate_style_sources``, or an embedded
dataset's styles. At most ``MAX_SOURCES`` (1,024) are held, as uint8: beyond that a random sample seeded
by the run seed, drawn over all sources together. ``aspects`` records which aspect they change (claims
5-6); it is saved with the run.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import KdkitError
from ..registry import REFINERS, did_you_mean
from .base import DataRefiner, RefinerContext

METHODS = ("fourier", "adain", "diffusion")
ASPECTS = ("time_of_day", "season", "weather", "imperfections", "camera")  # claim 6
MAX_SOURCES = 1024  # style source images held in memory (uint8)


def _check_choices(values: Sequence[str], choices: Sequence[str], what: str) -> None:
    for value in values:
        if value not in choices:
            raise KdkitError(f"style refiner: unknown {what} '{value}'{did_you_mean(value, list(choices))}")


@REFINERS.register(
    "style", "patent US 2025/0265822: distil on x and style-augmented x' (fourier/adain/diffusion)"
)
class StyleRefiner(DataRefiner):
    """Appends a styled copy x' of every training image to the batch (see the module docstring).

    ``alpha``: a float, or ``[lo, hi]`` for a per-image uniform draw. ``beta``: the Fourier band.
    ``model``: the AdaIN F/G file (``kdkit train-style``) or the diffusion pipeline folder.
    ``prompt``, ``strength``, ``steps``: the diffusion backend's settings. ``label_styled``: whether
    x' carries x's labels/masks (default true; required explicitly for diffusion in segmentation).
    """

    def __init__(
        self,
        *,
        method: str = "fourier",
        sources: list[dict[str, Any]] | None = None,
        alpha: float | list[float] = 1.0,
        beta: float = 0.01,
        model: str | None = None,
        prompt: str | None = None,
        strength: float = 0.5,
        steps: int = 20,
        label_styled: bool | None = None,
        aspects: list[str] | None = None,
    ) -> None:
        super().__init__()
        _check_choices([method], METHODS, "method")
        _check_choices(aspects or [], ASPECTS, "aspect")
        if method != "diffusion" and not sources:
            raise KdkitError(
                f"style refiner with method '{method}' needs sources: datasets of style images, e.g. "
                "[{name: unlabeled_folder, root: night_images}]"
            )
        if method in ("adain", "diffusion") and model is None:
            what = (
                "the F/G file from `kdkit train-style`" if method == "adain" else "a local diffusers folder"
            )
            raise KdkitError(f"style refiner with method '{method}' needs model: {what}")
        if method == "diffusion" and not prompt:
            raise KdkitError(
                "style refiner with method 'diffusion' needs a prompt, e.g. 'at night, heavy rain'"
            )
        self.method, self.source_specs, self.alpha = method, list(sources or []), alpha
        self.beta, self.model_path, self.prompt = beta, model, prompt
        self.strength, self.steps = strength, steps
        self.label_styled = label_styled
        self.aspects = list(aspects or [])
        self.sources: list[Tensor] = []
        self._resized: dict[tuple, Tensor] = {}
        self.transfer: torch.nn.Module | None = None

    # ------------------------------------------------------------------ setup

    def setup(self, context: RefinerContext) -> None:
        super().setup(context)
        moves_geometry = self.method == "diffusion" and context.task == "segmentation"
        if self.label_styled is None:
            if moves_geometry:
                raise KdkitError(
                    "style refiner: method 'diffusion' may change the geometry of x', so x's masks may not "
                    "fit it; choose label_styled: true (reuse x's masks) or false (x' gets no mask)"
                )
            self.label_styled = True
        if self.label_styled and moves_geometry:
            warnings.warn(
                "style refiner: label_styled: true reuses x's masks for diffusion-styled x', whose "
                "geometry may differ; set label_styled: false to keep the task loss off x'",
                UserWarning,
                stacklevel=2,
            )
        if not self.label_styled and any(t != "ce" for t in context.label_terms):
            raise KdkitError(
                f"style refiner: label_styled: false leaves x' without labels, but the terms "
                f"{[t for t in context.label_terms if t != 'ce']} need them; set label_styled: true"
            )
        self.transfer = self._build_transfer().to(context.device)
        self.sources = self._load_sources()

    def _build_transfer(self) -> torch.nn.Module:
        from . import style_transfer

        if self.method == "fourier":
            return style_transfer.FourierStyle(self.beta)
        if self.method == "adain":
            from .style_models import load_trained_style

            return load_trained_style(self.model_path)
        from .diffusion import DiffusionStyle

        return DiffusionStyle(self.model_path, self.prompt, strength=self.strength, steps=self.steps)

    def _load_sources(self) -> list[Tensor]:
        """The style images as uint8 ``[3, H, W]``: every image of every source, or, when they hold more
        than ``MAX_SOURCES``, a sample of that many drawn without replacement over all of them together
        from the run seed (``context.seed``); kept in the sources' order."""
        from ..engine.batches import generator

        datasets = []
        for spec in self.source_specs:
            unknown = set(spec) - {"name", "root", "split", "params"}
            if "name" not in spec or unknown:
                raise KdkitError(
                    f"style refiner: a source is {{name, root, split, params}}, got keys {sorted(spec)}"
                )
            datasets.append(
                self.context.build_dataset(
                    spec["name"], spec.get("root"), spec.get("split", "train"), dict(spec.get("params", {}))
                )
            )
        sizes = [len(d) for d in datasets]
        total = sum(sizes)
        if self.source_specs and not total:
            raise KdkitError("style refiner: the style sources hold no image")
        picked = torch.arange(total)
        if total > MAX_SOURCES:
            seed = getattr(self.context, "seed", 0)
            draw = torch.randperm(total, generator=generator("style-sources", seed))
            picked = draw[:MAX_SOURCES].sort().values
        images, offset = [], 0
        for dataset, size in zip(datasets, sizes):
            for i in picked[(picked >= offset) & (picked < offset + size)].tolist():
                images.append(_as_uint8(dataset[i - offset][0]))
            offset += size
        return images

    # ------------------------------------------------------------------ step

    def _sources_at(self, size: tuple[int, int], device: torch.device) -> Tensor:
        """Every style source resized to ``size``, uint8 ``[N, 3, H, W]`` on ``device``, made once per
        size (uint8: 1,024 sources at 512x1024 take 1.6 GB, not float32's 6.4 GB)."""
        key = (size, str(device))
        if key not in self._resized:
            self._resized[key] = torch.cat(
                [
                    F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False,
                                  antialias=True).round_().clamp_(0, 255).to(torch.uint8)
                    for image in self.sources
                ]
            ).to(device)  # fmt: skip
        return self._resized[key]

    def styled(
        self,
        content: Tensor,
        style_index: Tensor | None,
        alpha: Tensor,
        noise_seeds: Sequence[int] | None = None,
    ) -> Tensor:
        """x' in [0, 1] for ``content`` in [0, 1], style source images ``style_index``, ``alpha``;
        ``noise_seeds``: one per image for the diffusion backend (ignored by the others)."""
        assert self.transfer is not None, "call setup() first"
        style = None
        if style_index is not None:
            sources = self._sources_at(tuple(content.shape[-2:]), content.device)
            style = sources[style_index.to(sources.device)].float().div_(255)
        if self.method == "diffusion":
            return self.transfer(content, style, alpha, seeds=noise_seeds)
        return self.transfer(content, style, alpha)

    def forward(
        self, images: Tensor, labels: Tensor, generator: torch.Generator, total: int, start: int
    ) -> tuple[Tensor, Tensor]:
        from .style_transfer import interpolate_alpha

        count = images.shape[0]
        alpha = interpolate_alpha(self.alpha, total, generator)[start : start + count].to(images.device)
        index = seeds = None
        if self.sources:
            index = torch.randint(0, len(self.sources), (total,), generator=generator)[start : start + count]
        if self.method == "diffusion":  # per global sample position, so slices match one process
            seeds = torch.randint(0, 2**62, (total,), generator=generator)[start : start + count].tolist()
        with torch.no_grad():
            styled = self.styled(self.context.to_unit(images.float()), index, alpha, seeds)
        styled = (
            self.context.normalize(styled)
            .to(images.dtype)
            .contiguous(
                memory_format=torch.channels_last
                if images.is_contiguous(memory_format=torch.channels_last)
                else torch.contiguous_format
            )
        )
        styled_labels = labels if self.label_styled else torch.full_like(labels, self.context.ignore_index)
        return torch.cat([images, styled]), torch.cat([labels, styled_labels])


def _as_uint8(image: Tensor) -> Tensor:
    """A source image as uint8 (datasets give uint8; a float image is read as [0, 1])."""
    if image.dtype == torch.uint8:
        return image
    return image.float().mul(255).round().clamp(0, 255).to(torch.uint8)
