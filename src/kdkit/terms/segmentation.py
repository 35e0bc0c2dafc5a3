"""Dense-prediction terms: channel-wise distillation, I2CKD class prototypes and Spirit Distillation.

Score maps are ``(B, C, H, W)``, masks int64 ``(B, H, W)`` with :data:`~kdkit.data.base.IGNORE_INDEX`
(255) for unlabelled pixels. The loss functions turn autocast off and compute in (at least) float32,
so the terms can run inside a bf16 autocast region; float64 inputs stay float64.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..connectors import build_connector
from ..data.base import IGNORE_INDEX
from ..errors import KdkitError
from ..registry import TERMS
from .base import LOGITS, StepView
from .features import _SingleTapTerm
from .logits import _labels, kl_divergence

_HALF = (torch.float16, torch.bfloat16)


def _full_precision(fn):
    """Run ``fn`` with autocast off and half-precision tensor arguments upcast to float32."""

    def up(x):
        return x.float() if isinstance(x, Tensor) and x.dtype in _HALF else x

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args, kwargs = [up(a) for a in args], {k: up(v) for k, v in kwargs.items()}
        device = next(x.device.type for x in [*args, *kwargs.values()] if isinstance(x, Tensor))
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


@_full_precision
def cwd_loss(student: Tensor, teacher: Tensor, temperature: float = 4.0) -> Tensor:
    """Channel-wise distillation, Shu et al. 2021 (ICCV), Sec. 3.2; I2CKD's ``L_SM`` (Eq. 5-6).

    Each channel of a ``(B, C, H, W)`` map becomes a distribution over its ``H * W`` positions,
    ``phi(y_c) = softmax(y_c / T)``, and the loss is ``T^2 / C * sum_c KL(phi(y^T_c) || phi(y^S_c))``
    (KL summed over positions), averaged over the batch. Reading of the normalisation: ``C`` is the
    number of channels of the distilled map (I2CKD writes the sum over ``K`` channels with ``T^2 / C``;
    on score maps ``K = C`` classes), so the loss is ``T^2`` times the mean over (image, channel) of
    the per-channel KL, as in the reference code (mmrazor's ChannelWiseDivergence divides by ``C * N``).
    Shapes must match.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"cwd_loss needs equal shapes, got {tuple(student.shape)}, {tuple(teacher.shape)}")
    log_s = (student.flatten(2) / temperature).log_softmax(-1)
    log_t = (teacher.flatten(2) / temperature).log_softmax(-1)
    return kl_divergence(log_t, log_s) * temperature**2


@_full_precision
def i2ckd_prototypes(
    features: Tensor, mask: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """Class prototypes of I2CKD, Karine et al. 2024, Eq. 1: ``(prototypes (C, K), present (C,) bool)``.

    ``p_c = sum_{x,y} F(x,y) 1[M(x,y) = c] / sum_{x,y} 1[M(x,y) = c]`` over the positions of **all**
    images of the batch. The mask ``(B, H, W)`` is first brought to the feature grid ``(h, w)`` by
    nearest neighbour (PyTorch ``nearest``: source index ``floor(i * H / h)``); pixels equal to
    ``ignore_index`` count for no class. A class without pixels is absent (``present`` False) and
    its prototype row is 0.
    """
    _, k, h, w = features.shape
    if tuple(mask.shape[-2:]) != (h, w):
        mask = F.interpolate(mask[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
    labels = mask.reshape(-1, 1).long()
    labels = labels.masked_fill(labels == ignore_index, -1)
    onehot = (labels == torch.arange(num_classes, device=labels.device)).to(features.dtype)  # (B*h*w, C)
    sums = onehot.T @ features.movedim(1, -1).reshape(-1, k)
    counts = onehot.sum(0)
    return sums / counts.clamp_min(1)[:, None], counts > 0


@_full_precision
def i2ckd_loss(
    student_protos: Tensor, teacher_protos: Tensor, present: Tensor, margin: float = 1.0
) -> Tensor:
    """I2CKD triplet loss on class prototypes, Karine et al. 2024, Eq. 3.

    ``1 / (C (C - 1)) * sum_c sum_{j != c} [m + ||p_c^s - p_c^t||_2 - ||p_c^s - p_j^t||_2]_+`` over the
    classes marked ``present`` only (``C`` = their number): the student prototype of class ``c`` is
    pulled to the teacher's prototype of ``c`` and pushed at least ``m`` further from those of the
    other classes (Eq. 2). With fewer than 2 present classes there is no pair and the loss is 0
    (still connected to both inputs' graphs).
    """
    s, t = student_protos[present], teacher_protos[present]
    n = s.shape[0]
    if n < 2:
        return (student_protos.sum() + teacher_protos.sum()) * 0.0
    dist = (s[:, None] - t[None]).norm(dim=-1)  # dist[c, j] = ||p_c^s - p_j^t||
    hinge = (margin + dist.diagonal()[:, None] - dist).clamp_min(0)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=dist.device)
    return hinge[off_diagonal].mean()


@_full_precision
def spirit_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Spirit Distillation, Wu et al. 2021, Eq. 2: feature extractor (FE) against activation map generator.

    ``L_D = 1 / |P| * sum_{pos in P} sum_i (y^AMG_{pos,i} - y^FE_{pos,i})^2``: squared error summed
    over the channels and averaged over the positions (and the batch) of ``(B, C, H, W)`` maps. The
    printed equation reads ``y^AMG - y^AMG``, a typo for AMG (teacher) against FE (``student``).
    This is ``C`` times the element-wise MSE of :func:`~kdkit.terms.features.fitnet_loss`.
    """
    return (teacher - student).pow(2).sum(1).mean()


def _require_maps(term: str, shapes: dict[str, tuple[str, torch.Size]]) -> None:
    """Raise unless every ``role -> (tap, shape)`` is a ``(B, C, H, W)`` map."""
    for role, (key, shape) in shapes.items():
        if len(shape) != 4:
            raise KdkitError(
                f"term '{term}' needs maps (B, C, H, W), but {role} tap '{key}' has shape {tuple(shape)}; "
                f"pick a score map or stage output of a dense-prediction model"
            )


@TERMS.register("cwd", "Shu et al. 2021: channel-wise distillation, per-channel spatial softmax KL")
class CWD(_SingleTapTerm):
    """Channel-wise distillation: :func:`cwd_loss` on ``connector(student_tap)`` and ``teacher_tap``.

    Score maps (``"logits"``) by default, or feature taps. When the channel counts or sizes differ a
    connector from :func:`~kdkit.connectors.build_connector` maps the student to the teacher (1x1
    conv + BN, bilinear resize), as in FitNet. I2CKD's ``L_SM`` is this term with ``temperature: 2``
    and weight ``lambda_SM = 3`` (see :class:`I2CKD`).
    """

    def __init__(
        self, *, temperature: float = 4.0, student_tap: str = LOGITS, teacher_tap: str = LOGITS
    ) -> None:
        super().__init__(student_tap, teacher_tap)
        self.temperature = temperature
        self.connector: nn.Module = nn.Identity()

    def _default(self, model: nn.Module | None, role: str) -> str:
        return LOGITS

    def bind(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        src, dst = student_shapes[self.student_tap], teacher_shapes[self.teacher_tap]
        _require_maps("cwd", {"teacher": (self.teacher_tap, dst)})
        self.connector = build_connector(src, dst, self.student_tap, self.teacher_tap)

    def forward(self, view: StepView) -> Tensor:
        student = self.connector(view.student[self.student_tap])
        return cwd_loss(student, view.teacher[self.teacher_tap], self.temperature)


@TERMS.register("i2ckd", "Karine et al. 2024: I2CKD, triplet loss on student/teacher class prototypes")
class I2CKD(_SingleTapTerm):
    """Intra- and inter-class KD: :func:`i2ckd_loss` on the prototypes (:func:`i2ckd_prototypes`).

    Unset taps default to each model's ``embedding_tap`` (the final classifier's input), else its last
    ``feature_taps``. A projector (1x1 conv + BN from :func:`~kdkit.connectors.build_connector`) maps
    the student's channels to the teacher's when they differ; each model's prototypes are computed at
    its own resolution and only classes present in both count. The number of classes is the channel
    count of the student's logits.

    Margin: the paper gives no value. Prototype distances are not normalised and scale with the
    features' magnitude, so ``m`` is in feature units. FaceNet's margin 0.2 on unit-norm embeddings is
    10% of their largest distance (2). The default tap, the classifier's input, is a BN + ReLU map
    (DeepLabV3's head: ``K = 256`` channels), whose per-position norm is about ``sqrt(K / 2) ~ 11``
    for unit-variance pre-activations; 10% of that is ~1, hence ``margin = 1.0``. It should also stay
    below the teacher's inter-class prototype distances: then a student that copies the teacher's
    prototypes satisfies Eq. 2, while a larger margin keeps pushing the student's prototypes away from
    the teacher's. For other taps, scale it with the features' norm.

    The paper's total (Eq. 4, ``lambda_I2CKD = 0.6``, ``lambda_SM = 3``, ``T = 2``) is the config::

        terms:
          - {name: ce}
          - {name: cwd, weight: 3, temperature: 2}
          - {name: i2ckd, weight: 0.6}
    """

    needs_labels = True

    def __init__(
        self, *, margin: float = 1.0, student_tap: str | None = None, teacher_tap: str | None = None
    ) -> None:
        super().__init__(student_tap, teacher_tap)
        self.margin = margin
        self.projector: nn.Module = nn.Identity()

    def _default(self, model: nn.Module | None, role: str) -> str:
        embedding = getattr(model, "embedding_tap", None) if model is not None else None
        return embedding or self._declared(model, "feature_taps", role, f"{role}_tap")[-1]

    def bind(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        src, dst = student_shapes[self.student_tap], teacher_shapes[self.teacher_tap]
        _require_maps("i2ckd", {"student": (self.student_tap, src), "teacher": (self.teacher_tap, dst)})
        projected = torch.Size((src[0], dst[1], *src[2:]))  # teacher channels, student resolution
        self.projector = build_connector(src, projected, self.student_tap, self.teacher_tap)

    def forward(self, view: StepView) -> Tensor:
        labels = _labels(view, "i2ckd")
        if labels.dim() != 3:
            raise KdkitError(f"term 'i2ckd' needs masks (B, H, W), got labels of shape {tuple(labels.shape)}")
        num_classes = view.student_logits.shape[1]
        student = self.projector(view.student[self.student_tap])
        p_s, present_s = i2ckd_prototypes(student, labels, num_classes)
        p_t, present_t = i2ckd_prototypes(view.teacher[self.teacher_tap], labels, num_classes)
        return i2ckd_loss(p_s, p_t, present_s & present_t, self.margin)


@TERMS.register("spirit", "Wu et al. 2021: Spirit Distillation, student extractor mimics teacher front part")
class Spirit(_SingleTapTerm):
    """Spirit Distillation's feature mimicking: :func:`spirit_loss` on FE (``student_tap``) and AMG
    (``teacher_tap``).

    The student's feature extractor is normally a grouped-convolution copy of the teacher's front
    part, so the shapes match and no connector is built; otherwise one from
    :func:`~kdkit.connectors.build_connector` maps the student to the teacher.
    """

    def __init__(self, *, student_tap: str = "extractor", teacher_tap: str = "backbone") -> None:
        super().__init__(student_tap, teacher_tap)
        self.connector: nn.Module = nn.Identity()

    def _default(self, model: nn.Module | None, role: str) -> str:
        return "extractor" if role == "student" else "backbone"

    def bind(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        src, dst = student_shapes[self.student_tap], teacher_shapes[self.teacher_tap]
        _require_maps("spirit", {"teacher": (self.teacher_tap, dst)})
        self.connector = build_connector(src, dst, self.student_tap, self.teacher_tap)

    def forward(self, view: StepView) -> Tensor:
        student = self.connector(view.student[self.student_tap])
        return spirit_loss(student, view.teacher[self.teacher_tap])
