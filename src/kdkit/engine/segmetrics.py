"""Segmentation metrics: confusion matrix, IoU, pixel accuracy, Spirit Distillation's robustness
figures (per-image mIoU, its variance and HP-Acc), and sliding-window inference.

Masks are integer ``[B, H, W]`` with ``ignore_index`` (255) for unlabelled pixels, which count nowhere.
Functions return fractions in ``[0, 1]``; :meth:`SegmentationMeter.compute` converts to the units
of the papers' tables (see there).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..data.base import IGNORE_INDEX


def _pairs(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """``target * C + pred`` of the labelled pixels, and their mask."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    valid = target != ignore_index
    labelled = target[valid]
    if labelled.numel() and (labelled.min() < 0 or labelled.max() >= num_classes):
        raise ValueError(f"target holds values outside 0..{num_classes - 1} other than {ignore_index}")
    return target.long() * num_classes + pred.long(), valid


def confusion_matrix(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """``[C, C]`` int64 counts, rows = target class, columns = predicted class.

    ``pred`` and ``target`` are integer tensors of one shape; pixels whose target is ``ignore_index``
    are left out.
    """
    code, valid = _pairs(pred, target, num_classes, ignore_index)
    return torch.bincount(code[valid], minlength=num_classes**2).reshape(num_classes, num_classes)


def class_iou(cm: Tensor) -> Tensor:
    """Per-class IoU ``TP / (TP + FP + FN)`` (float64 ``[..., C]``) from confusion matrices ``[..., C, C]``
    (rows = target).

    NaN for a class absent from both the target and the prediction (0 / 0).
    """
    cm = cm.double()
    tp = cm.diagonal(dim1=-2, dim2=-1)
    union = cm.sum(-2) + cm.sum(-1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))


def mean_iou(cm: Tensor) -> float:
    """Mean of :func:`class_iou` over the classes where it is defined (nanmean); NaN if none is."""
    return class_iou(cm).nanmean().item()


def pixel_accuracy(cm: Tensor) -> float:
    """Share of labelled pixels predicted correctly, ``trace(cm) / sum(cm)``; NaN without pixels."""
    total = cm.sum().item()
    return cm.diagonal().sum().item() / total if total else math.nan


def per_image_miou(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """mIoU of each image, Spirit Distillation (Wu et al. 2021) Eq. 4: float64 ``[B]``.

    Eq. 4 averages ``TP / (TP + FP + FN)`` over the ``k + 1`` classes within image ``i``. A class
    absent from both that image's target and its prediction (at labelled pixels) gives 0 / 0; we read
    the mean as taken over the classes present in the target or the prediction, as the dataset mIoU
    does. An image without labelled pixels gets NaN.
    """
    b = target.shape[0]
    code, valid = _pairs(pred, target, num_classes, ignore_index)
    image = torch.arange(b, device=code.device).view(b, *[1] * (code.dim() - 1)) * num_classes**2
    counts = torch.bincount((code + image)[valid], minlength=b * num_classes**2)
    return class_iou(counts.reshape(b, num_classes, num_classes)).nanmean(-1)


def _finite(values: Sequence[float | None] | Tensor) -> Tensor:
    """The values as float64, NaN and None (images without labelled pixels) left out."""
    if not isinstance(values, Tensor):
        values = [math.nan if x is None else x for x in values]
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    return v[~v.isnan()]


def mean_image_miou(values: Sequence[float | None] | Tensor) -> float:
    """Spirit Distillation's overall mIoU, Eq. 5: ``1/n sum_i mIoU_i``, the mean of per-image mIoUs
    (:func:`per_image_miou`). NaN entries (images without labelled pixels) are left out.

    It differs from the dataset mIoU (:func:`mean_iou` of the summed confusion matrix): every image
    weighs the same, whatever its size, and a class is averaged only over the images showing it.
    """
    v = _finite(values)
    return v.mean().item() if v.numel() else math.nan


def miou_variance(values: Sequence[float | None] | Tensor) -> float:
    """Population variance of per-image mIoUs, Spirit Distillation Eq. 6: ``1/n sum (mIoU_i - mIoU)^2``.

    ``mIoU`` is the mean of the values (Eq. 5); NaN entries (images without labelled pixels) are left
    out. Same units as the values squared (fractions in, fraction^2 out).
    """
    v = _finite(values)
    return v.var(correction=0).item() if v.numel() else math.nan


def hp_acc(values: Sequence[float | None] | Tensor, threshold: float = 0.75) -> float:
    """High-precision accuracy, Spirit Distillation Eq. 7-8: share of images with mIoU ``> threshold``.

    Strictly above ``theta`` (0.75 in the paper, in the units of the values); NaN entries are left
    out. A fraction in ``[0, 1]``.
    """
    v = _finite(values)
    return (v > threshold).double().mean().item() if v.numel() else math.nan


class SegmentationMeter:
    """Accumulates a confusion matrix and per-image mIoUs over an evaluation.

    :meth:`update` takes logits ``[B, C, h, w]`` (resized bilinearly to the mask when the size differs,
    then arg-max) or predicted classes ``[B, H, W]``, and masks ``[B, H, W]``. ``indices`` are the
    images' positions in the dataset; by default image ``k`` of this process is ``rank + k * world``,
    the strided split of :class:`~kdkit.engine.batches.Batches` for evaluation.

    :meth:`compute` reduces over processes when ``torch.distributed`` is initialised (the confusion
    matrices are summed, the per-image values gathered, counts may differ per process) and returns:

    * ``miou``, ``pixel_acc``: dataset mIoU (from the confusion matrix summed over all images) and
      pixel accuracy, in %;
    * ``miou_per_image``: Spirit Distillation's mIoU (Eq. 5), the mean of the per-image mIoUs, in %;
    * ``class_iou``: per-class IoU in % (None for a class absent from both target and prediction);
    * ``image_miou``: per-image mIoU (Eq. 4) as **fractions**, ordered by image index (None for an
      image without labelled pixels), ready for :func:`~kdkit.report.histogram.plot_miou_histogram`;
    * ``miou_var``: population variance of the per-image mIoU fractions (Eq. 6) in units of 1e-3, as
      the paper's Table III prints it ("Var(10^-3)": ``5.77`` means a variance of 0.00577);
    * ``hp_acc``: share of images with mIoU above ``hp_threshold`` (a fraction, Eq. 7-8), in %.

    ``miou`` and ``miou_per_image`` are different figures (see :func:`mean_image_miou`); the Spirit
    Distillation presets report the latter as their headline (``evaluation.metric``), as its tables do.
    """

    def __init__(
        self, num_classes: int, ignore_index: int = IGNORE_INDEX, hp_threshold: float = 0.75
    ) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.hp_threshold = hp_threshold
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self._values: list[Tensor] = [torch.zeros(0, dtype=torch.float64)]
        self._indices: list[Tensor] = [torch.zeros(0, dtype=torch.int64)]
        self._seen = 0

    def update(self, logits_or_pred: Tensor, target: Tensor, indices: Tensor | None = None) -> None:
        """Add a batch: logits ``[B, C, h, w]`` or predicted classes ``[B, H, W]``, masks ``[B, H, W]``."""
        pred, size = logits_or_pred, tuple(target.shape[-2:])
        if pred.is_floating_point():
            if tuple(pred.shape[-2:]) != size:
                pred = F.interpolate(pred.float(), size=size, mode="bilinear", align_corners=False)
            pred = pred.argmax(1)
        target = target.to(pred.device)
        cm = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self.cm = self.cm.to(cm.device) + cm
        self._values.append(per_image_miou(pred, target, self.num_classes, self.ignore_index))
        if indices is None:
            rank, world = _rank_world()
            indices = rank + world * torch.arange(self._seen, self._seen + target.shape[0])
        self._indices.append(torch.as_tensor(indices, dtype=torch.int64))
        self._seen += target.shape[0]

    def compute(self) -> dict[str, object]:
        """The figures over everything seen (all processes); the state is left unchanged."""
        cm = self.cm.clone()
        values = torch.cat([v.to(cm.device) for v in self._values])
        indices = torch.cat([i.to(cm.device) for i in self._indices])
        if _rank_world()[1] > 1:
            dist.all_reduce(cm)
            values, indices = _all_gather_uneven(values), _all_gather_uneven(indices)
        values = values[indices.argsort()].cpu()
        ious = class_iou(cm).cpu()
        return {
            "miou": 100 * mean_iou(cm),
            "miou_per_image": 100 * mean_image_miou(values),
            "pixel_acc": 100 * pixel_accuracy(cm),
            "class_iou": [None if math.isnan(x) else 100 * x for x in ious.tolist()],
            "image_miou": [None if math.isnan(x) else x for x in values.tolist()],
            "miou_var": 1000 * miou_variance(values),
            "hp_acc": 100 * hp_acc(values, self.hp_threshold),
        }


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather_uneven(x: Tensor) -> Tensor:
    """Concatenate a 1-d tensor over processes (rank order) when lengths differ: pad, gather, trim."""
    world = dist.get_world_size()
    length = torch.tensor([x.numel()], dtype=torch.int64, device=x.device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    longest = max(int(n) for n in lengths)
    padded = torch.zeros(longest, dtype=x.dtype, device=x.device)
    padded[: x.numel()] = x
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, lengths)])


def slide_logits(
    model_fn: Callable[[Tensor], Tensor],
    image: Tensor,
    num_classes: int,
    crop: tuple[int, int],
    stride: tuple[int, int],
) -> Tensor:
    """Sliding-window inference: ``[B, C, H, W]`` float32 logits of ``image`` ``[B, 3, H, W]``.

    Windows of size ``crop`` start every ``stride`` (at most ``crop``) pixels along each axis, the
    last one aligned with the bottom/right border so the image is covered (overlaps when the stride
    is below the crop); each pixel's logits are the mean over the windows containing it. An image
    smaller than the crop is padded at the bottom/right with 0 (the mean colour in normalised units)
    and the logits cropped back. Window logits of another size than the window are resized
    bilinearly to it first.
    Whole-image inference is simply ``model_fn(image)``.
    """
    b, _, h, w = image.shape
    (ch, cw), (sh, sw) = crop, stride
    if not (0 < sh <= ch and 0 < sw <= cw):
        raise ValueError(f"stride {tuple(stride)} must be positive and at most the crop {tuple(crop)}")
    padded = F.pad(image, (0, max(cw - w, 0), 0, max(ch - h, 0)))
    ph, pw = padded.shape[-2:]
    total = torch.zeros(b, num_classes, ph, pw, dtype=torch.float32, device=image.device)
    count = torch.zeros(1, 1, ph, pw, dtype=torch.float32, device=image.device)
    rows = range(0, max(ph - ch, 0) + sh, sh)
    cols = range(0, max(pw - cw, 0) + sw, sw)
    for top in (min(y, ph - ch) for y in rows):
        for left in (min(x, pw - cw) for x in cols):
            logits = model_fn(padded[:, :, top : top + ch, left : left + cw]).float()
            if tuple(logits.shape[-2:]) != (ch, cw):
                logits = F.interpolate(logits, size=(ch, cw), mode="bilinear", align_corners=False)
            total[:, :, top : top + ch, left : left + cw] += logits
            count[:, :, top : top + ch, left : left + cw] += 1
    return (total / count)[:, :, :h, :w]
