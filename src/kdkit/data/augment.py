"""Batch augmentation with an explicit generator: reproducible and resumable mid-epoch.

Random numbers are drawn on the generator's device (a CPU generator works for a CUDA batch)
and moved to the batch's device, so the same generator state gives the same batch anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


class BatchAugment:
    """Random crop (zero padding, per-sample offsets) + horizontal flip, then normalisation.

    The config defaults (``data.augment``: ``crop_padding: 4``, ``flip: true``) are the CIFAR recipe
    of the KD literature. A flip changes the class of mirror-sensitive images (digits, letters, text,
    left/right signs): set ``flip: false`` for those (and ``crop_padding: 0`` where a shift matters).
    Each run's ``report.md`` states the augmentation it used.

    ``augment(images, generator)`` takes uint8 (0..255) or float (0..1) ``[B,C,H,W]`` and
    returns normalised float32; :meth:`normalize` is the evaluation path (no randomness).
    """

    def __init__(
        self,
        crop_padding: int = 4,
        flip: bool = True,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
    ) -> None:
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        self.crop_padding = crop_padding
        self.flip = flip
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def normalize(self, images: Tensor) -> Tensor:
        """Float32 ``(x - mean) / std`` with ``x`` in [0,1]."""
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return (x - mean) / std

    def sample(self, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Random parameters of ``count`` samples: crop offsets ``[count, 2]`` and flip flags ``[count]``."""
        p = self.crop_padding
        offsets = torch.randint(0, 2 * p + 1, (count, 2), generator=generator, device=generator.device)
        flips = torch.rand(count, generator=generator, device=generator.device) < 0.5
        return offsets, flips & self.flip

    def __call__(
        self, images: Tensor, generator: torch.Generator, total: int | None = None, start: int = 0
    ) -> Tensor:
        """Augment ``images``, the slice ``[start, start + B)`` of a batch of ``total`` samples.

        Parameters are drawn for the whole batch and sliced, so processes that each hold a slice of
        one global batch augment it exactly as one process holding all of it would.
        """
        b, _, h, w = images.shape
        p = self.crop_padding
        offsets, flips = self.sample(total or b, generator)
        offsets, flips = (
            offsets[start : start + b].to(images.device),
            flips[start : start + b].to(images.device),
        )
        # one gather does crop and flip: source row/column of every output pixel, per sample
        cols = torch.arange(w, device=images.device).expand(b, w)
        cols = torch.where(flips[:, None], w - 1 - cols, cols) + offsets[:, 1:]
        rows = torch.arange(h, device=images.device) + offsets[:, :1]
        padded = F.pad(images, (p, p, p, p)) if p else images
        batch = torch.arange(b, device=images.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [B,H,W,C]
        return self.normalize(out.permute(0, 3, 1, 2))
