"""Joint image/box augmentation for detection: random scale, crop/pad at a random position, flip.

Each sample's parameters come from its own :class:`~kdkit.data.draws.SampleKeys` stream (as in
:class:`~kdkit.data.seg_augment.SegmentationAugment`), so a sample gets the same view in any batch or
process. The geometry runs through
``torchvision.transforms.v2.functional`` on the image and on ``tv_tensors.BoundingBoxes`` together,
so boxes move exactly with the pixels; boxes are clamped to the output frame and dropped when they
leave it or get thinner than ``min_size`` pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision import tv_tensors

from .augment import BatchAugment
from .det_base import check_target, pad_targets, unpad
from .draws import SampleKeys
from .seg_augment import scale_position_flip

MIN_BOX = 2.0
"""Boxes thinner than this (pixels) after a geometric augmentation are dropped."""


def fit_scale(height: int, width: int, size: tuple[int, int]) -> float:
    """The factor that makes an ``height x width`` image fit inside ``size`` keeping its aspect."""
    return min(size[0] / height, size[1] / width)


def letterbox(image: Tensor, size: Sequence[int]) -> tuple[Tensor, float]:
    """Resize ``image`` (uint8 ``[3,H,W]``) keeping its aspect so it fits ``size`` ``(h, w)``, pad right
    and bottom with 0: ``(image uint8 [3,h,w], scale)``. Boxes found on the output divide by ``scale``."""
    h, w = int(size[0]), int(size[1])
    scale = fit_scale(image.shape[-2], image.shape[-1], (h, w))
    new = (min(h, max(1, round(image.shape[-2] * scale))), min(w, max(1, round(image.shape[-1] * scale))))
    if new != tuple(image.shape[-2:]):
        image = TF.resize(image, list(new), antialias=True)
    return TF.crop(image, 0, 0, h, w), scale


class DetectionAugment:
    """``(images, targets, keys) -> (normalised float images [B,3,h,w], targets [B,M,5])``.

    Per image: resize by ``fit * s`` (``fit`` makes the image fit ``size`` keeping its aspect, 1 when it
    already has that size; ``s`` uniform in ``scale``), crop or pad to ``size`` at a uniformly random
    position (padding is 0 in normalised units, the mean colour), flip horizontally with probability
    1/2 when ``flip``. ``size`` defaults to the size of the first image. ``images`` is uint8
    ``[B,3,H,W]`` with padded targets ``[B,M,5]``, or lists of ``[3,H_i,W_i]`` images and ``[n_i,5]``
    targets; the output targets are padded to the input's ``M`` (lists: the largest ``n_i``).
    """

    def __init__(
        self,
        size: Sequence[int] | None = None,
        scale: tuple[float, float] = (1.0, 1.0),
        flip: bool = True,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        min_size: float = MIN_BOX,
    ) -> None:
        if size is not None and (len(size) != 2 or min(size) < 1):
            raise ValueError(f"size must be (height, width) in pixels, got {size}")
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale}")
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.scale = (float(scale[0]), float(scale[1]))
        self.flip = flip
        self.min_size = float(min_size)
        self._normalize = BatchAugment(0, False, mean, std)

    def sample(self, keys: SampleKeys) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample scale factors ``[B]``, crop/pad positions in [0,1) ``[B,2]``, flips ``[B]``."""
        return scale_position_flip(keys, self.scale, self.flip)

    @staticmethod
    def offset(length: int, crop: int, position: float) -> int:
        """Top (or left) of the crop window: in ``[0, length - crop]`` when the image is larger, else
        negative down to ``length - crop`` (the image lands at a random place inside the padding)."""
        span = length - crop
        return int(position * (span + 1)) if span >= 0 else -int(position * (1 - span))

    def place(
        self, h: int, w: int, scale: float, position: Tensor, size: tuple[int, int]
    ) -> tuple[int, int, int, int]:
        """``(new_h, new_w, top, left)``: the rescaled size of an ``h x w`` image and its crop window."""
        factor = fit_scale(h, w, size) * scale
        new_h, new_w = max(1, round(h * factor)), max(1, round(w * factor))
        top = self.offset(new_h, size[0], float(position[0]))
        return new_h, new_w, top, self.offset(new_w, size[1], float(position[1]))

    def one(
        self, image: Tensor, target: Tensor, scale: float, position: Tensor, flip: bool, size: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """Rescale, crop/pad (with 0) and flip one image ``[3,H,W]`` (uint8 or float) and its target
        ``[n,5]``; the boxes are clamped to the frame, and dropped when thinner than ``min_size``."""
        h, w = image.shape[-2:]
        target = check_target(target)
        boxes = tv_tensors.BoundingBoxes(target[:, :4], format="XYXY", canvas_size=(h, w))
        boxes = TF.clamp_bounding_boxes(boxes)
        new_h, new_w, top, left = self.place(h, w, scale, position, size)
        if (new_h, new_w) != (h, w):
            image = TF.resize(image, [new_h, new_w], antialias=True)
            boxes = TF.resize(boxes, [new_h, new_w])
        image, boxes = TF.crop(image, top, left, *size), TF.crop(boxes, top, left, *size)
        if flip:
            image, boxes = TF.horizontal_flip(image), TF.horizontal_flip(boxes)
        boxes = TF.clamp_bounding_boxes(boxes).as_subclass(Tensor)
        wh = boxes[:, 2:] - boxes[:, :2]
        keep = (wh > 0).all(1) & (wh >= self.min_size).all(1)
        return image, torch.cat([boxes, target[:, 4:]], 1)[keep]

    def __call__(
        self,
        images: Tensor | list[Tensor],
        targets: Tensor | list[Tensor],
        keys: SampleKeys,
    ) -> tuple[Tensor, Tensor]:
        """Augment a batch, row ``j`` with the stream of sample ``keys.indices[j]``.

        The geometry runs on the uint8 images (fast); the batch is then normalised at once and the
        padding set to 0 in normalised units.
        """
        count = len(images)
        if len(targets) != count:
            raise ValueError(f"{count} images but {len(targets)} targets")
        rows = (
            [unpad(t) for t in targets] if isinstance(targets, Tensor) else [check_target(t) for t in targets]
        )
        most = targets.shape[1] if isinstance(targets, Tensor) else max((len(t) for t in rows), default=0)
        scales, positions, flips = self.sample(keys)
        size = self.size or tuple(images[0].shape[-2:])
        out, boxes = [], []
        inside = torch.zeros(count, 1, *size, dtype=torch.bool)
        for i, (image, t, s, pos, f) in enumerate(zip(images, rows, scales, positions, flips)):
            x, b = self.one(image, t.cpu(), float(s), pos, bool(f), size)
            out.append(x)
            boxes.append(b)
            new_h, new_w, top, left = self.place(*image.shape[-2:], float(s), pos, size)
            c0, c1 = max(0, -left), min(size[1], new_w - left)
            c0, c1 = (size[1] - c1, size[1] - c0) if f else (c0, c1)
            inside[i, :, max(0, -top) : min(size[0], new_h - top), c0:c1] = True
        batch = self._normalize.normalize(torch.stack(out))
        batch = batch.mul_(inside.to(batch.device))  # padding: 0 after normalisation, the mean colour
        return batch, pad_targets(boxes, max(most, 1)).to(batch.device)
