"""Feature terms: FitNet hints, attention transfer, similarity preserving and relational KD.

Each term reads student/teacher taps. Taps left unset in the config are filled by
:meth:`Term.resolve_taps` from the models' declared taps (zoo models carry ``feature_taps``, stage
outputs shallow to deep, and ``embedding_tap``, the classifier's input); a model without them
needs the taps named in the config, and the error says which argument to set.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..connectors import build_connector, grid_tokens, token_grid, tokens_to_map
from ..errors import KdkitError
from ..registry import TERMS
from .base import StepView, Term


def fitnet_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """FitNets hint loss, Romero et al. 2015 (ICLR), Eq. 3: ``||u_h - r(v_g)||^2``.

    ``student`` is the regressor output ``r(v_g)`` (the connector applied to the student tap).
    Mean squared error over all elements (as in the CRD/mdistiller code) instead of the paper's
    half sum, which only rescales the weight.
    """
    return F.mse_loss(student, teacher)


def _as_map(f: Tensor) -> Tensor:
    """Channels-first map: maps as they are, ViT tokens ``(B, N, C)`` folded onto their grid."""
    return tokens_to_map(f) if f.dim() == 3 else f


def attention_map(f: Tensor, p: float = 2.0, size: tuple[int, int] | None = None) -> Tensor:
    """Spatial attention of Zagoruyko & Komodakis 2017, Sec. 3.1, flattened and L2-normalised.

    ``F^p_mean(A) = mean_c |A_c|^p`` over channels of a ``(B, C, H, W)`` map (or ViT tokens, folded
    onto their grid), resized to ``size`` when given (adaptive average pooling when shrinking,
    bilinear otherwise), flattened to ``(B, H*W)`` and divided by its L2 norm per sample.
    """
    a = _as_map(f).abs().pow(p).mean(1, keepdim=True)
    if size is not None and tuple(a.shape[-2:]) != tuple(size):
        if a.shape[-2] >= size[0] and a.shape[-1] >= size[1]:
            a = F.adaptive_avg_pool2d(a, size)
        else:
            a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
    return F.normalize(a.flatten(1), dim=1)


def at_loss(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    """Attention transfer for one pair of taps, Zagoruyko & Komodakis 2017 (ICLR), in the form of the
    authors' code rather than the paper's Eq. 2.

    ``mean((Q_s - Q_t)^2)`` over batch and positions, with ``Q = attention_map(F)`` (the student's
    map resized to the teacher's grid): the official code's ``(at(x) - at(y)).pow(2).mean()``, also
    used by CRD and mdistiller. Eq. 2 instead takes, per pair, the ``p``-norm (``p = 2``) of the
    difference of the normalised maps, ``|| Q_s/||Q_s|| - Q_t/||Q_t|| ||_2``, not squared: the code
    squares it, so its gradient shrinks with the difference instead of having unit size. The mean
    over ``B * H * W`` entries matches the paper's Sec. 4.1 choice of ``beta`` (10^3 divided by the
    batch size and the attention map's size, per layer). The paper's ``F_sum`` and the code's channel
    mean give the same map once L2-normalised. The constant is the term's config ``weight`` (1000 in
    CRD and mdistiller).
    """
    q_t = attention_map(teacher, p)
    size = tuple(_as_map(teacher).shape[-2:])
    return (attention_map(student, p, size) - q_t).pow(2).mean()


def sp_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Similarity-preserving KD for one pair of taps, Tung & Mori 2019 (ICCV), Sec. 3.

    ``G = Q Q^T`` for the ``(b, -1)`` flattened features, each row L2-normalised, and the loss
    ``||G_t - G_s||_F^2 / b^2``. Shapes of the two taps need not match, only the batch size.
    """
    b = student.shape[0]
    return (_similarity(student) - _similarity(teacher)).pow(2).sum() / b**2


def _similarity(f: Tensor) -> Tensor:
    q = f.flatten(1)
    return F.normalize(q @ q.T, dim=1)


def pairwise_differences(e: Tensor) -> Tensor:
    """``d[i, j] = e[j] - e[i]`` for embeddings ``(B, D)``: ``(B, B, D)``."""
    return e.unsqueeze(0) - e.unsqueeze(1)


def rkd_distances(e: Tensor) -> Tensor:
    """RKD distance potential, Park et al. 2019, Sec. 3.2.1: ``||e_i - e_j|| / mu``, ``(B, B)``.

    ``mu`` is the mean distance over the ``B (B - 1)`` pairs of distinct samples.
    """
    d = pairwise_differences(e).norm(dim=-1)
    b = e.shape[0]
    return d / (d.sum() / (b * (b - 1)))


def rkd_angles(e: Tensor) -> Tensor:
    """RKD angle potential, Park et al. 2019, Sec. 3.2.2: ``a[i, j, k] = cos angle(e_j - e_i, e_k - e_i)``.

    ``(B, B, B)``; entries with ``j == i`` or ``k == i`` are 0.
    """
    u = F.normalize(pairwise_differences(e), dim=-1)
    return u @ u.transpose(1, 2)


def rkd_loss(
    student: Tensor, teacher: Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0
) -> Tensor:
    """Relational KD, Park et al. 2019 (CVPR), Sec. 3.2: ``w_d * L_RKD-D + w_a * L_RKD-A``.

    Both parts are the Huber loss (smooth L1, ``delta = 1``) between the student's and teacher's
    potentials (:func:`rkd_distances` over ``B^2`` entries, :func:`rkd_angles` over ``B^3``),
    averaged over the entries as in the official code. Taps are flattened to ``(B, -1)``; student
    and teacher widths may differ. Memory grows as ``B^2 * D``.
    """
    s, t = student.flatten(1), teacher.flatten(1)
    loss_d = F.smooth_l1_loss(rkd_distances(s), rkd_distances(t))
    loss_a = F.smooth_l1_loss(rkd_angles(s), rkd_angles(t))
    return distance_weight * loss_d + angle_weight * loss_a


def _as_list(taps: str | Sequence[str] | None) -> list[str] | None:
    if taps is None:
        return None
    return [taps] if isinstance(taps, str) else (list(taps) or None)


class _TapTerm(Term):
    """Shared tap bookkeeping: registered name for messages, declared taps, unresolved taps."""

    def _name(self) -> str:
        return next(e.name for e in TERMS.entries() if e.obj is type(self))

    def _declared(self, model: nn.Module | None, attr: str, role: str, arg: str):
        value = getattr(model, attr, None) if model is not None else None
        if not value:
            raise KdkitError(
                f"term '{self._name()}' needs `{arg}`: the {role} model declares no `{attr}` to take a "
                f"default from; set {arg} on the term in the config (`kdkit inspect CONFIG` lists modules)"
            )
        return value

    def _require(self, value, arg: str):
        if value is None:
            raise KdkitError(
                f"term '{self._name()}' has no `{arg}` yet: set it in the config or call resolve_taps first"
            )
        return value


class _SingleTapTerm(_TapTerm):
    """One student tap against one teacher tap (``student_tap`` / ``teacher_tap``)."""

    def __init__(self, student_tap: str | None, teacher_tap: str | None) -> None:
        super().__init__()
        self.student_tap = student_tap
        self.teacher_tap = teacher_tap

    def _default(self, model: nn.Module | None, role: str) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def resolve_taps(self, student: nn.Module, teacher: nn.Module | None) -> None:
        if self.student_tap is None:
            self.student_tap = self._default(student, "student")
        if self.teacher_tap is None:
            self.teacher_tap = self._default(teacher, "teacher")

    def student_taps(self) -> list[str]:
        return [self._require(self.student_tap, "student_tap")]

    def teacher_taps(self) -> list[str]:
        return [self._require(self.teacher_tap, "teacher_tap")]


class _MultiTapTerm(_TapTerm):
    """Pairs of taps (``student_taps[i]`` with ``teacher_taps[i]``); subclasses sum the loss over pairs.

    Unset lists default to the last ``n`` declared ``feature_taps`` of that model, where ``n`` is
    the length of the other list when it is set, else :meth:`_default_count`.
    """

    def __init__(
        self, student_taps: str | Sequence[str] | None, teacher_taps: str | Sequence[str] | None
    ) -> None:
        super().__init__()
        self.student_keys = _as_list(student_taps)
        self.teacher_keys = _as_list(teacher_taps)
        self._check_pairs()

    def _default_count(self, n_student: int, n_teacher: int) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_pairs(self) -> None:
        s, t = self.student_keys, self.teacher_keys
        if s is not None and t is not None and len(s) != len(t):
            raise KdkitError(
                f"term '{self._name()}' pairs student_taps with teacher_taps one to one, but got "
                f"{len(s)} and {len(t)} taps; list the same number of each"
            )

    def resolve_taps(self, student: nn.Module, teacher: nn.Module | None) -> None:
        s_all = t_all = None
        if self.student_keys is None:
            s_all = list(self._declared(student, "feature_taps", "student", "student_taps"))
        if self.teacher_keys is None:
            t_all = list(self._declared(teacher, "feature_taps", "teacher", "teacher_taps"))
        if self.student_keys is not None:
            count = len(self.student_keys)
        elif self.teacher_keys is not None:
            count = len(self.teacher_keys)
        else:
            count = self._default_count(len(s_all), len(t_all))
        for declared, role, arg in ((s_all, "student", "student_taps"), (t_all, "teacher", "teacher_taps")):
            if declared is not None and len(declared) < count:
                raise KdkitError(
                    f"term '{self._name()}' needs {count} {role} taps to pair with, but the {role} model "
                    f"declares only {len(declared)} feature_taps; set {arg} in the config"
                )
        self.student_keys = self.student_keys or s_all[-count:]
        self.teacher_keys = self.teacher_keys or t_all[-count:]
        self._check_pairs()

    def student_taps(self) -> list[str]:
        return list(self._require(self.student_keys, "student_taps"))

    def teacher_taps(self) -> list[str]:
        return list(self._require(self.teacher_keys, "teacher_taps"))

    def _pairs(self, view: StepView):
        return [
            (view.student[s], view.teacher[t])
            for s, t in zip(self.student_keys, self.teacher_keys, strict=True)
        ]


class _MiddleTapTerm(_SingleTapTerm):
    """A single-tap term whose unset taps default to the middle declared feature tap of each model,
    ``feature_taps[len // 2]`` (FitNet's hint layer; SoKD's DAM)."""

    def _default(self, model: nn.Module | None, role: str) -> str:
        taps = self._declared(model, "feature_taps", role, f"{role}_tap")
        return taps[len(taps) // 2]


@TERMS.register(
    "fitnet", "Romero et al. 2015: FitNets hint, MSE between connected student and teacher stages"
)
class FitNet(_MiddleTapTerm):
    """FitNets hint: :func:`fitnet_loss` on ``connector(student_tap)`` and ``teacher_tap``.

    Unset taps default to the middle declared feature tap of each model, ``feature_taps[len // 2]``
    (stage 3 of 4 like CRD's ``hint_layer=2``, stage 2 of 3 for CIFAR ResNets). :meth:`bind`
    builds the connector (see :func:`kdkit.connectors.build_connector`); a map-to-tokens connector
    is compared with the teacher's grid tokens only.
    """

    def __init__(self, *, student_tap: str | None = None, teacher_tap: str | None = None) -> None:
        super().__init__(student_tap, teacher_tap)
        self.connector: nn.Module = nn.Identity()
        self.teacher_grid_only = False

    def bind(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        src, dst = student_shapes[self.student_tap], teacher_shapes[self.teacher_tap]
        self.connector = build_connector(src, dst, self.student_tap, self.teacher_tap)
        self.teacher_grid_only = len(src) == 4 and len(dst) == 3

    def forward(self, view: StepView) -> Tensor:
        teacher = view.teacher[self.teacher_tap]
        if self.teacher_grid_only:
            teacher = grid_tokens(teacher)
        return fitnet_loss(self.connector(view.student[self.student_tap]), teacher)

    def teacher_space_taps(self) -> list[str]:
        return [] if self.teacher_grid_only else [self.teacher_tap]

    def teacher_space(self, view: StepView) -> dict[str, Tensor]:
        return {k: self.connector(view.student[self.student_tap]) for k in self.teacher_space_taps()}


@TERMS.register("at", "Zagoruyko & Komodakis 2017: attention transfer between stage outputs")
class AT(_MultiTapTerm):
    """Attention transfer: sum of :func:`at_loss` (the authors' code form) over the tap pairs, as Eq. 2
    sums over ``j in I``.

    Unset taps default to the last ``min(n_student, n_teacher)`` declared feature taps of each
    model (all of them when both have as many stages). The paper's ``beta = 1000`` is the config
    ``weight``; summing over pairs as the paper and the CRD/mdistiller code do keeps that weight.
    """

    def __init__(
        self,
        *,
        student_taps: list[str] | None = None,
        teacher_taps: list[str] | None = None,
        p: float = 2.0,
    ) -> None:
        super().__init__(student_taps, teacher_taps)
        self.p = p

    def _default_count(self, n_student: int, n_teacher: int) -> int:
        return min(n_student, n_teacher)

    def bind(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        for role, keys, shapes in (
            ("student", self.student_keys, student_shapes),
            ("teacher", self.teacher_keys, teacher_shapes),
        ):
            for key in keys:
                shape = shapes[key]
                if not (len(shape) == 4 or (len(shape) == 3 and token_grid(shape[1]) is not None)):
                    raise KdkitError(
                        f"term '{self._name()}' needs feature maps (B, C, H, W) or grid tokens (B, N, C), "
                        f"but {role} tap '{key}' has shape {tuple(shape)}; pick a stage output"
                    )

    def forward(self, view: StepView) -> Tensor:
        return torch.stack([at_loss(s, t, self.p) for s, t in self._pairs(view)]).sum()


@TERMS.register("sp", "Tung & Mori 2019: similarity-preserving KD on batch similarity matrices")
class SP(_MultiTapTerm):
    """Similarity preserving: sum of :func:`sp_loss` over the tap pairs (the paper's Eq. 4).

    Unset taps default to the last declared feature tap of each model. The paper's
    ``gamma = 3000`` is the config ``weight``.
    """

    def __init__(
        self, *, student_taps: list[str] | None = None, teacher_taps: list[str] | None = None
    ) -> None:
        super().__init__(student_taps, teacher_taps)

    def _default_count(self, n_student: int, n_teacher: int) -> int:
        return 1

    def forward(self, view: StepView) -> Tensor:
        return torch.stack([sp_loss(s, t) for s, t in self._pairs(view)]).sum()


@TERMS.register("rkd", "Park et al. 2019: relational KD, distance- and angle-wise relations of embeddings")
class RKD(_SingleTapTerm):
    """Relational KD: :func:`rkd_loss`. Unset taps default to each model's ``embedding_tap``."""

    def __init__(
        self,
        *,
        student_tap: str | None = None,
        teacher_tap: str | None = None,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
    ) -> None:
        super().__init__(student_tap, teacher_tap)
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight

    def _default(self, model: nn.Module | None, role: str) -> str:
        return self._declared(model, "embedding_tap", role, f"{role}_tap")

    def forward(self, view: StepView) -> Tensor:
        return rkd_loss(
            view.student[self.student_tap],
            view.teacher[self.teacher_tap],
            self.distance_weight,
            self.angle_weight,
        )
