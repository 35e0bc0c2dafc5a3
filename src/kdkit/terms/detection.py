"""Detection terms: the student detector's own losses, FPN feature imitation and PKD (dense-head KD:
:mod:`.dense_kd`).

Detectors (:mod:`kdkit.models.detection`) declare their FPN levels as ``feature_taps`` (module paths,
shallow to deep) with ``feature_strides``; :class:`_FpnLevels` pairs the student's and the teacher's
levels by stride for ``mimic``, ``pkd`` and ``fgd`` (:mod:`.fgd`) alike (``levels`` keeps a subset;
``student_taps`` / ``teacher_taps`` name the pairs explicitly instead). The raw outputs of the step
(``{"out": [B, A, C] class logits, "box": [B, A, 4], ...}``) arrive as ``StepView.student_output`` /
``teacher_output`` and the targets ``[B, M, 5]`` as ``StepView.labels``. Half-precision inputs are
computed in float32; float64 stays float64.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..connectors import build_connector
from ..errors import KdkitError
from ..registry import TERMS
from .base import StepView
from .features import _as_list, _TapTerm, fitnet_loss
from .logits import _labels


def _fp32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# ------------------------------------------------------------------------------------ functions


def mimic_loss(students: Sequence[Tensor], teachers: Sequence[Tensor]) -> Tensor:
    """Feature imitation on FPN levels: the mean over level pairs of ``MSE(r(F_s), F_t)``.

    Li et al. 2017 (CVPR), "Mimicking Very Efficient Network for Object Detection", Eq. 1:
    ``L_m = 1/(2N) sum_i ||f_t^i - r(f_s^i)||^2`` with ``r`` a regression layer; here on whole FPN maps
    (not only inside RPN proposals) with FitNet's element-wise mean (Romero et al. 2015, Eq. 3; see
    :func:`~kdkit.terms.features.fitnet_loss`), each level's MSE averaged over the levels. ``students``
    are the connector outputs ``r(F_s)``, already of the teacher's shape.
    """
    if len(students) != len(teachers) or not students:
        raise ValueError(
            f"mimic_loss needs as many student as teacher levels (>0), got {len(students)}, {len(teachers)}"
        )
    return torch.stack([fitnet_loss(_fp32(s), _fp32(t)) for s, t in zip(students, teachers)]).mean()


def pkd_normalize(f: Tensor, eps: float = 1e-6) -> Tensor:
    """PKD's feature normalisation: each channel of ``(B, C, H, W)`` to zero mean and unit variance.

    Statistics per channel over the batch and all positions (``B * H * W`` values, as the authors' code
    in mmrazor/mmdet's ``PKDLoss.norm``), with the population standard deviation (``1/n``; the code's
    ``torch.std`` uses ``1/(n-1)``, which scales the loss by ``(n-1)/n``); the deviation is clamped to at
    least ``eps`` so a constant channel becomes 0.
    """
    f = _fp32(f)
    mean = f.mean((0, 2, 3), keepdim=True)
    std = f.std((0, 2, 3), correction=0, keepdim=True)
    return (f - mean) / std.clamp_min(eps)


def pkd_loss(students: Sequence[Tensor], teachers: Sequence[Tensor]) -> Tensor:
    """PKD, Cao et al. 2022 (NeurIPS), "PKD: General Distillation Framework for Object Detectors via
    Pearson Correlation Coefficient", Sec. 3.3, Eq. 3: ``L_FPN = 1/(2N) sum_i (s_hat_i - t_hat_i)^2``.

    ``s_hat`` / ``t_hat`` are the level's features normalised per channel (:func:`pkd_normalize`), ``N``
    the number of elements of the level; the loss is summed over the level pairs (the official code's
    ``loss += F.mse_loss(norm_S, norm_T) / 2``). Equivalence: for one channel of ``n`` values with
    population statistics, ``sum s_hat^2 = sum t_hat^2 = n`` and ``sum s_hat t_hat = n r``, so
    ``1/(2n) sum (s_hat - t_hat)^2 = 1 - r``: each level's loss is the mean over channels of
    ``1 - pearson(F_s[:, c], F_t[:, c])`` (over batch and positions), invariant to a positive scale and
    a shift of each channel. Shapes of a pair must match (connect and resize first).
    """
    if len(students) != len(teachers) or not students:
        raise ValueError(
            f"pkd_loss needs as many student as teacher levels (>0), got {len(students)}, {len(teachers)}"
        )
    levels = [F.mse_loss(pkd_normalize(s), pkd_normalize(t)) / 2 for s, t in zip(students, teachers)]
    return torch.stack(levels).sum()


# ------------------------------------------------------------------------------------ terms


class _DetectorTerm(_TapTerm):
    """Keeps references to the detectors (read at each step: ``losses``, ``decode_boxes``) without
    registering them as submodules, so the term's state and parameters stay its own."""

    def __init__(self) -> None:
        super().__init__()
        self._models: list[nn.Module | None] = []

    def _model(self, index: int) -> nn.Module:
        if len(self._models) <= index or self._models[index] is None:
            raise KdkitError(
                f"term '{self._name()}' has no detector yet: call resolve_taps(student, teacher) first"
            )
        return self._models[index]

    def _outputs(self, view: StepView, role: str) -> Any:
        out = view.student_output if role == "student" else view.teacher_output
        if not isinstance(out, dict) or "out" not in out:
            raise KdkitError(
                f"term '{self._name()}' reads the {role} detector's raw outputs (StepView.{role}_output, a "
                f"dict with 'out'), but this step has {type(out).__name__}; use it with task: detection"
            )
        return out


@TERMS.register("det", "the student detector's own training losses (its `losses` on the box targets)")
class Det(_DetectorTerm):
    """The student's detection losses: ``sum_k student.losses(student_output, targets)[k]``.

    :meth:`stats` logs every component (``det/classification``, ``det/bbox_regression``, ...).
    """

    needs_teacher = False
    needs_labels = True

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, Tensor] = {}

    def student_taps(self) -> list[str]:
        return []

    def resolve_taps(self, student: nn.Module, teacher: nn.Module | None) -> None:
        if not callable(getattr(student, "losses", None)):
            raise KdkitError(
                f"term 'det' needs a detector student with `losses(outputs, targets)`, but "
                f"{type(student).__name__} has none; pick a model from kdkit.models.detection"
            )
        self._models = [student]

    def forward(self, view: StepView) -> Tensor:
        student = self._model(0)
        parts = student.losses(self._outputs(view, "student"), _labels(view, "det"))
        if not parts:
            raise KdkitError(f"term 'det': {type(student).__name__}.losses returned no loss")
        self._last = {k: v.detach() for k, v in parts.items()}
        total = None
        for value in parts.values():
            total = value if total is None else total + value
        return total

    def stats(self) -> dict[str, Tensor]:
        return dict(self._last)


class _FpnLevels(_TapTerm):
    """FPN level pairs, the one pairing rule of the level terms (``mimic``, ``pkd``, ``fgd``).

    By stride from the models' ``feature_taps`` / ``feature_strides`` (optionally only the strides in
    ``levels``), shallow to deep in the student's order; where a model declares several levels at one
    stride (torchvision's MobileNetV3 FPN: two at 32), the deepest ones pair (last with last, ...).
    Or explicit ``student_taps`` / ``teacher_taps`` lists, paired one to one. Subclasses build their
    connectors in :meth:`bind` (into ``connectors``) and log per-step scalars in ``_last``.
    """

    def __init__(
        self,
        student_taps: str | Sequence[str] | None,
        teacher_taps: str | Sequence[str] | None,
        levels: int | Sequence[int] | None,
    ) -> None:
        super().__init__()
        self.student_keys = _as_list(student_taps)
        self.teacher_keys = _as_list(teacher_taps)
        self.levels = self._strides_of(levels)
        self.strides: list[int] | None = None  # the stride of each pair, once paired by stride
        if (self.student_keys is None) != (self.teacher_keys is None):
            raise KdkitError(
                f"term '{self._name()}' pairs student_taps with teacher_taps one to one: set both, or "
                f"neither to pair the FPN levels by stride"
            )
        if self.student_keys is not None:
            if len(self.student_keys) != len(self.teacher_keys):
                raise KdkitError(
                    f"term '{self._name()}' pairs student_taps with teacher_taps one to one, but got "
                    f"{len(self.student_keys)} and {len(self.teacher_keys)} taps; list as many of each"
                )
            if self.levels is not None:
                raise KdkitError(
                    f"term '{self._name()}': `levels` picks strides among the levels paired by stride; with "
                    f"explicit student_taps/teacher_taps list only the taps you want instead"
                )
        self.connectors = nn.ModuleList()
        self._last: dict[str, Tensor] = {}

    def _strides_of(self, levels: Any) -> list[int] | None:
        if levels is None:
            return None
        values = (
            [levels]
            if isinstance(levels, int)
            else list(levels)
            if isinstance(levels, (list, tuple))
            else None
        )
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise KdkitError(
                f"term '{self._name()}' levels are FPN strides shared by both models (e.g. [8, 16]), got "
                f"{levels!r}"
            )
        return values

    def _strided_taps(self, model: nn.Module | None, role: str) -> dict[int, list[str]]:
        """``{stride: [taps]}`` in declared order (a stride may repeat)."""
        taps = list(self._declared(model, "feature_taps", role, f"{role}_taps"))
        strides = list(getattr(model, "feature_strides", None) or [])
        if len(strides) != len(taps):
            raise KdkitError(
                f"term '{self._name()}' pairs FPN levels by stride, but the {role} model declares "
                f"{len(taps)} feature_taps with feature_strides {strides}; set student_taps and teacher_taps"
            )
        levels: dict[int, list[str]] = {}
        for stride, tap in zip(strides, taps):
            levels.setdefault(int(stride), []).append(tap)
        return levels

    def resolve_taps(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Pair by stride, shallow to deep in the student's order; where a stride has several levels the
        deepest ones pair (the last student level of that stride with the teacher's last, and so on)."""
        if self.student_keys is not None:
            return
        s_levels = self._strided_taps(student, "student")
        t_levels = self._strided_taps(teacher, "teacher")
        common = [stride for stride in s_levels if stride in t_levels]
        if self.levels is not None:
            missing = [stride for stride in self.levels if stride not in common]
            if missing:
                raise KdkitError(
                    f"term '{self._name()}' levels {missing} are not strides of both models (student "
                    f"{list(s_levels)}, teacher {list(t_levels)}); pick levels from {common}"
                )
            common = [stride for stride in common if stride in self.levels]
        if not common:
            raise KdkitError(
                f"term '{self._name()}' pairs FPN levels by stride, but the student's strides "
                f"{list(s_levels)} and the teacher's {list(t_levels)} share none; set student_taps and "
                f"teacher_taps"
            )
        self.strides, self.student_keys, self.teacher_keys = [], [], []
        for stride in common:
            count = min(len(s_levels[stride]), len(t_levels[stride]))
            self.strides += [stride] * count
            self.student_keys += s_levels[stride][-count:]
            self.teacher_keys += t_levels[stride][-count:]

    def student_taps(self) -> list[str]:
        return list(self._require(self.student_keys, "student_taps"))

    def teacher_taps(self) -> list[str]:
        return list(self._require(self.teacher_keys, "teacher_taps"))

    def _check_maps(
        self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]
    ) -> list[tuple[torch.Size, torch.Size]]:
        """The ``(student, teacher)`` shapes of each pair, all ``(B, C, H, W)``."""
        pairs = []
        for s_key, t_key in zip(self.student_taps(), self.teacher_taps(), strict=True):
            src, dst = student_shapes[s_key], teacher_shapes[t_key]
            for role, key, shape in (("student", s_key, src), ("teacher", t_key, dst)):
                if len(shape) != 4:
                    raise KdkitError(
                        f"term '{self._name()}' needs FPN maps (B, C, H, W), but {role} tap '{key}' has "
                        f"shape {tuple(shape)}; tap the detector's FPN levels"
                    )
            pairs.append((src, dst))
        return pairs

    def stats(self) -> dict[str, Tensor]:
        return dict(self._last)


_REDUCTIONS = {"mean": torch.mean, "sum": torch.sum}


class _LevelTerm(_FpnLevels):
    """A loss per FPN level pair (:attr:`level_loss` on one pair), reduced over the pairs by
    :attr:`reduction` (``"mean"`` or ``"sum"``). A connector per pair maps the student's channels to
    the teacher's (1x1 conv + BN, as FitNet's) and a bilinear resize to the teacher's size runs when the
    two grids differ; ``stats`` logs each level's loss."""

    level_loss: ClassVar[Callable[[Sequence[Tensor], Sequence[Tensor]], Tensor]]
    reduction: ClassVar[str]

    def __init__(
        self,
        *,
        student_taps: list[str] | None = None,
        teacher_taps: list[str] | None = None,
        levels: list[int] | None = None,
    ) -> None:
        super().__init__(student_taps, teacher_taps, levels)

    def bind(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        connectors = []
        pairs = self._check_maps(student_shapes, teacher_shapes)
        for s_key, t_key, (src, dst) in zip(self.student_keys, self.teacher_keys, pairs, strict=True):
            # channels only: the resize to the teacher's grid happens per step (input sizes may vary)
            connectors.append(build_connector(torch.Size([*src[:2], *dst[2:]]), dst, s_key, t_key))
        self.connectors = nn.ModuleList(connectors)

    def _level_names(self) -> list[str]:
        """Stats keys: ``stride8`` (``stride32_0``, ``stride32_1`` where a stride pairs twice), or
        ``level0``... for explicit taps."""
        if self.strides is None:
            return [f"level{i}" for i in range(len(self.student_keys))]
        names, seen = [], {}
        for stride in self.strides:
            index = seen[stride] = seen.get(stride, -1) + 1
            names.append(f"stride{stride}_{index}" if self.strides.count(stride) > 1 else f"stride{stride}")
        return names

    def _pairs(self, view: StepView) -> tuple[list[Tensor], list[Tensor]]:
        students, teachers = [], []
        for i, (s_key, t_key) in enumerate(zip(self.student_keys, self.teacher_keys, strict=True)):
            teacher = view.teacher[t_key]
            student = (
                self.connectors[i](view.student[s_key]) if len(self.connectors) > i else view.student[s_key]
            )
            if student.shape[-2:] != teacher.shape[-2:]:
                student = F.interpolate(
                    student, size=teacher.shape[-2:], mode="bilinear", align_corners=False
                )
            students.append(student)
            teachers.append(teacher)
        return students, teachers

    def teacher_space_taps(self) -> list[str]:
        return list(self.teacher_keys or [])

    def teacher_space(self, view: StepView) -> dict[str, Tensor]:
        """The connected (and resized) student levels by teacher tap: the targets SoKD's DAFA pulls the
        refined teacher levels towards (Eq. 14), as FitNet's connector output on classification."""
        students, _ = self._pairs(view)
        return dict(zip(self.teacher_keys, students, strict=True))

    def forward(self, view: StepView) -> Tensor:
        students, teachers = self._pairs(view)
        per_level = [self.level_loss([s], [t]) for s, t in zip(students, teachers)]
        self._last = {k: v.detach() for k, v in zip(self._level_names(), per_level)}
        return _REDUCTIONS[self.reduction](torch.stack(per_level))


@TERMS.register("mimic", "Li et al. 2017: feature imitation (FitNet MSE) on FPN levels paired by stride")
class Mimic(_LevelTerm):
    """Feature imitation on FPN levels: :func:`mimic_loss` (mean over level pairs of the connected MSE).

    Levels pair by stride (``levels: [8, 16]`` keeps those strides); ``stats`` logs each level's MSE.
    """

    level_loss = staticmethod(mimic_loss)
    reduction = "mean"


@TERMS.register("pkd", "Cao et al. 2022: PKD, MSE of per-channel normalised FPN features (1 - Pearson r)")
class PKD(_LevelTerm):
    """PKD: :func:`pkd_loss` (summed over the level pairs) on connected FPN features.

    The paper pairs equal-width FPNs (256 channels) without a connector; a 1x1 connector is built here
    only when the channel counts differ. ``stats`` logs each level's ``1 - r``.
    """

    level_loss = staticmethod(pkd_loss)
    reduction = "sum"
