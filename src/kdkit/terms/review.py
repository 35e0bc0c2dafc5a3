"""ReviewKD: knowledge review with attention-based fusion (ABF) and the hierarchical context loss (HCL).

Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021, Sec. 3. The student's
features at levels ``1..n`` (shallow to deep) are reviewed from the deepest level to the shallowest
(the residual learning framework of Sec. 3.2): level ``n`` is mapped alone, and every shallower level
``i`` is fused with the fused result of the levels below it, ``F^{i,n} = ABF(F_s^i, F^{i+1,n})``, so
the output at level ``i`` carries the student's levels ``i..n`` and is compared with the teacher's
level ``i``. The loss is ``sum_i HCL(conv(F^{i,n}), F_t^i)`` (Sec. 3.3). Details follow the authors'
code (github.com/dvlab-research/ReviewKD, ``CIFAR-100/model/reviewkd.py``) where the paper is silent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..connectors import token_grid
from ..errors import KdkitError
from ..registry import TERMS
from .base import StepView
from .features import _as_map, _MultiTapTerm

POOL_SIZES = (4, 2, 1)


def _level_mse(student: Tensor, teacher: Tensor, pool_sizes: Sequence[int]) -> Tensor:
    """HCL of one level: see :func:`hcl_loss`."""
    loss = F.mse_loss(student, teacher)
    weight = total = 1.0
    for size in pool_sizes:
        if size >= student.shape[-2]:
            continue
        weight /= 2.0
        pooled_s = F.adaptive_avg_pool2d(student, (size, size))
        pooled_t = F.adaptive_avg_pool2d(teacher, (size, size))
        loss = loss + weight * F.mse_loss(pooled_s, pooled_t)
        total += weight
    return loss / total


def hcl_loss(
    student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], pool_sizes: Sequence[int] = POOL_SIZES
) -> Tensor:
    """Hierarchical context loss, Chen et al. 2021, Sec. 3.3, in the exact form of the authors' ``hcl``.

    The paper describes HCL as spatial pyramid pooling of both maps into levels of context with an
    L2 distance per level; the level weights and their normalisation below are those of the code.
    For each pair of ``(B, C, H, W)`` maps ``(S, T)`` of equal shape, with ``P_k`` adaptive average
    pooling to ``k x k`` and ``k_1 > k_2 > ...`` the ``pool_sizes`` (default 4, 2, 1) smaller than ``H``::

        HCL(S, T) = ( MSE(S, T) + sum_j 2^-j MSE(P_{k_j}(S), P_{k_j}(T)) ) / ( 1 + sum_j 2^-j )

    with ``MSE`` the mean over all elements: the full map has weight 1 and each coarser pooled level
    half the weight of the previous *used* one (an 8x8 map: 1, 1/2, 1/4, 1/8 over 8, 4, 2, 1; a 4x4
    map skips 4 and gets 1, 1/2, 1/4 over 4, 2, 1; a 1x1 map is the MSE alone). The loss is the sum
    over pairs.
    """
    if len(student_feats) != len(teacher_feats):
        raise KdkitError(
            f"hcl_loss pairs student and teacher maps one to one, but got {len(student_feats)} and "
            f"{len(teacher_feats)}; pass as many of each"
        )
    losses = []
    for s, t in zip(student_feats, teacher_feats, strict=True):
        if s.shape != t.shape or s.dim() != 4:
            raise KdkitError(
                f"hcl_loss compares (B, C, H, W) maps of equal shape, but got {tuple(s.shape)} and "
                f"{tuple(t.shape)}; map the student feature to the teacher's shape first"
            )
        losses.append(_level_mse(s, t, pool_sizes))
    return torch.stack(losses).sum()


class ABF(nn.Module):
    """Attention-based fusion, Chen et al. 2021, Sec. 3.3, as in the authors' code.

    ``reduce``: 1x1 conv (no bias) + BN, student channels -> ``mid_channels``. With ``fuse``, the
    deeper level's fused map is resized (nearest) to this level's grid, both are concatenated and a 1x1
    conv (with bias) + sigmoid gives two spatial attention maps ``a``, and the fusion is
    ``x * a[:, 0] + deeper * a[:, 1]``. ``out``: the fused map, resized (nearest) to the teacher's grid
    when that differs, then 3x3 conv (no bias) + BN -> teacher channels. :meth:`forward` returns the
    output for the loss and the fused map (at this level's grid) for the next, shallower level.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels)
        )
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        self.out = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)  # as the authors' code
        nn.init.kaiming_uniform_(self.out[0].weight, a=1)

    def forward(
        self, x: Tensor, deeper: Tensor | None = None, out_size: Sequence[int] | None = None
    ) -> tuple[Tensor, Tensor]:
        x = self.reduce(x)
        if self.attention is not None:
            if deeper is None:
                raise ValueError("this ABF fuses a deeper level: pass `deeper`")
            deeper = F.interpolate(deeper, size=tuple(x.shape[-2:]), mode="nearest")
            a = self.attention(torch.cat([x, deeper], dim=1))
            x = x * a[:, 0:1] + deeper * a[:, 1:2]
        fused = x
        if out_size is not None and tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.out(x), fused


def review_features(
    abfs: Sequence[ABF], student_feats: Sequence[Tensor], out_sizes: Sequence[Sequence[int]]
) -> list[Tensor]:
    """The residual review path of Sec. 3.2: ``abfs[i]`` maps level ``i`` (shallow to deep order).

    The deepest level goes through its ABF alone; every shallower level is fused with the fused map of
    the level below it. Returns the outputs shallow to deep, ``outputs[i]`` at ``out_sizes[i]``.
    """
    outputs: list[Tensor] = []
    fused: Tensor | None = None
    for abf, feat, size in zip(reversed(abfs), reversed(student_feats), reversed(out_sizes), strict=True):
        out, fused = abf(feat, fused, size)
        outputs.append(out)
    return outputs[::-1]


def _level_map(f: Tensor) -> Tensor:
    """A tap as a ``(B, C, H, W)`` map: maps as they are, grid tokens folded, ``(B, C)`` vectors as 1x1."""
    return f[:, :, None, None] if f.dim() == 2 else _as_map(f)


@TERMS.register(
    "reviewkd", "Chen et al. 2021: knowledge review, ABF fusion of student stages deep to shallow, HCL loss"
)
class ReviewKD(_MultiTapTerm):
    """ReviewKD: ``warmup_factor * hcl_loss(review_features(ABFs, student levels), teacher levels)``.

    Levels, shallow to deep, are pairs of taps; unset lists default to each model's ``feature_taps``
    followed, with ``embedding: true`` (default), by its ``embedding_tap``: the authors' CIFAR code
    uses the pooled feature (``(B, C)``, taken as a 1x1 map) as the deepest level. The last
    ``min(n_student, n_teacher)`` levels are paired. The student's levels must not grow in size
    from shallow to deep; the teacher's may differ from the student's (outputs are resized, nearest).

    ``mid_channels`` defaults to ``min(512, channels of the deepest student level)`` as in the code
    (64 for CIFAR ResNets, 256 for resnet8x4). The ABF modules are built in :meth:`bind` and train
    with the student. Warm-up as the authors' CIFAR code, ``min(epoch / warmup_epochs, 1)`` with
    ``epoch`` counted from 0 and fixed within the epoch: ``min(floor(epoch_progress) / warmup_epochs,
    1)``, so the term is 0 for the whole first epoch (default 20 epochs; 1 when ``warmup_epochs`` is 0).
    The code's teacher features are pre-ReLU stage outputs; the defaults here are the declared stage
    outputs (post-ReLU in the zoo), set ``teacher_taps`` to e.g. ``layer3.2.relu:input`` for the former.
    """

    def __init__(
        self,
        *,
        student_taps: list[str] | None = None,
        teacher_taps: list[str] | None = None,
        embedding: bool = True,
        mid_channels: int | None = None,
        pool_sizes: list[int] | None = None,
        warmup_epochs: float = 20,
    ) -> None:
        super().__init__(student_taps, teacher_taps)
        self.embedding = bool(embedding)
        if mid_channels is not None and (not isinstance(mid_channels, int) or mid_channels < 1):
            raise KdkitError(
                f"term 'reviewkd': mid_channels must be a positive integer, got {mid_channels!r}"
            )
        sizes = list(POOL_SIZES if pool_sizes is None else pool_sizes)
        if any(not isinstance(k, int) or k < 1 for k in sizes) or sizes != sorted(sizes, reverse=True):
            raise KdkitError(
                f"term 'reviewkd': pool_sizes must be positive integers, largest first (default [4, 2, 1]), "
                f"got {pool_sizes!r}"
            )
        if not isinstance(warmup_epochs, (int, float)) or warmup_epochs < 0:
            raise KdkitError(f"term 'reviewkd': warmup_epochs must be a number >= 0, got {warmup_epochs!r}")
        self.mid_channels = mid_channels
        self.pool_sizes = tuple(sizes)
        self.warmup_epochs = warmup_epochs
        self.abfs = nn.ModuleList()
        self.out_sizes: list[tuple[int, int]] = []
        self.teacher_dims: list[int] = []

    def _default_count(self, n_student: int, n_teacher: int) -> int:
        return min(n_student, n_teacher)

    def _declared(self, model: nn.Module | None, attr: str, role: str, arg: str):
        value = super()._declared(model, attr, role, arg)
        if attr != "feature_taps" or not self.embedding:
            return value
        embedding = getattr(model, "embedding_tap", None)
        if not embedding:
            raise KdkitError(
                f"term 'reviewkd' takes the {role}'s embedding as its deepest level, but the {role} model "
                f"declares no `embedding_tap`; set `embedding: false` or list {arg} in the config"
            )
        return (*value, embedding)

    def _level_shape(self, shape: torch.Size, role: str, key: str) -> tuple[int, int, int]:
        """``(C, H, W)`` of a tap as :func:`_level_map` sees it."""
        if len(shape) == 4:
            return shape[1], shape[2], shape[3]
        if len(shape) == 2:
            return shape[1], 1, 1
        if len(shape) == 3 and token_grid(shape[1]) is not None:
            side = token_grid(shape[1])[0]
            return shape[2], side, side
        raise KdkitError(
            f"term 'reviewkd' needs feature maps (B, C, H, W), grid tokens (B, N, C) or vectors (B, C), but "
            f"{role} tap '{key}' has shape {tuple(shape)}; pick stage outputs"
        )

    def bind(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        s_levels = [self._level_shape(student_shapes[k], "student", k) for k in self.student_keys]
        t_levels = [self._level_shape(teacher_shapes[k], "teacher", k) for k in self.teacher_keys]
        for i in range(1, len(s_levels)):
            (_, h0, w0), (_, h1, w1) = s_levels[i - 1], s_levels[i]
            if h1 > h0 or w1 > w0:
                raise KdkitError(
                    f"term 'reviewkd' reviews levels from deep to shallow, but student tap "
                    f"'{self.student_keys[i]}' ({h1}x{w1}) is larger than the tap before it, "
                    f"'{self.student_keys[i - 1]}' ({h0}x{w0}); list student_taps shallow to deep"
                )
        mid = self.mid_channels or min(512, s_levels[-1][0])
        last = len(s_levels) - 1
        self.abfs = nn.ModuleList(
            ABF(s[0], mid, t[0], fuse=i < last)
            for i, (s, t) in enumerate(zip(s_levels, t_levels, strict=True))
        )
        self.out_sizes = [(t[1], t[2]) for t in t_levels]
        self.teacher_dims = [len(teacher_shapes[k]) for k in self.teacher_keys]

    def warmup_factor(self, epoch_progress: float) -> float:
        """``min(floor(epoch_progress) / warmup_epochs, 1)``: the 0-based epoch over the warm-up."""
        if self.warmup_epochs <= 0:
            return 1.0
        return min(math.floor(epoch_progress) / self.warmup_epochs, 1.0)

    def _outputs(self, view: StepView) -> list[Tensor]:
        if len(self.abfs) != len(self.student_taps()):
            raise KdkitError("term 'reviewkd' has no ABF modules yet: call bind() with the dry run's shapes")
        student = [_level_map(view.student[k]) for k in self.student_keys]
        return review_features(list(self.abfs), student, self.out_sizes)

    def forward(self, view: StepView) -> Tensor:
        outputs = self._outputs(view)
        teacher = [_level_map(view.teacher[k]) for k in self.teacher_keys]
        loss = hcl_loss(outputs, teacher, self.pool_sizes)
        return self.warmup_factor(view.epoch_progress) * loss

    def teacher_space_taps(self) -> list[str]:
        """The teacher levels that are feature maps (the fused student level has their shape)."""
        return [k for k, d in zip(self.teacher_keys, self.teacher_dims, strict=True) if d == 4]

    def teacher_space(self, view: StepView) -> dict[str, Tensor]:
        keys = set(self.teacher_space_taps())
        return {k: out for k, out in zip(self.teacher_keys, self._outputs(view), strict=True) if k in keys}
