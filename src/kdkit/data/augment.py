"""Batch augmentation from per-sample keys: reproducible, resumable mid-epoch, batch-independent.

Each sample's parameters come from its own :class:`~kdkit.data.draws.SampleKeys` stream (drawn on the
CPU, moved to the batch's device), so a sample is augmented the same way whatever batch, batch
position or process holds it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .draws import SampleKeys


class BatchAugment:
    """Random crop (zero padding, per-sample offsets) + horizontal flip, then normalisation.

    The config defaults (``data.augment``: ``crop_padding: 4``, ``flip: true``) are the CIFAR recipe
    of the KD literature. A flip changes the class of mirror-sensitive images (digits, letters, text,
    left/right signs): set ``flip: false`` for those (and ``crop_padding: 0`` where a shift matters).
    Each run's ``report.md`` states the augmentation it used.

    ``augment(images, keys)`` takes uint8 (0..255) or float (0..1) ``[B,C,H,W]`` and
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

    def sample(self, keys: SampleKeys) -> tuple[Tensor, Tensor]:
        """Each sample's crop offsets ``[B, 2]`` (uniform in ``0..2p``) and flip flag ``[B]``."""
        u = keys.uniform(3)
        offsets = (u[:, :2] * (2 * self.crop_padding + 1)).long()
        return offsets, (u[:, 2] < 0.5) & self.flip

    def __call__(self, images: Tensor, keys: SampleKeys) -> Tensor:
        """Augment ``images`` ``[B,C,H,W]``, row ``j`` with the stream of sample ``keys.indices[j]``."""
        b, _, h, w = images.shape
        p = self.crop_padding
        if len(keys) != b:
            raise ValueError(f"{b} images but {len(keys)} sample keys")
        offsets, flips = (t.to(images.device) for t in self.sample(keys))
        # one gather does crop and flip: source row/column of every output pixel, per sample
        cols = torch.arange(w, device=images.device).expand(b, w)
        cols = torch.where(flips[:, None], w - 1 - cols, cols) + offsets[:, 1:]
        rows = torch.arange(h, device=images.device) + offsets[:, :1]
        padded = F.pad(images, (p, p, p, p)) if p else images
        batch = torch.arange(b, device=images.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [B,H,W,C]
        return self.normalize(out.permute(0, 3, 1, 2))
