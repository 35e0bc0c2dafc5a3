"""Dense-head KD (``dense_kd``) for detector pairs with the same anchors/points: per-anchor class KD
(binary per class for sigmoid heads, softmax for SSD's background + classes) and box distillation on the
anchors the teacher is confident about (L1 on the raw regression outputs or GIoU on decoded boxes).

The raw outputs of the step (``{"out": [B, A, C], "box": [B, A, 4], ...}``) arrive as
``StepView.student_output`` / ``teacher_output``; ``box: giou`` decodes them with the detectors'
``decode_boxes(outputs) -> [B, A, 4]`` (:class:`~kdkit.models.detection.base.Detector`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss

from ..errors import KdkitError
from ..registry import TERMS
from .base import LOGITS, StepView
from .detection import _DetectorTerm, _fp32
from .segmentation import _full_precision

BOX_LOSSES = ("l1", "giou")


# ------------------------------------------------------------------------------------ functions


def teacher_confidence(teacher_logits: Tensor, background: Tensor | None = None) -> Tensor:
    """The teacher's detection score per anchor, ``[B, A]``, detached: ``max_c sigmoid(z_t[..., c])``, or
    for a softmax head with a ``background`` logit ``[B, A, 1]`` (SSD) the largest foreground
    probability of ``softmax([z_bg, z_t])``."""
    z = _fp32(teacher_logits).detach()
    if background is None:
        return z.sigmoid().amax(-1)
    return torch.cat([_fp32(background).detach(), z], -1).softmax(-1)[..., 1:].amax(-1)


def _anchor_mean(per_anchor: Tensor, weight: Tensor | None) -> Tensor:
    """``sum_a w_a l_a / sum_a w_a`` (plain mean without ``weight``)."""
    if weight is None:
        return per_anchor.mean()
    weight = weight.to(per_anchor.dtype)
    return (weight * per_anchor).sum() / weight.sum().clamp_min(1e-12)


@_full_precision
def binary_kd_loss(
    student: Tensor, teacher: Tensor, temperature: float = 1.0, weight: Tensor | None = None
) -> Tensor:
    """Per-class binary KD for sigmoid (focal-loss) dense heads, logits ``[B, A, C]``.

    Each class of each anchor is a binary classification (BCKD, Yang et al. 2023, ICCV, "Bridging
    Cross-task Protocol Inconsistency for Distillation in Dense Object Detection", Sec. 3.2), distilled
    with Hinton et al.'s temperature and ``T^2`` factor (2015, Sec. 2):
    ``p = sigmoid(z / T)``, ``l_a = sum_c KL(Bern(p_t[a, c]) || Bern(p_s[a, c]))`` and the loss
    ``T^2 * sum_a w_a l_a / sum_a w_a`` (``w = 1`` by default: the mean over anchors and images; a
    ``weight`` ``[B, A]`` such as :func:`teacher_confidence` stresses what the teacher detects).
    BCKD's loss is ``BCE(z_s, sigmoid(z_t)) * |p_t - p_s|^beta``; at ``T = 1`` without that modulation
    (``beta = 0``) it differs from this one only by the teacher's entropy, a constant: same gradient.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"binary_kd_loss needs equal shapes, got {tuple(student.shape)}, {tuple(teacher.shape)}"
        )
    s, t = student / temperature, teacher.detach() / temperature
    p_t = t.sigmoid()
    kl = p_t * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p_t) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return _anchor_mean(kl.sum(-1), weight) * temperature**2


@_full_precision
def softmax_kd_loss(
    student: Tensor, teacher: Tensor, temperature: float = 1.0, weight: Tensor | None = None
) -> Tensor:
    """Per-anchor KD for softmax heads (SSD: background + classes), logits ``[B, A, K]``.

    Hinton et al. 2015: ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`` over the ``K`` classes of
    each anchor (background included, as Chen et al. 2017 distil the classifier of a detector, NeurIPS,
    Sec. 3.1, without their class weights), averaged over anchors like :func:`binary_kd_loss`.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"softmax_kd_loss needs equal shapes, got {tuple(student.shape)}, {tuple(teacher.shape)}"
        )
    log_s = (student / temperature).log_softmax(-1)
    log_t = (teacher.detach() / temperature).log_softmax(-1)
    return _anchor_mean((log_t.exp() * (log_t - log_s)).sum(-1), weight) * temperature**2


@_full_precision
def dense_box_loss(student: Tensor, teacher: Tensor, weight: Tensor, kind: str = "l1") -> Tensor:
    """Box distillation on the anchors with ``weight > 0``: ``sum_a w_a l_a / sum_a w_a`` over ``[B, A]``.

    ``kind="l1"``: ``l_a = ||b_s - b_t||_1`` over the 4 regression outputs of the anchor (the student
    regresses the teacher's output, the target of Chen et al. 2017's teacher-bounded regression, NeurIPS,
    Sec. 3.2, used here directly). ``kind="giou"``: ``l_a = 1 - GIoU(b_s, b_t)`` on decoded ``x1, y1, x2,
    y2`` boxes (Rezatofighi et al. 2019, CVPR, Alg. 1), an IoU-based localisation distillation as BCKD's
    (Sec. 3.3). 0 (connected to ``student``'s graph) when no anchor has a positive weight.
    """
    if kind not in BOX_LOSSES:
        raise ValueError(f"dense_box_loss kind must be one of {BOX_LOSSES}, got {kind!r}")
    if student.shape != teacher.shape:
        raise ValueError(
            f"dense_box_loss needs equal shapes, got {tuple(student.shape)}, {tuple(teacher.shape)}"
        )
    keep = weight > 0
    if not bool(keep.any()):
        return student.sum() * 0.0
    s, t, w = student[keep], teacher.detach()[keep], weight[keep].to(student.dtype)
    if kind == "l1":
        per_anchor = (s - t).abs().sum(-1)
    else:
        per_anchor = generalized_box_iou_loss(s, t, reduction="none")
    return (w * per_anchor).sum() / w.sum()


# ------------------------------------------------------------------------------------ term


@TERMS.register(
    "dense_kd",
    "KD on dense detector heads with the same anchors: per-class binary (sigmoid) or softmax (SSD)",
)
class DenseKD(_DetectorTerm):
    """Dense-head KD for detector pairs with the same anchors/points (RetinaNet, FCOS, the compact pair).

    ``cls``: :func:`binary_kd_loss` between ``teacher_output["out"]`` and ``student_output["out"]``
    (``[B, A, C]`` sigmoid logits), or :func:`softmax_kd_loss` over ``[bg, out]`` for softmax heads that
    give a ``"bg"`` logit (SSD); anchors weighted by :func:`teacher_confidence` when ``score_weighted``.
    ``box`` (optional): :func:`dense_box_loss` on the anchors whose teacher confidence is at least
    ``score_thresh`` (weighted by it when ``score_weighted``): ``"l1"`` on the raw regression outputs
    ``"box"`` (same anchors and box coding), ``"giou"`` on boxes decoded by the detectors'
    ``decode_boxes(outputs) -> [B, A, 4]`` (the zoo's FCOS, RetinaNet, SSDlite and compact pair: their
    torchvision box coder, clipped to the image). Loss: ``cls + box_weight * box``; ``stats`` logs both
    and the fraction of confident anchors.
    """

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        score_weighted: bool = False,
        box: str | None = None,
        box_weight: float = 1.0,
        score_thresh: float = 0.5,
    ) -> None:
        super().__init__()
        if box is not None and box not in BOX_LOSSES:
            raise KdkitError(
                f"term 'dense_kd' box must be one of {', '.join(BOX_LOSSES)} or unset, got {box!r}"
            )
        if not temperature > 0:
            raise KdkitError(f"term 'dense_kd' temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.score_weighted = score_weighted
        self.box = box
        self.box_weight = box_weight
        self.score_thresh = score_thresh
        self._last: dict[str, Tensor] = {}

    def resolve_taps(self, student: nn.Module, teacher: nn.Module | None) -> None:
        for role, model in (("student", student), ("teacher", teacher)):
            if model is not None and getattr(model, "dense", True) is False:
                raise KdkitError(
                    f"term 'dense_kd' compares per-anchor class logits, but the {role} "
                    f"{type(model).__name__} is not a dense detector; use mimic or pkd"
                )
            if (
                self.box == "giou"
                and model is not None
                and not callable(getattr(model, "decode_boxes", None))
            ):
                raise KdkitError(
                    f"term 'dense_kd' with box: giou needs decoded boxes, but the {role} "
                    f"{type(model).__name__} has no `decode_boxes(outputs)`; use box: l1"
                )
        self._models = [student, teacher]

    def _check_pair(self, student: torch.Size, teacher: torch.Size) -> None:
        if len(student) != 3 or len(teacher) != 3:
            raise KdkitError(
                f"term 'dense_kd' needs per-anchor class logits [B, A, C], got student {tuple(student)} and "
                f"teacher {tuple(teacher)}; use mimic or pkd"
            )
        if student[1] != teacher[1]:
            raise KdkitError(
                f"term 'dense_kd': the pair has different anchors (student {student[1]} per image, teacher "
                f"{teacher[1]}); use mimic or pkd"
            )
        if student[2] != teacher[2]:
            raise KdkitError(
                f"term 'dense_kd': student and teacher have different classes ({student[2]} vs "
                f"{teacher[2]}); train the teacher on the student's classes"
            )

    def bind(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        if LOGITS in student_shapes and LOGITS in teacher_shapes:
            self._check_pair(student_shapes[LOGITS], teacher_shapes[LOGITS])

    def forward(self, view: StepView) -> Tensor:
        s_out, t_out = self._outputs(view, "student"), self._outputs(view, "teacher")
        z_s, z_t = s_out["out"], t_out["out"]
        self._check_pair(z_s.shape, z_t.shape)
        if ("bg" in s_out) != ("bg" in t_out):
            raise KdkitError(
                "term 'dense_kd': one detector has a softmax head with a background logit (SSD), the other "
                "sigmoid scores; use mimic or pkd"
            )
        softmax = "bg" in s_out
        confidence = teacher_confidence(z_t, t_out["bg"] if softmax else None)
        weight = confidence if self.score_weighted else None
        if softmax:
            z_s, z_t = torch.cat([s_out["bg"], z_s], -1), torch.cat([t_out["bg"], z_t], -1)
            cls = softmax_kd_loss(z_s, z_t, self.temperature, weight)
        else:
            cls = binary_kd_loss(z_s, z_t, self.temperature, weight)
        self._last = {"cls": cls.detach()}
        if self.box is None:
            return cls
        confident = (confidence >= self.score_thresh).to(confidence.dtype)
        weight = confident * confidence if self.score_weighted else confident
        if self.box == "l1":
            b_s, b_t = s_out["box"], t_out["box"]
        else:
            b_s = self._model(0).decode_boxes(s_out)
            with torch.no_grad():
                b_t = self._model(1).decode_boxes(t_out)
        if b_s.shape != b_t.shape:
            raise KdkitError(
                f"term 'dense_kd': box outputs differ in shape (student {tuple(b_s.shape)}, teacher "
                f"{tuple(b_t.shape)}); the pair needs the same anchors and box coding, or use box: giou"
            )
        box = dense_box_loss(b_s, b_t, weight, self.box)
        self._last.update(box=box.detach(), confident=confident.mean())
        return cls + self.box_weight * box

    def stats(self) -> dict[str, Tensor]:
        return dict(self._last)
