"""Joint image/mask augmentation for segmentation: random scale, crop with ignore fill, flip.

Parameters are sampled for the whole global batch from an explicit generator and then applied to
this process's slice (as :class:`~kdkit.data.augment.BatchAugment` does), so the same generator state
gives the same views anywhere. Images are resized bilinearly, masks with nearest neighbours; the
padding needed when a rescaled image is smaller than the crop is 0 in normalised units (the mean
colour) for images and the ignore index for masks, so padded pixels never count in a loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .augment import BatchAugment
from .base import IGNORE_INDEX


class SegmentationAugment:
    """``(images, masks, generator) -> (normalised float images [B,3,h,w], int64 masks [B,h,w])``.

    ``images``/``masks`` are a batch (uint8 ``[B,3,H,W]``, ``[B,H,W]``) or lists of differently sized
    samples. ``crop`` ``(h, w)`` defaults to the size of the first sample.
    """

    def __init__(
        self,
        scale: tuple[float, float] = (1.0, 1.0),
        crop: tuple[int, int] | None = None,
        flip: bool = True,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.scale = (float(scale[0]), float(scale[1]))
        self.crop = tuple(crop) if crop is not None else None
        self.flip = flip
        self.ignore_index = ignore_index
        self._normalize = BatchAugment(0, False, mean, std)

    def sample(self, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample scale factors ``[count]``, crop positions in [0,1) ``[count,2]``, flips ``[count]``."""
        lo, hi = self.scale
        dev = generator.device
        scales = lo + (hi - lo) * torch.rand(count, generator=generator, device=dev)
        positions = torch.rand(count, 2, generator=generator, device=dev)
        flips = torch.rand(count, generator=generator, device=dev) < 0.5
        return scales, positions, flips & self.flip

    def one(
        self, image: Tensor, mask: Tensor, scale: float, position: Tensor, flip: bool, crop: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """Rescale, pad, crop and flip one normalised image ``[3,H,W]`` and its mask ``[H,W]``."""
        h, w = image.shape[-2:]
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        if size != (h, w):
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
            mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].to(mask.dtype)
        ch, cw = crop
        pad_h, pad_w = max(ch - size[0], 0), max(cw - size[1], 0)
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h))
            mask = F.pad(mask, (0, pad_w, 0, pad_h), value=self.ignore_index)
        top = int(position[0] * (image.shape[-2] - ch + 1))
        left = int(position[1] * (image.shape[-1] - cw + 1))
        image, mask = image[:, top : top + ch, left : left + cw], mask[top : top + ch, left : left + cw]
        if flip:
            image, mask = image.flip(-1), mask.flip(-1)
        return image, mask

    def __call__(
        self,
        images: Tensor | list[Tensor],
        masks: Tensor | list[Tensor],
        generator: torch.Generator,
        total: int | None = None,
        start: int = 0,
    ) -> tuple[Tensor, Tensor]:
        """Augment the slice ``[start, start + B)`` of a global batch of ``total`` samples."""
        count = len(images)
        scales, positions, flips = (p[start : start + count] for p in self.sample(total or count, generator))
        crop = self.crop or tuple(images[0].shape[-2:])
        pairs = [
            self.one(
                self._normalize.normalize(image[None])[0], mask.long(), float(s), pos, bool(f), crop
            )
            for image, mask, s, pos, f in zip(images, masks, scales, positions, flips)
        ]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
