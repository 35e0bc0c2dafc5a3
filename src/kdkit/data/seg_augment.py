"""Joint image/mask augmentation for segmentation: random scale, crop with ignore fill, flip.

Each sample's parameters come from its own :class:`~kdkit.data.draws.SampleKeys` stream (as in
:class:`~kdkit.data.augment.BatchAugment`), so a sample gets the same view in any batch or process.
Images are resized bilinearly, masks with nearest neighbours; the padding needed when a rescaled
image is smaller than the crop is 0 in normalised units (the mean colour) for images and the ignore
index for masks, so padded pixels never count in a loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .augment import BatchAugment
from .base import IGNORE_INDEX
from .draws import SampleKeys


def scale_position_flip(
    keys: SampleKeys, scale: tuple[float, float], flip: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample scale factors uniform in ``scale`` ``[B]``, crop positions in [0,1) ``[B,2]`` and flips
    ``[B]`` (probability 1/2 when ``flip``): the draws of the segmentation and detection augmenters."""
    u = keys.uniform(4)
    lo, hi = scale
    return lo + (hi - lo) * u[:, 0], u[:, 1:3], (u[:, 3] < 0.5) & flip


class SegmentationAugment:
    """``(images, masks, keys) -> (normalised float images [B,3,h,w], int64 masks [B,h,w])``.

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

    def sample(self, keys: SampleKeys) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample scale factors ``[B]``, crop positions in [0,1) ``[B,2]``, flips ``[B]``."""
        return scale_position_flip(keys, self.scale, self.flip)

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
        keys: SampleKeys,
    ) -> tuple[Tensor, Tensor]:
        """Augment a batch, row ``j`` with the stream of sample ``keys.indices[j]``."""
        scales, positions, flips = self.sample(keys)
        crop = self.crop or tuple(images[0].shape[-2:])
        pairs = [
            self.one(self._normalize.normalize(image[None])[0], mask.long(), float(s), pos, bool(f), crop)
            for image, mask, s, pos, f in zip(images, masks, scales, positions, flips)
        ]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
