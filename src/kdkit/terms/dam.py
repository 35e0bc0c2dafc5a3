"""SoKD's Distinctive Area Detection Module (DAM): term ``dam``.

Shen et al., "Student-Oriented Teacher Knowledge Refinement for Knowledge Distillation" (SoKD, ACM MM
2024), Sec. 3.2 (Eq. 11-13) and Sec. 3.3 (Eq. 15). The student's feature is mapped into the teacher's
space by an adapter ``Phi_s`` (:func:`kdkit.connectors.build_connector`). ONE detection head of three
branches (each a 3x3 convolution, ReLU, 1x1 convolution; CenterNet-style: a heatmap, a box size
``(h, w)`` and a sub-cell offset ``(dy, dx)``) is applied to both ``Phi_s(F^s)`` and the teacher
feature ``s(F^t)`` (the teacher's tap after any feature refiner such as ``dafa``: the view already holds
it). Then

* ``L_D`` (Eq. 12): the squared difference of the two sides' branch outputs, as the sum over the three
  branches of the mean squared error over each branch's elements. Both sides train the shared heads; the
  teacher feature itself is detached (the student's objective of Eq. 15 does not move a refiner).
* ``D`` (Eq. 11), the decoding (not differentiable; :func:`decode_areas`): the areas both networks find
  distinctive come from the MEAN of the two sides' (detached) predictions. Heatmap ``sigmoid``; peaks
  are the cells equal to their 3x3 max-pool (CenterNet); the top ``areas`` peaks by score are kept
  (when a map has fewer peaks, the best other cells fill in; when it has fewer cells than ``areas``,
  cells repeat). Box centre = peak cell + ``sigmoid(offset)`` clamped to ``[0.01, 0.99]`` (inside the
  cell), box side = ``(min_size + (max_size - min_size) * sigmoid(size)) * map side`` per axis, clipped
  to the map.
  The mask ``M(A_i)`` is 1 on the cells whose centre ``(i + 0.5, j + 0.5)`` lies in the half-open box
  ``[y0, y1) x [x0, x1)``, and always on the peak cell itself (so it is a rectangle of cells).
* ``L_DA`` (Eq. 13): ``sum_i ||M(A_i) Phi_s(F^s) - M(A_i) s(F^t)||^2`` divided by ``C`` times the
  masked cells summed over boxes and batch (overlaps counted once per box): an MSE over the masked
  elements, on the scale of FitNet's MSE. This rescales Eq. 13 by one constant per batch.

The term returns ``detect_weight * L_D + area_weight * L_DA`` (``alpha``, ``beta`` of Eq. 15); its
config ``weight`` multiplies that. The paper gives no value of ``N`` (``areas``), the box limits or the
head width; the defaults here are ours.

Collapse guard (our reading): the heads get no supervision besides ``L_D``, which any constant output
minimises, so the decoding never trusts them to decide how much of the map is used. Every sample always
gets exactly ``areas`` masks; each mask holds at least its peak cell (never empty) and a box side is at
most ``max_size < 1`` of the map side, so a mask never covers the whole map unless the map is a single
cell (with the default 0.5: at most ``ceil(side / 2)`` cells per axis). When a sample's mean heatmap is
flat (``max - min < 1e-6``, e.g. collapsed heads), its peaks come from the teacher feature's activation
energy ``mean_c(F_t^2)`` instead. :attr:`DAM.last_stats` reports, for the last forward, the mean
fraction of cells in the union of a sample's masks (``coverage``), the mean fraction per mask
(``box_coverage``) and the fraction of samples that fell back to the energy (``flat``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..connectors import build_connector
from ..errors import KdkitError
from ..registry import TERMS
from .base import StepView
from .features import _MiddleTapTerm

FLAT_RANGE = 1e-6
OFFSET_MARGIN = 0.01  # box centres stay this far inside their peak cell (see area_masks)


class DAMHeads(nn.Module):
    """The three branches of DAM (Sec. 3.2): conv3x3 -> ReLU -> conv1x1 each, giving a heatmap (1
    channel), a box size (2: ``h, w``) and an offset (2: ``dy, dx``), raw (before any sigmoid).

    The 1x1 convolutions have no bias: ``L_D`` compares the two sides through the same heads, so a bias
    of the last layer cancels out of it and would never train (size and offset start at logit 0).
    """

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()

        def branch(out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(channels, hidden, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden, out, 1, bias=False),
            )

        self.heatmap = branch(1)
        self.size = branch(2)
        self.offset = branch(2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.heatmap(x), self.size(x), self.offset(x)


def detection_loss(student: tuple[Tensor, ...], teacher: tuple[Tensor, ...]) -> Tensor:
    """``L_D`` of Eq. 12: the sum over branches of the MSE between the student-side and teacher-side
    outputs (each ``(B, c, h, w)``)."""
    return torch.stack([F.mse_loss(s, t) for s, t in zip(student, teacher, strict=True)]).sum()


def area_loss(student: Tensor, teacher: Tensor, masks: Tensor) -> Tensor:
    """``L_DA`` of Eq. 13 as an MSE over masked elements.

    ``student``/``teacher`` are ``(B, C, h, w)`` (``Phi_s(F^s)`` and the refined teacher feature),
    ``masks`` is ``(B, N, h, w)`` (bool or 0/1). Returns ``sum_{b,i} ||M_bi * (S_b - T_b)||^2`` over
    ``C * sum(M)``: each box counts its cells, so overlapping boxes count a cell once per box.
    """
    dtype = torch.promote_types(student.dtype, torch.float32)  # half precision sums would overflow
    per_cell = (student.to(dtype) - teacher.to(dtype)).pow(2).sum(1)  # (B, h, w)
    m = masks.to(per_cell.dtype)
    return (m * per_cell.unsqueeze(1)).sum() / (student.shape[1] * m.sum())


def pick_peaks(score: Tensor, count: int) -> Tensor:
    """Flat indices ``(B, count)`` of the ``count`` best cells of ``score`` ``(B, h, w)``.

    Local maxima (cells equal to their 3x3 max-pool, CenterNet's peak picking) come first, by score,
    then the other cells by score; when ``h * w < count`` the ranking repeats.
    """
    b, h, w = score.shape
    flat = score.reshape(b, h * w)
    peak = (score == F.max_pool2d(score.unsqueeze(1), 3, stride=1, padding=1).squeeze(1)).reshape(b, -1)
    order = flat.argsort(dim=1, descending=True, stable=True)
    first = peak.gather(1, order).to(torch.uint8).argsort(dim=1, descending=True, stable=True)
    ranked = order.gather(1, first)
    repeat = torch.arange(count, device=score.device) % (h * w)
    return ranked[:, repeat]


def decode_areas(
    heat: Tensor,
    size: Tensor,
    offset: Tensor,
    energy: Tensor | None = None,
    *,
    areas: int = 4,
    min_size: float = 0.125,
    max_size: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The decoding ``D`` of Eq. 11 from raw head outputs (see the module doc).

    ``heat`` ``(B, h, w)``, ``size`` and ``offset`` ``(B, 2, h, w)`` (raw: sigmoids are applied here),
    ``energy`` ``(B, h, w)`` the fallback score of samples whose heatmap is flat (none: keep the flat
    heatmap). Returns ``(score (B, h, w) in [0, 1], boxes (B, N, 4) as (y0, x0, y1, x1) in cell units,
    masks (B, N, h, w) bool, flat (B,) bool)``; ``score`` is the map the peaks were taken from (the
    heatmap, or the energy scaled to [0, 1] per flat sample).
    """
    b, h, w = heat.shape
    heat, size, offset = heat.float(), size.float(), offset.float()
    score = heat.sigmoid()
    spread = score.flatten(1).amax(1) - score.flatten(1).amin(1)
    flat = spread < FLAT_RANGE
    if energy is not None:  # no branch on ``flat``: no host sync in the training step
        e = energy.float().flatten(1)
        lo, hi = e.amin(1, keepdim=True), e.amax(1, keepdim=True)
        e = ((e - lo) / (hi - lo).clamp_min(1e-12)).reshape(b, h, w)
        score = torch.where(flat[:, None, None], e, score)
    peaks = pick_peaks(score, areas)  # (B, N)
    py, px = peaks // w, peaks % w

    def at_peaks(maps: Tensor) -> Tensor:  # (B, 2, h, w) -> (B, N, 2)
        return maps.flatten(2).gather(2, peaks.unsqueeze(1).expand(b, 2, -1)).transpose(1, 2)

    delta = at_peaks(offset).sigmoid().clamp(OFFSET_MARGIN, 1 - OFFSET_MARGIN)
    side = min_size + (max_size - min_size) * at_peaks(size).sigmoid()
    extent = torch.tensor([h, w], dtype=side.dtype, device=side.device)
    centre = torch.stack([py, px], -1).to(side.dtype) + delta
    half = side * extent / 2
    low = torch.minimum(torch.maximum(centre - half, torch.zeros_like(extent)), extent)
    high = torch.minimum(centre + half, extent)
    boxes = torch.stack([low[..., 0], low[..., 1], high[..., 0], high[..., 1]], -1)
    masks = area_masks(boxes, peaks, h, w)
    return score, boxes, masks, flat


def area_masks(boxes: Tensor, peaks: Tensor, h: int, w: int) -> Tensor:
    """Masks ``M(A_i)`` ``(B, N, h, w)`` bool: cells whose centre lies in the half-open box
    ``[y0, y1) x [x0, x1)`` (``boxes`` ``(B, N, 4)`` in cell units), plus the peak cell (flat index in
    ``peaks`` ``(B, N)``), which the box's centre lies in. With the centre strictly inside the peak cell
    the cells form a rectangle that holds the peak cell, at most ``max(ceil(side), 1)`` cells per axis
    for a box ``side`` cells long."""
    ys = torch.arange(h, device=boxes.device, dtype=boxes.dtype) + 0.5
    xs = torch.arange(w, device=boxes.device, dtype=boxes.dtype) + 0.5
    y0, x0, y1, x1 = (boxes[..., k, None] for k in range(4))
    rows = ((ys >= y0) & (ys < y1)) | (torch.arange(h, device=boxes.device) == (peaks // w)[..., None])
    cols = ((xs >= x0) & (xs < x1)) | (torch.arange(w, device=boxes.device) == (peaks % w)[..., None])
    return rows.unsqueeze(-1) & cols.unsqueeze(-2)


@TERMS.register(
    "dam", "Shen et al. 2024 (SoKD): distinctive areas by shared heads (L_D), feature MSE in them (L_DA)"
)
class DAM(_MiddleTapTerm):
    """SoKD's DAM (module doc): ``detect_weight * L_D + area_weight * L_DA``.

    Unset taps default to the middle declared feature tap of each model, like ``fitnet``. Both taps
    must be feature maps ``(B, C, H, W)``. ``hidden`` is the width of each branch's 3x3 convolution
    (default ``min(64, C_teacher)``); ``min_size``/``max_size`` bound a box side as fractions of the
    map side (``0 < min_size <= max_size < 1``).
    """

    def __init__(
        self,
        *,
        student_tap: str | None = None,
        teacher_tap: str | None = None,
        areas: int = 4,
        detect_weight: float = 1.0,
        area_weight: float = 1.0,
        hidden: int | None = None,
        min_size: float = 0.125,
        max_size: float = 0.5,
    ) -> None:
        super().__init__(student_tap, teacher_tap)
        if isinstance(areas, bool) or not isinstance(areas, int) or areas < 1:
            raise KdkitError(f"term 'dam': areas must be an integer >= 1, got {areas!r}")
        if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1):
            raise KdkitError(f"term 'dam': hidden must be an integer >= 1 (or unset), got {hidden!r}")
        if not 0 < min_size <= max_size < 1:
            raise KdkitError(
                f"term 'dam': box limits need 0 < min_size <= max_size < 1 (fractions of the map side), "
                f"got min_size={min_size!r}, max_size={max_size!r}"
            )
        for name, value in (("detect_weight", detect_weight), ("area_weight", area_weight)):
            if value < 0:
                raise KdkitError(f"term 'dam': {name} must be >= 0, got {value!r}")
        self.areas = areas
        self.detect_weight = float(detect_weight)
        self.area_weight = float(area_weight)
        self.hidden = hidden
        self.min_size = float(min_size)
        self.max_size = float(max_size)
        self.adapter: nn.Module = nn.Identity()
        self.heads: DAMHeads | None = None
        self._stats: dict[str, Tensor] = {}

    def bind(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        src, dst = student_shapes[self.student_tap], teacher_shapes[self.teacher_tap]
        for role, key, shape in (("student", self.student_tap, src), ("teacher", self.teacher_tap, dst)):
            if len(shape) != 4:
                raise KdkitError(
                    f"term 'dam' needs feature maps (B, C, H, W), but {role} tap '{key}' has shape "
                    f"{tuple(shape)}; set {role}_tap to a convolutional stage output"
                )
        self.adapter = build_connector(src, dst, self.student_tap, self.teacher_tap)
        channels = int(dst[1])
        self.heads = DAMHeads(channels, self.hidden or min(64, channels))

    def _heads(self) -> DAMHeads:
        if self.heads is None:
            raise KdkitError("term 'dam' was not bound to its taps' shapes; build it through the engine")
        return self.heads

    def teacher_space_taps(self) -> list[str]:
        return [self._require(self.teacher_tap, "teacher_tap")]

    def teacher_space(self, view: StepView) -> dict[str, Tensor]:
        """``{teacher_tap: Phi_s(F^s)}``: the target of a feature refiner's consistency loss (Eq. 14)."""
        return {self.teacher_tap: self.adapter(view.student[self.student_tap])}

    def _decode(self, pred_s, pred_t, teacher: Tensor):
        heat, size, offset = ((s.detach() + t.detach()) / 2 for s, t in zip(pred_s, pred_t, strict=True))
        energy = teacher.detach().float().pow(2).mean(1)
        return decode_areas(
            heat[:, 0], size, offset, energy, areas=self.areas, min_size=self.min_size, max_size=self.max_size
        )

    @torch.no_grad()
    def detect(self, student_feature: Tensor, teacher_feature: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The areas of one batch: the student tap ``F^s`` (adapted here) and the (refined) teacher tap.

        Returns ``(score (B, h, w), boxes (B, N, 4) as (y0, x0, y1, x1) in cells of the teacher's map,
        masks (B, N, h, w) bool)``; see :func:`decode_areas`. The modules run in their current mode: call
        ``eval()`` first for plots, or a batch-norm adapter in train mode updates its running statistics.
        """
        heads = self._heads()
        pred_s, pred_t = heads(self.adapter(student_feature)), heads(teacher_feature)
        score, boxes, masks, _ = self._decode(pred_s, pred_t, teacher_feature)
        return score, boxes, masks

    def stats(self) -> dict[str, Tensor]:
        """``coverage``, ``box_coverage``, ``flat`` of the last forward, for the training log."""
        return dict(self._stats)

    @property
    def last_stats(self) -> dict[str, float]:
        """``coverage``, ``box_coverage`` and ``flat`` of the last forward (module doc); empty before."""
        return {k: float(v) for k, v in self._stats.items()}

    def forward(self, view: StepView) -> Tensor:
        heads = self._heads()
        adapted = self.adapter(view.student[self.student_tap])
        teacher = view.teacher[self.teacher_tap].detach()
        pred_s, pred_t = heads(adapted), heads(teacher)
        _, _, masks, flat = self._decode(pred_s, pred_t, teacher)
        self._stats = {
            "coverage": masks.any(1).float().mean().detach(),
            "box_coverage": masks.float().mean().detach(),
            "flat": flat.float().mean().detach(),
        }
        loss_d = detection_loss(pred_s, pred_t)
        loss_da = area_loss(adapted, teacher, masks)
        return self.detect_weight * loss_d + self.area_weight * loss_da
