"""FGD: focal and global distillation of detector features, Yang et al. 2022 (CVPR), Sec. 3.

Equation numbers are the CVPR paper's. The term distils the FPN levels of a detector pair, paired by
stride. On each level:

* **masks** (Eq. 2-4, :func:`fgd_masks`): the ground-truth boxes projected onto the level's grid give
  the foreground mask ``M`` and the scale mask ``S`` (``1 / (H_r W_r)`` inside box ``r``, the
  smallest box where boxes overlap; ``1 / N_bg`` on the background);
* **attention** (Eq. 5-8, :func:`fgd_attention`): spatial ``A^S = H W softmax(mean_c |F| / T)`` and
  channel ``A^C = C softmax(mean_hw |F| / T)``;
* **focal loss** (Eq. 9-11, :func:`fgd_focal_parts`): the squared feature difference weighted by
  ``M S A^S_t A^C_t`` (foreground, ``alpha``) and ``(1 - M) S A^S_t A^C_t`` (background, ``beta``),
  plus the L1 distance of the student's attention to the teacher's (``gamma``);
* **global loss** (Eq. 12, :func:`fgd_global_loss`): the squared difference of the features after a
  GcBlock ``R(F) = F + W_v2 ReLU(LN(W_v1 sum_j softmax_j(W_k F) F_j))`` (``lambda``).

Sums run over channels and positions of one image and are averaged over the batch (the paper writes
the per-image sums; the authors' code divides the batch sums by the batch size), then summed over the
levels. Every function computes in at least float32 with autocast off.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..connectors import build_connector
from ..errors import KdkitError
from ..registry import TERMS
from .base import StepView
from .detection import _FpnLevels
from .segmentation import _full_precision


def fgd_masks(targets: Tensor, size: tuple[int, int], stride: float) -> tuple[Tensor, Tensor]:
    """Foreground mask ``M`` (Eq. 2) and scale mask ``S`` (Eq. 3-4) of one level: two ``(B, h, w)`` tensors.

    ``targets`` are ``(B, M, 5)`` rows ``(x1, y1, x2, y2, cls)`` in input pixels; rows with ``cls < 0``
    (padding) and degenerate boxes (``x2 <= x1`` or ``y2 <= y1``) are ignored. Cell ``(i, j)`` of a level
    with stride ``s`` covers the pixels ``[j s, (j + 1) s) x [i s, (i + 1) s)``; a box covers every cell
    its rectangle overlaps with positive area: columns ``floor(x1 / s) .. ceil(x2 / s) - 1`` (rows
    alike), clipped to the map. ``H_r W_r`` is the number of cells the box covers on the map, so the
    scale weights of a box that overlaps no other sum to 1. A cell in several boxes takes the smallest
    box's weight (the paper's rule). Background cells get ``1 / N_bg`` (``N_bg`` = background cells of
    that image); an image without boxes is all background.
    """
    h, w = size
    b, m = targets.shape[:2]
    dtype = torch.float64 if targets.dtype == torch.float64 else torch.float32  # pixel coordinates
    if m == 0:
        fg = targets.new_zeros((b, h, w), dtype=dtype)
        return fg, torch.full_like(fg, 1.0 / (h * w))
    x1, y1, x2, y2, cls = targets.to(dtype).unbind(-1)
    valid = (cls >= 0) & (x2 > x1) & (y2 > y1)
    c0 = torch.floor(x1 / stride).clamp(0, w)
    c1 = torch.ceil(x2 / stride).clamp(0, w)
    r0 = torch.floor(y1 / stride).clamp(0, h)
    r1 = torch.ceil(y2 / stride).clamp(0, h)
    cols = torch.arange(w, device=targets.device, dtype=dtype)
    rows = torch.arange(h, device=targets.device, dtype=dtype)
    in_cols = (cols >= c0[..., None]) & (cols < c1[..., None])  # (B, M, w)
    in_rows = (rows >= r0[..., None]) & (rows < r1[..., None])  # (B, M, h)
    inside = in_rows[..., :, None] & in_cols[..., None, :] & valid[..., None, None]  # (B, M, h, w)
    cells = ((c1 - c0) * (r1 - r0)).clamp_min(1)
    fg_scale = (inside.to(dtype) / cells[..., None, None]).amax(1)  # smallest box wins
    fg = inside.any(1)
    background = (~fg).to(dtype)
    n_bg = background.sum((1, 2), keepdim=True)
    scale = torch.where(fg, fg_scale, background / n_bg.clamp_min(1))
    return fg.to(dtype), scale


@_full_precision
def fgd_attention(feature: Tensor, temperature: float = 0.5) -> tuple[Tensor, Tensor]:
    """Spatial and channel attention of a ``(B, C, H, W)`` map, Eq. 5-8: ``((B, H, W), (B, C))``.

    ``G^S = mean_c |F_c|`` and ``G^C = mean_{i,j} |F_{i,j}|``; ``A^S = H W softmax(G^S / T)`` over the
    ``H W`` positions and ``A^C = C softmax(G^C / T)`` over the channels (each averages to 1).
    """
    b, c, h, w = feature.shape
    magnitude = feature.abs()
    spatial = h * w * (magnitude.mean(1).flatten(1) / temperature).softmax(1)
    channel = c * (magnitude.mean((2, 3)) / temperature).softmax(1)
    return spatial.view(b, h, w), channel


@_full_precision
def fgd_focal_parts(
    student: Tensor, teacher: Tensor, fg: Tensor, scale: Tensor, temperature: float = 0.5
) -> dict[str, Tensor]:
    """The unweighted parts of FGD's focal loss on one level: ``{"fg", "bg", "attention"}``.

    ``student`` is ``f(F^S)`` (the connector's output), same shape as ``teacher``; ``fg`` and ``scale``
    come from :func:`fgd_masks` on this grid. With the teacher's attention ``A^S_t, A^C_t`` (Eq. 9)::

        fg = sum_{k,i,j} M S A^S_t A^C_t (F^T - f(F^S))^2,   bg = the same with 1 - M,
        attention = sum |A^S_t - A^S_s| + sum |A^C_t - A^C_s|    (Eq. 10, l = L1, summed)

    each summed over one image and averaged over the batch.
    """
    b = teacher.shape[0]
    s_spatial, s_channel = fgd_attention(student, temperature)
    t_spatial, t_channel = fgd_attention(teacher, temperature)
    weighted = (teacher - student).pow(2) * (t_spatial * scale)[:, None] * t_channel[:, :, None, None]
    fg = fg[:, None]
    return {
        "fg": (weighted * fg).sum() / b,
        "bg": (weighted * (1 - fg)).sum() / b,
        "attention": ((t_spatial - s_spatial).abs().sum() + (t_channel - s_channel).abs().sum()) / b,
    }


def fgd_focal_loss(
    student: Tensor,
    teacher: Tensor,
    fg: Tensor,
    scale: Tensor,
    temperature: float = 0.5,
    alpha: float = 1e-3,
    beta: float = 5e-4,
    gamma: float = 1e-3,
) -> Tensor:
    """FGD's focal loss on one level, Eq. 11: ``alpha * fg + beta * bg + gamma * attention``
    (the parts of :func:`fgd_focal_parts`)."""
    p = fgd_focal_parts(student, teacher, fg, scale, temperature)
    return alpha * p["fg"] + beta * p["bg"] + gamma * p["attention"]


class GcBlock(nn.Module):
    """Global context block of GCNet (Cao et al. 2019) as FGD's relation module ``R`` (Eq. 12).

    ``R(F) = F + W_v2(ReLU(LN(W_v1(sum_j softmax_j(W_k F) F_j))))``: a 1x1 conv ``W_k`` scores the
    positions, their softmax pools the features into one context vector, and a bottleneck (``C -> C/2``
    1x1 conv, LayerNorm, ReLU, ``C/2 -> C``) transforms it; the result is added at every position.
    ``W_k`` starts Kaiming-normal (fan in) and ``W_v2`` at zero, so ``R`` starts as the identity (GCNet's
    and the FGD authors' initialisation).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(1, channels // 2)
        self.key = nn.Conv2d(channels, 1, kernel_size=1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        nn.init.kaiming_normal_(self.key.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.key.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def context(self, x: Tensor) -> Tensor:
        """``sum_j softmax_j(W_k F) F_j``: the ``(B, C)`` softmax-weighted average over positions."""
        weights = self.key(x).flatten(2).softmax(-1)  # (B, 1, HW)
        return (x.flatten(2) * weights).sum(-1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.transform(self.context(x)[..., None, None])


@_full_precision
def fgd_global_loss(student: Tensor, teacher: Tensor, relation_s: nn.Module, relation_t: nn.Module) -> Tensor:
    """FGD's global loss on one level without ``lambda``, Eq. 12: ``sum (R_t(F^T) - R_s(f(F^S)))^2``
    summed over one image and averaged over the batch; ``relation_s`` / ``relation_t`` are the
    student's and teacher's :class:`GcBlock` (two blocks, as in the authors' code)."""
    return (relation_t(teacher) - relation_s(student)).pow(2).sum() / teacher.shape[0]


@TERMS.register("fgd", "Yang et al. 2022: focal and global distillation of FPN levels with GT-box masks")
class FGD(_FpnLevels):
    """Focal and global distillation (FGD), Eq. 13 without the detector's own loss, summed over levels::

        sum_levels alpha * fg + beta * bg + gamma * attention + lam * global

    Levels pair as in ``mimic`` and ``pkd`` (:class:`~kdkit.terms.detection._FpnLevels`): by stride
    from each model's ``feature_taps`` / ``feature_strides``, every stride both declare (or those in
    ``levels``), shallow to deep; where a model declares several levels at one stride (torchvision's
    MobileNetV3-FPN: two at 32) the deepest ones pair, last with last. Explicit ``student_taps`` /
    ``teacher_taps`` pair one to one and must be levels the teacher declares, whose strides the masks use.

    :meth:`bind` builds per level a connector when the shapes differ (1x1 conv + BN for channels,
    bilinear resize for sizes; see :func:`~kdkit.connectors.build_connector`) and the two GcBlocks of
    the global loss, all owned by the term (they train with the student). Masks are computed on the
    teacher's grid from ``StepView.labels`` (targets ``(B, M, 5)``). :meth:`stats` logs the weighted
    parts summed over levels, ``fg``, ``bg``, ``attention`` and ``global`` (they add up to the loss).

    Defaults are the paper's (Sec. 4.2) for anchor-based one-stage detectors such as RetinaNet, also the
    authors' code defaults: ``T = 0.5, alpha = 1e-3, beta = 5e-4, gamma = 1e-3, lam = 5e-6``. The paper
    uses ``T = 0.5`` throughout, ``alpha = 5e-5, beta = 2.5e-5, gamma = 5e-5, lam = 5e-7`` for two-stage
    detectors and ``alpha = 1.6e-3, beta = 8e-4, gamma = 8e-3, lam = 8e-6`` for anchor-free ones (the
    authors' released configs differ: ``gamma = 5e-4`` for RetinaNet, ``gamma = 8e-4, T = 0.8`` for
    FCOS). These weights assume sums over 256-channel COCO-sized FPN maps; the term's ``weight``
    rescales the whole term.
    """

    needs_labels = True

    def __init__(
        self,
        *,
        temperature: float = 0.5,
        alpha: float = 1e-3,
        beta: float = 5e-4,
        gamma: float = 1e-3,
        lam: float = 5e-6,
        levels: int | Sequence[int] | None = None,
        student_taps: str | Sequence[str] | None = None,
        teacher_taps: str | Sequence[str] | None = None,
    ) -> None:
        super().__init__(student_taps, teacher_taps, levels)
        if temperature <= 0:
            raise KdkitError(f"term 'fgd' needs temperature > 0, got {temperature}; the paper uses 0.5")
        self.temperature = temperature
        self.alpha, self.beta, self.gamma, self.lam = alpha, beta, gamma, lam
        self.relations_s = nn.ModuleList()
        self.relations_t = nn.ModuleList()

    # ------------------------------------------------------------------ levels
    def resolve_taps(self, student: nn.Module, teacher: nn.Module | None) -> None:
        super().resolve_taps(student, teacher)
        if self.strides is None:  # explicit taps: the masks need each teacher level's stride
            taps = list(getattr(teacher, "feature_taps", None) or [])
            strides = list(getattr(teacher, "feature_strides", None) or [])
            declared = dict(zip(taps, strides)) if len(taps) == len(strides) else {}
            unknown = [key for key in self.teacher_keys if key not in declared]
            if unknown:
                raise KdkitError(
                    f"term 'fgd' draws its box masks at each teacher level's stride, but teacher tap "
                    f"'{unknown[0]}' is not among the teacher model's feature_taps / feature_strides; name "
                    f"declared FPN levels, or unset student_taps and teacher_taps to pair levels by stride"
                )
            self.strides = [int(declared[key]) for key in self.teacher_keys]

    def bind(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        if self.strides is None:
            raise KdkitError(
                "term 'fgd' does not know the strides of its levels yet: call resolve_taps(student, teacher) "
                "first"
            )
        pairs = self._check_maps(student_shapes, teacher_shapes)
        self.connectors = nn.ModuleList()
        self.relations_s, self.relations_t = nn.ModuleList(), nn.ModuleList()
        for s_key, t_key, (src, dst) in zip(self.student_keys, self.teacher_keys, pairs, strict=True):
            self.connectors.append(build_connector(src, dst, s_key, t_key))
            self.relations_s.append(GcBlock(dst[1]))
            self.relations_t.append(GcBlock(dst[1]))

    # ------------------------------------------------------------------ loss
    def _targets(self, view: StepView, batch: int) -> Tensor:
        y = view.labels
        if y is None or y.dim() != 3 or y.shape[-1] != 5 or y.shape[0] != batch:
            shape = None if y is None else tuple(y.shape)
            raise KdkitError(
                f"term 'fgd' needs detection targets (B={batch}, M, 5) as labels, got {shape}; "
                f"use it with task: detection"
            )
        return y

    def forward(self, view: StepView) -> Tensor:
        if not len(self.connectors):
            raise KdkitError("term 'fgd' has no connectors yet: call bind with the dry run's shapes first")
        totals: dict[str, Tensor] = {}
        loss = None
        levels = zip(
            self.student_keys,
            self.teacher_keys,
            self.strides,
            self.connectors,
            self.relations_s,
            self.relations_t,
            strict=True,
        )
        for s_key, t_key, stride, connector, rel_s, rel_t in levels:
            teacher = view.teacher[t_key]
            student = connector(view.student[s_key])
            targets = self._targets(view, teacher.shape[0])
            fg, scale = fgd_masks(targets, tuple(teacher.shape[-2:]), stride)
            parts = fgd_focal_parts(student, teacher, fg, scale, self.temperature)
            parts = {
                "fg": self.alpha * parts["fg"],
                "bg": self.beta * parts["bg"],
                "attention": self.gamma * parts["attention"],
                "global": self.lam * fgd_global_loss(student, teacher, rel_s, rel_t),
            }
            level = sum(parts.values())
            loss = level if loss is None else loss + level
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v.detach()
        self._last = totals
        return loss

    def teacher_space_taps(self) -> list[str]:
        return list(self.teacher_keys or []) if len(self.connectors) else []

    def teacher_space(self, view: StepView) -> dict[str, Tensor]:
        return {
            t: c(view.student[s])
            for s, t, c in zip(self.student_keys, self.teacher_keys, self.connectors, strict=True)
        }
