"""Logit terms: cross-entropy, KD, DKD, logit standardization and DIST.

Logits are ``(B, C)``; dense logits ``(B, C, *S)`` (e.g. segmentation) are treated as ``B * prod(S)``
independent rows of ``C`` classes (labels ``(B, *S)``), so "batch mean" is then a mean over positions
(``kd`` on score maps is the pixel-wise distillation of Liu et al.'s SKD); ``ce`` on segmentation masks
also skips the ignore index and resizes the logits to the mask (:func:`ce_loss`).
Soft labels ``(B, C)`` (mixup/cutmix) are accepted by ``ce``; the terms that need a target class
(``dkd``) use their arg-max.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.base import IGNORE_INDEX
from ..errors import KdkitError
from ..registry import TERMS
from .base import StepView, Term


def class_rows(z: Tensor) -> Tensor:
    """``(B, C)`` logits as they are; dense ``(B, C, *S)`` logits as ``(B * prod(S), C)`` rows."""
    return z if z.dim() == 2 else z.movedim(1, -1).reshape(-1, z.shape[1])


def kl_divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Batch mean of ``KL(p || q) = sum_c p_c (log p_c - log q_c)`` from log-probabilities ``(B, C)``."""
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def pearson_correlation(a: Tensor, b: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of ``a`` and ``b`` along ``dim``: ``cov(a, b) / (std(a) std(b))``.

    Computed as the cosine of the centred vectors. The denominator is clamped to at least ``eps``
    (the DIST code adds ``eps`` instead, which keeps identical inputs slightly below 1), so a
    constant vector has correlation 0.
    """
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim)).clamp_min(eps)


def standardize_logits(z: Tensor, base_temperature: float = 2.0, eps: float = 1e-7) -> Tensor:
    """Z-score logit standardization, Sun et al. 2024 (CVPR), Algorithm 1: ``Z(z; tau)``.

    ``(z - mean(z)) / ((std(z) + eps) * tau)`` over the last (class) dimension, per sample. ``std``
    is the population standard deviation over the ``K`` classes (``1/K`` inside the square root,
    as in the paper's definition); the official code uses ``torch.std`` (``1/(K-1)``), which only
    rescales the effective temperature by ``sqrt(K/(K-1))`` (0.5% for K=100). The output has zero
    mean and standard deviation ``1 / tau`` (up to ``eps``, added as in the official code).
    """
    mean = z.mean(-1, keepdim=True)
    std = z.std(-1, correction=0, keepdim=True)
    return (z - mean) / ((std + eps) * base_temperature)


def _soften(z: Tensor, temperature: float, standardize: bool) -> Tensor:
    """Temperature-scaled logit rows: ``z / T`` or, with standardization, ``Z(z; T)``."""
    rows = class_rows(z)
    return standardize_logits(rows, temperature) if standardize else rows / temperature


def ce_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy with label smoothing (Szegedy et al. 2016, Sec. 7).

    The target is ``q = (1 - eps) * onehot(y) + eps / C`` and the loss the batch mean of
    ``-sum_c q_c log softmax(z)_c``. ``labels`` are class indices or class probabilities.

    Dense logits ``(B, C, H, W)`` with masks ``(B, H', W')`` (segmentation): logits of another spatial
    size are first resized bilinearly (``align_corners=False``) to the mask's, and pixels labelled
    :data:`~kdkit.data.base.IGNORE_INDEX` (255) are skipped: the loss is the mean over labelled pixels
    (0, not NaN, when a batch has none). Classification logits ``(B, C)`` ignore nothing: class 255 is
    an ordinary class there.
    """
    if logits.dim() == 2:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if tuple(logits.shape[2:]) != tuple(labels.shape[-2:]):
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    if labels.is_floating_point():  # dense class probabilities: nothing to ignore
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    total = F.cross_entropy(
        logits, labels, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing, reduction="sum"
    )
    return total / (labels != IGNORE_INDEX).sum().clamp_min(1)


def kd_loss(student: Tensor, teacher: Tensor, temperature: float = 4.0, standardize: bool = False) -> Tensor:
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network".

    ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`` (softened softmax of Eq. 1; the ``T^2`` factor
    of Sec. 2 keeps gradient magnitudes independent of ``T``), batch mean. With ``standardize`` the
    logits are first Z-scored (:func:`standardize_logits`) and ``T`` is the base temperature.
    """
    s = _soften(student, temperature, standardize)
    t = _soften(teacher, temperature, standardize)
    return kl_divergence(t.log_softmax(-1), s.log_softmax(-1)) * temperature**2


def _target_mask(z: Tensor, labels: Tensor) -> Tensor:
    return torch.zeros_like(z, dtype=torch.bool).scatter_(1, labels.unsqueeze(1), True)


def _binary_log_probs(z: Tensor, target: Tensor) -> Tensor:
    """``log b = [log p_t, log p_\\t]`` (DKD Eq. 1), computed stably with log-sum-exp."""
    log_total = z.logsumexp(-1)
    log_target = z[target] - log_total
    log_rest = z.masked_fill(target, float("-inf")).logsumexp(-1) - log_total
    return torch.stack([log_target, log_rest], -1)


def _non_target_log_probs(z: Tensor, target: Tensor) -> Tensor:
    """``log p_hat``: log-softmax over the ``C - 1`` non-target classes only (DKD Eq. 2)."""
    return z[~target].view(z.shape[0], z.shape[1] - 1).log_softmax(-1)


def dkd_loss(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    standardize: bool = False,
) -> Tensor:
    """Decoupled KD, Zhao et al. 2022 (CVPR), Eq. 7: ``alpha * TCKD + beta * NCKD``, ``T^2`` scaled.

    ``TCKD = KL(b_T || b_S)`` over the binary target/non-target probabilities ``b = [p_t, 1 - p_t]``
    (Eq. 1) and ``NCKD = KL(p_hat_T || p_hat_S)`` over the distribution among the non-target classes
    (Eq. 2; the target column is removed, not pushed to -1000 as in the official code). Both are
    batch means. Classical KD equals ``TCKD + (1 - p_t^T) * NCKD`` (Sec. 3.1). The warm-up of the
    official code lives in :class:`DKD`.
    """
    s = _soften(student, temperature, standardize)
    t = _soften(teacher, temperature, standardize)
    target = _target_mask(s, labels.reshape(-1))
    tckd = kl_divergence(_binary_log_probs(t, target), _binary_log_probs(s, target))
    nckd = kl_divergence(_non_target_log_probs(t, target), _non_target_log_probs(s, target))
    return (alpha * tckd + beta * nckd) * temperature**2


def dist_loss(
    student: Tensor, teacher: Tensor, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0
) -> Tensor:
    """DIST, Huang et al. 2022 (NeurIPS), "Knowledge Distillation from A Stronger Teacher", Sec. 3.

    With ``Y = softmax(Z / T)`` of shape ``(B, C)`` and ``d_p(u, v) = 1 - pearson(u, v)``:
    inter-class relation ``L_inter = mean_i d_p(Y_s[i, :], Y_t[i, :])`` (rows), intra-class relation
    ``L_intra = mean_j d_p(Y_s[:, j], Y_t[:, j])`` (columns, over the batch); the loss is
    ``T^2 * (beta * L_inter + gamma * L_intra)``.
    """
    ys = (class_rows(student) / temperature).softmax(-1)
    yt = (class_rows(teacher) / temperature).softmax(-1)
    inter = 1 - pearson_correlation(ys, yt, dim=1).mean()
    intra = 1 - pearson_correlation(ys, yt, dim=0).mean()
    return temperature**2 * (beta * inter + gamma * intra)


def _labels(view: StepView, term: str) -> Tensor:
    if view.labels is None:
        raise KdkitError(f"term '{term}' needs labels, but this step has none (unlabelled data?)")
    return view.labels


@TERMS.register("ce", "cross-entropy with the labels (optional label smoothing)")
class CE(Term):
    """Cross-entropy of the student's logits with the labels: :func:`ce_loss`.

    On dense logits the ignore index (255) is skipped and logits are resized to the mask's size.
    """

    needs_teacher = False
    needs_labels = True

    def __init__(self, *, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, view: StepView) -> Tensor:
        return ce_loss(view.student_logits, _labels(view, "ce"), self.label_smoothing)


@TERMS.register("kd", "Hinton et al. 2015: KL between temperature-softened logits, T^2 scaled")
class KD(Term):
    """Hinton KD: :func:`kd_loss` (``standardize=True`` adds logit standardization)."""

    def __init__(self, *, temperature: float = 4.0, standardize: bool = False) -> None:
        super().__init__()
        self.temperature = temperature
        self.standardize = standardize

    def forward(self, view: StepView) -> Tensor:
        return kd_loss(view.student_logits, view.teacher_logits, self.temperature, self.standardize)


@TERMS.register("kd_ls", "Sun et al. 2024: KD on Z-score standardized logits (base temperature 2)")
class KDLS(KD):
    """KD with logit standardization on: :func:`kd_loss` with ``standardize=True``.

    Defaults follow the paper's CIFAR-100 recipe (official README: ``--base-temp 2 --kd-weight 9``,
    with the cross-entropy weight at mdistiller's 0.1): set ``weight: 9`` on this term in the config.
    """

    def __init__(self, *, temperature: float = 2.0, standardize: bool = True) -> None:
        super().__init__(temperature=temperature, standardize=standardize)


@TERMS.register("dkd", "Zhao et al. 2022: decoupled KD, alpha*TCKD + beta*NCKD with linear warm-up")
class DKD(Term):
    """Decoupled KD: :func:`dkd_loss` times the warm-up factor of the official code.

    mdistiller multiplies the loss by ``min(epoch / warmup, 1)`` with ``epoch`` counting from 1 and
    fixed for the whole epoch. kdkit's steps carry the 0-based fractional epoch
    (``StepView.epoch_progress = step / steps_per_epoch``), so the factor is
    ``min((floor(epoch_progress) + 1) / warmup_epochs, 1)``: ``1 / warmup_epochs`` (0.05 for the
    default 20) from the first step of the first epoch to its last, ``k / warmup_epochs`` in epoch
    ``k`` (counted from 1), and 1 from epoch ``warmup_epochs`` on; 1 when ``warmup_epochs`` is 0.
    Epochs are passes over the stage's training data, also in a step-based stage.
    """

    needs_labels = True

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        warmup_epochs: float = 20,
        standardize: bool = False,
    ) -> None:
        super().__init__()
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature
        self.warmup_epochs = warmup_epochs
        self.standardize = standardize

    def warmup_factor(self, epoch_progress: float) -> float:
        """The factor at 0-based fractional epoch ``epoch_progress``: the 1-based epoch over the warm-up."""
        if self.warmup_epochs <= 0:
            return 1.0
        return min((math.floor(epoch_progress) + 1) / self.warmup_epochs, 1.0)

    def forward(self, view: StepView) -> Tensor:
        labels = _labels(view, "dkd")
        loss = dkd_loss(
            view.student_logits,
            view.teacher_logits,
            labels.argmax(1) if labels.is_floating_point() else labels,
            self.alpha,
            self.beta,
            self.temperature,
            self.standardize,
        )
        return self.warmup_factor(view.epoch_progress) * loss


@TERMS.register("dkd_ls", "Sun et al. 2024: DKD on Z-score standardized logits (base temperature 2)")
class DKDLS(DKD):
    """DKD with logit standardization on: :func:`dkd_loss` with ``standardize=True``.

    The official README runs DKD+LS with ``--base-temp 2 --kd-weight 9``: use ``weight: 9`` in the
    config. (Its ``train.py`` writes the base temperature to ``KD.TEMPERATURE``, which DKD does not
    read, and sets ``BETA = ALPHA * 9`` after scaling ALPHA, i.e. 81; we follow the README.)
    """

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 2.0,
        warmup_epochs: float = 20,
        standardize: bool = True,
    ) -> None:
        super().__init__(
            alpha=alpha,
            beta=beta,
            temperature=temperature,
            warmup_epochs=warmup_epochs,
            standardize=standardize,
        )


@TERMS.register("dist", "Huang et al. 2022: DIST, inter- and intra-class Pearson relations of predictions")
class DIST(Term):
    """DIST: :func:`dist_loss`."""

    def __init__(self, *, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0) -> None:
        super().__init__()
        self.beta = beta
        self.gamma = gamma
        self.temperature = temperature

    def forward(self, view: StepView) -> Tensor:
        return dist_loss(view.student_logits, view.teacher_logits, self.beta, self.gamma, self.temperature)
