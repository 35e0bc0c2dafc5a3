"""Detection terms: det (the student's own losses), mimic, pkd and dense_kd.

Expected values are worked out by hand in the comments; the terms run on fake output dicts and tap
tensors, and once end to end through the Distiller on two tiny dense detectors.
"""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import torchvision
from _tensors import rand64, t64
from torch import nn
from torch.autograd import gradcheck

from kdkit.engine.distiller import Distiller, WeightedTerm
from kdkit.errors import KdkitError
from kdkit.registry import TERMS
from kdkit.terms import (
    LOGITS,
    PKD,
    DenseKD,
    Det,
    Mimic,
    StepView,
    binary_kd_loss,
    dense_box_loss,
    mimic_loss,
    pearson_correlation,
    pkd_loss,
    pkd_normalize,
    softmax_kd_loss,
    teacher_confidence,
)

LN = math.log


def num(x) -> float:
    return x.detach().item() if isinstance(x, torch.Tensor) else float(x)


def close(actual, expected, tol: float = 1e-9) -> None:
    assert abs(num(actual) - num(expected)) < tol, (num(actual), num(expected))


def fpn(taps: list[str], strides: list[int], **extra) -> SimpleNamespace:
    """A stand-in model that only declares its FPN levels."""
    return SimpleNamespace(feature_taps=taps, feature_strides=strides, **extra)


# ------------------------------------------------------------------------------------ det


class FakeDetector(nn.Module):
    """``losses``: classification = w * sum(out), bbox_regression = 3 w (+ 0 * targets)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
        self.seen = None

    def losses(self, outputs, targets):
        self.seen = (outputs, targets)
        return {
            "classification": self.w * outputs["out"].sum(),
            "bbox_regression": 3.0 * self.w + 0.0 * targets[..., :4].sum(),
        }


def test_det_sums_the_student_losses_and_logs_each():
    # out sums to 3 -> classification 2 * 3 = 6; bbox_regression 3 * 2 = 6; total 12.
    student = FakeDetector()
    term = Det()
    assert term.needs_labels and not term.needs_teacher and term.student_taps() == []
    term.resolve_taps(student, None)
    outputs = {"out": t64([[[1.0, 2.0]]])}
    targets = t64([[[0.0, 0.0, 4.0, 4.0, 1.0], [0.0, 0.0, 0.0, 0.0, -1.0]]])
    loss = term(StepView(student={}, labels=targets, student_output=outputs))
    close(loss, 12.0)
    assert student.seen[0] is outputs and student.seen[1] is targets
    assert {k: num(v) for k, v in term.stats().items()} == {"classification": 6.0, "bbox_regression": 6.0}
    loss.backward()
    close(student.w.grad, 3.0 + 3.0)
    # the detector is referenced, not owned: no parameters, no state, no submodule
    assert list(term.parameters()) == [] and term.state_dict() == {} and list(term.children()) == []


def test_det_errors_name_the_problem():
    with pytest.raises(KdkitError, match=r"term 'det' needs a detector student with `losses"):
        Det().resolve_taps(nn.Linear(2, 2), None)
    with pytest.raises(KdkitError, match=r"term 'det' has no detector yet"):
        Det()(StepView(student={}, labels=torch.zeros(1, 1, 5), student_output={"out": torch.zeros(1)}))
    term = Det()
    term.resolve_taps(FakeDetector(), None)
    with pytest.raises(KdkitError, match=r"student_output.*has NoneType; use it with task: detection"):
        term(StepView(student={}, labels=torch.zeros(1, 1, 5)))
    with pytest.raises(KdkitError, match=r"term 'det' needs labels"):
        term(StepView(student={}, student_output={"out": torch.zeros(1)}))


# ------------------------------------------------------------------------------------ pairing


def test_levels_pair_by_stride_and_levels_selects():
    student = fpn(["s.p3", "s.p4", "s.p5"], [8, 16, 32])
    teacher = fpn(["t.p2", "t.p3", "t.p4", "t.p5", "t.p6"], [4, 8, 16, 32, 64])
    term = Mimic()
    term.resolve_taps(student, teacher)
    assert term.student_taps() == ["s.p3", "s.p4", "s.p5"]
    assert term.teacher_taps() == ["t.p3", "t.p4", "t.p5"]
    assert term.strides == [8, 16, 32]
    picked = PKD(levels=[32, 8])
    picked.resolve_taps(student, teacher)  # shallow to deep, whatever the order of `levels`
    assert (picked.student_taps(), picked.teacher_taps()) == (["s.p3", "s.p5"], ["t.p3", "t.p5"])
    partial = Mimic()
    partial.resolve_taps(fpn(["a", "b"], [16, 128]), teacher)  # 128: the teacher has none, skipped
    assert (partial.student_taps(), partial.teacher_taps()) == (["a"], ["t.p4"])
    # a stride with several levels (torchvision's MobileNetV3 FPN: two at 32): the deepest pair first
    twice = Mimic()
    twice.resolve_taps(fpn(["a", "b", "c"], [16, 32, 64]), fpn(["t32a", "t32b", "t64"], [32, 32, 64]))
    assert (twice.student_taps(), twice.teacher_taps()) == (["b", "c"], ["t32b", "t64"])
    both = Mimic()
    both.resolve_taps(fpn(["s32a", "s32b"], [32, 32]), fpn(["t32a", "t32b", "t64"], [32, 32, 64]))
    assert (both.student_taps(), both.teacher_taps()) == (["s32a", "s32b"], ["t32a", "t32b"])
    assert both._level_names() == ["stride32_0", "stride32_1"]
    explicit = PKD(student_taps=["x"], teacher_taps=["y"])
    explicit.resolve_taps(nn.Identity(), nn.Identity())  # explicit pairs need no declared levels
    assert (explicit.student_taps(), explicit.teacher_taps()) == (["x"], ["y"])
    for cls in (Mimic, PKD):  # one constructor (in _LevelTerm), the same config keys
        assert list(inspect.signature(cls).parameters) == ["student_taps", "teacher_taps", "levels"]


def test_level_pairing_errors():
    teacher = fpn(["t.p3", "t.p4"], [8, 16])
    with pytest.raises(KdkitError, match=r"'mimic'.*\[32, 64\] and the teacher's \[8, 16\] share none"):
        Mimic().resolve_taps(fpn(["a", "b"], [32, 64]), teacher)
    with pytest.raises(KdkitError, match=r"'pkd' levels \[32\] are not strides of both.*from \[8, 16\]"):
        PKD(levels=[32]).resolve_taps(fpn(["a", "b", "c"], [8, 16, 32]), teacher)
    with pytest.raises(KdkitError, match=r"'mimic'.*student model declares 2 feature_taps with.* \[8\]"):
        Mimic().resolve_taps(fpn(["a", "b"], [8]), teacher)
    with pytest.raises(KdkitError, match=r"term 'pkd' needs `teacher_taps`.*no `feature_taps`"):
        PKD().resolve_taps(fpn(["a"], [8]), nn.Identity())
    with pytest.raises(KdkitError, match=r"term 'mimic' pairs student_taps with teacher_taps.*set both"):
        Mimic(student_taps=["a"])
    with pytest.raises(KdkitError, match=r"term 'pkd' pairs .* but got 2 and 1 taps"):
        PKD(student_taps=["a", "b"], teacher_taps=["c"])
    with pytest.raises(KdkitError, match=r"'pkd' levels are FPN strides shared by both models.*got \['p3'\]"):
        PKD(levels=["p3"])
    single = Mimic(levels=16)  # one stride given as a plain number
    single.resolve_taps(fpn(["a", "b"], [8, 16]), teacher)
    assert single.student_taps() == ["b"]
    with pytest.raises(KdkitError, match=r"`levels` picks strides"):
        Mimic(student_taps=["a"], teacher_taps=["b"], levels=[8])
    term = Mimic(student_taps=["a"], teacher_taps=["b"])
    with pytest.raises(KdkitError, match=r"term 'mimic' needs FPN maps.*teacher tap 'b' has shape \(2, 5\)"):
        term.bind({"a": torch.Size([2, 4, 3, 3])}, {"b": torch.Size([2, 5])})


# ------------------------------------------------------------------------------------ mimic


def test_mimic_loss_hand_value_and_gradcheck():
    # level 1: [1, 2] vs [1, 4] -> MSE (0 + 4) / 2 = 2; level 2: [3] vs [0] -> 9; mean over levels 5.5.
    s = [t64([[[[1.0, 2.0]]]]), t64([[[[3.0]]]])]
    t = [t64([[[[1.0, 4.0]]]]), t64([[[[0.0]]]])]
    close(mimic_loss(s, t), 5.5)
    a, b = rand64(2, 3, 2, 2), rand64(2, 3, 1, 2, seed=1)
    ta, tb = torch.randn_like(a), torch.randn_like(b)
    assert gradcheck(lambda x, y: mimic_loss([x, y], [ta, tb]), (a, b))


def test_mimic_term_connects_channels_and_resizes_to_the_teacher_grid():
    student = fpn(["s8", "s16"], [8, 16])
    teacher = fpn(["t8", "t16"], [8, 16])
    term = Mimic()
    term.resolve_taps(student, teacher)
    term.bind(
        {"s8": torch.Size([2, 2, 4, 4]), "s16": torch.Size([2, 3, 2, 2])},
        {"t8": torch.Size([2, 3, 4, 4]), "t16": torch.Size([2, 3, 2, 2])},
    )
    conv = term.connectors[0][0]
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.in_channels == 2
    assert isinstance(term.connectors[1], nn.Identity)  # same channels: no connector
    torch.manual_seed(0)
    view = StepView(
        student={"s8": torch.randn(2, 2, 4, 4), "s16": torch.randn(2, 3, 2, 2)},
        teacher={"t8": torch.randn(2, 3, 4, 4), "t16": torch.randn(2, 3, 2, 2)},
    )
    loss = term(view)
    level8 = F.mse_loss(term.connectors[0](view.student["s8"]), view.teacher["t8"])
    level16 = F.mse_loss(view.student["s16"], view.teacher["t16"])
    close(loss, (level8 + level16) / 2, 1e-6)
    assert set(term.stats()) == {"stride8", "stride16"}
    close(term.stats()["stride16"], level16, 1e-6)
    # explicit taps across grids: the student's 1x2 map is resized bilinearly to the teacher's 1x4:
    # [0, 4] -> [0, 1, 3, 4] (align_corners=False); against zeros the MSE is (0 + 1 + 9 + 16) / 4 = 6.5
    cross = Mimic(student_taps=["a"], teacher_taps=["b"])
    cross.bind({"a": torch.Size([1, 1, 1, 2])}, {"b": torch.Size([1, 1, 1, 4])})
    assert isinstance(cross.connectors[0], nn.Identity)
    close(cross(StepView(student={"a": t64([[[[0.0, 4.0]]]])}, teacher={"b": torch.zeros(1, 1, 1, 4)})), 6.5)


# ------------------------------------------------------------------------------------ pkd


def test_pkd_normalize_per_channel_over_batch_and_positions():
    # one channel, values 1 (image 0) and 3 (image 1): mean 2, population std 1 -> [-1, 1]
    # (a per-image normalisation would map each single value to 0)
    f = t64([[[[1.0]]], [[[3.0]]]])
    assert torch.allclose(pkd_normalize(f), t64([[[[-1.0]]], [[[1.0]]]]))
    # a constant channel becomes 0 instead of NaN
    assert torch.equal(pkd_normalize(torch.full((2, 1, 2, 2), 5.0)), torch.zeros(2, 1, 2, 2))


def test_pkd_loss_hand_value_equals_one_minus_pearson():
    # channel 0: s = [1, 2, 3], t = [1, 3, 2]: centred [-1, 0, 1] and [-1, 1, 0], r = 1 / 2, 1 - r = 1/2.
    #   normalised (population std sqrt(2/3)): sqrt(3/2) [-1, 0, 1] and sqrt(3/2) [-1, 1, 0];
    #   squared differences 3/2 * (0 + 1 + 1) = 3.
    # channel 1: s = [1, 2, 3], t = [3, 2, 1]: r = -1, 1 - r = 2; squared differences 3/2 * (4 + 0 + 4) = 12.
    # Eq. 3: (3 + 12) / (2 * 6) = 1.25 = mean over channels of 1 - r = (1/2 + 2) / 2.
    s = t64([[[[1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0]]]])
    t = t64([[[[1.0, 3.0, 2.0]], [[3.0, 2.0, 1.0]]]])
    close(pkd_loss([s], [t]), 1.25)
    # a second level [0, 1] vs [1, 0] (r = -1, loss 2) adds up: levels are summed
    close(pkd_loss([s, t64([[[[0.0, 1.0]]]])], [t, t64([[[[1.0, 0.0]]]])]), 3.25)
    # random maps: the mean over channels of 1 - Pearson r over (batch, positions)
    a, b = rand64(2, 3, 4, 5), rand64(2, 3, 4, 5, seed=1)
    rows = lambda f: f.detach().transpose(0, 1).reshape(3, -1)  # noqa: E731
    close(pkd_loss([a], [b]), (1 - pearson_correlation(rows(a), rows(b))).mean(), 1e-12)
    # invariant to a positive scale and a shift per channel
    scale, shift = t64([0.5, 2.0, 7.0]).view(1, 3, 1, 1), t64([-3.0, 0.0, 10.0]).view(1, 3, 1, 1)
    close(pkd_loss([a * scale + shift], [b]), pkd_loss([a], [b]), 1e-12)
    assert gradcheck(lambda x, y: pkd_loss([x], [y]), (a, b))


def test_pkd_term_sums_levels_and_logs_one_minus_r():
    term = PKD()
    term.resolve_taps(fpn(["s8", "s16"], [8, 16]), fpn(["t8", "t16"], [8, 16]))
    term.bind(
        {"s8": torch.Size([1, 2, 1, 3]), "s16": torch.Size([1, 1, 1, 2])},
        {"t8": torch.Size([1, 2, 1, 3]), "t16": torch.Size([1, 1, 1, 2])},
    )
    view = StepView(
        student={"s8": t64([[[[1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0]]]]), "s16": t64([[[[0.0, 1.0]]]])},
        teacher={"t8": t64([[[[1.0, 3.0, 2.0]], [[3.0, 2.0, 1.0]]]]), "t16": t64([[[[1.0, 0.0]]]])},
    )
    close(term(view), 3.25)
    assert {k: num(v) for k, v in term.stats().items()} == pytest.approx({"stride8": 1.25, "stride16": 2.0})


# ------------------------------------------------------------------------------------ dense_kd

# Two anchors, two classes. Teacher logits [ln3, 0] (p = 3/4, 1/2) and [-ln3, -ln3] (1/4, 1/4);
# student [ln3, ln3] (3/4, 3/4) and [0, -ln3] (1/2, 1/4).
# Anchor 1: class 0 agrees; class 1 KL(1/2 || 3/4) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3).
# Anchor 2: class 0 KL(1/4 || 1/2) = 1/4 ln(1/2) + 3/4 ln(3/2); class 1 agrees.
# Teacher confidence (max score): 3/4 and 1/4.
Z_T = [[[LN(3), 0.0], [-LN(3), -LN(3)]]]
Z_S = [[[LN(3), LN(3)], [0.0, -LN(3)]]]
L1 = 0.5 * LN(4 / 3)
L2 = 0.25 * LN(0.5) + 0.75 * LN(1.5)


def test_binary_kd_loss_hand_values():
    zs, zt = t64(Z_S), t64(Z_T)
    close(binary_kd_loss(zs, zt), (L1 + L2) / 2)
    assert torch.allclose(teacher_confidence(zt), t64([[0.75, 0.25]]))
    close(binary_kd_loss(zs, zt, weight=teacher_confidence(zt)), 0.75 * L1 + 0.25 * L2)  # weights sum to 1
    # T = 2 on doubled logits: the same probabilities, times T^2 = 4
    close(binary_kd_loss(2 * zs, 2 * zt, temperature=2.0), 4 * (L1 + L2) / 2)
    close(binary_kd_loss(zt, zt), 0.0)


def test_binary_kd_loss_has_the_gradient_of_bce_with_soft_targets_and_gradchecks():
    # at T = 1, KL = BCE(z_s, sigmoid(z_t)) - H(sigmoid(z_t)): same gradient as BCKD's unmodulated loss
    zs, zt = rand64(2, 5, 3), rand64(2, 5, 3, seed=1).detach()
    (g_kd,) = torch.autograd.grad(binary_kd_loss(zs, zt), zs)
    bce = F.binary_cross_entropy_with_logits(zs, zt.sigmoid(), reduction="none").sum(-1).mean()
    (g_bce,) = torch.autograd.grad(bce, zs)
    assert torch.allclose(g_kd, g_bce, atol=1e-12)
    weight = torch.rand(2, 5, dtype=torch.float64)
    assert gradcheck(lambda z: binary_kd_loss(z, zt, 3.0, weight), (zs,))


def test_dense_box_loss_hand_values_and_gradcheck():
    # L1: anchor 1 |[1,2,3,4] - [0,2,5,4]| = 1 + 0 + 2 + 0 = 3, anchor 2 |[4,4,4,4] - [2,2,2,2]| = 8;
    # weights 3/4 and 1/4: (3/4 * 3 + 1/4 * 8) / 1 = 4.25; weight 0 drops an anchor.
    s = t64([[[1.0, 2.0, 3.0, 4.0], [4.0, 4.0, 4.0, 4.0]]])
    t = t64([[[0.0, 2.0, 5.0, 4.0], [2.0, 2.0, 2.0, 2.0]]])
    close(dense_box_loss(s, t, t64([[0.75, 0.25]])), 4.25)
    close(dense_box_loss(s, t, t64([[1.0, 0.0]])), 3.0)
    # GIoU: [0,0,2,2] vs [1,0,3,2]: inter 2, union 6, hull 6 -> GIoU 1/3, loss 2/3;
    # [0,0,1,1] vs [2,0,3,1]: inter 0, union 2, hull 3 -> GIoU -1/3, loss 4/3; mean 1.
    bs = t64([[[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]]])
    bt = t64([[[1.0, 0.0, 3.0, 2.0], [2.0, 0.0, 3.0, 1.0]]])
    close(dense_box_loss(bs, bt, t64([[1.0, 1.0]]), "giou"), 1.0, 1e-6)
    # no anchor selected: 0, still attached to the student's graph
    none = dense_box_loss(s.clone().requires_grad_(), t, torch.zeros(1, 2, dtype=torch.float64))
    assert num(none) == 0.0 and none.requires_grad
    weight = t64([[0.5, 2.0]])
    assert gradcheck(lambda x: dense_box_loss(x, t, weight), (rand64(1, 2, 4),))
    boxes = (bs + 0.1 * torch.rand(1, 2, 4, dtype=torch.float64)).requires_grad_()
    assert gradcheck(lambda x: dense_box_loss(x, bt, weight, "giou"), (boxes,))


def dense_outputs(z, box):
    return {"out": t64(z), "box": t64(box), "image_size": torch.tensor([8, 8])}


def test_dense_kd_term_cls_box_and_stats():
    s_out = dense_outputs(Z_S, [[[1.0, 2.0, 3.0, 4.0], [9.0, 9.0, 9.0, 9.0]]])
    t_out = dense_outputs(Z_T, [[[0.0, 2.0, 5.0, 4.0], [0.0, 0.0, 0.0, 0.0]]])
    view = StepView(student={}, student_output=s_out, teacher_output=t_out)
    close(DenseKD()(view), (L1 + L2) / 2)
    # box on anchors with teacher confidence >= 0.5: anchor 1 only, L1 = 3; weight 2 on the box term
    term = DenseKD(box="l1", box_weight=2.0)
    close(term(view), (L1 + L2) / 2 + 2 * 3.0)
    assert {k: num(v) for k, v in term.stats().items()} == pytest.approx(
        {"cls": (L1 + L2) / 2, "box": 3.0, "confident": 0.5}
    )
    weighted = DenseKD(box="l1", score_weighted=True, score_thresh=0.9)  # no anchor that confident
    close(weighted(view), 0.75 * L1 + 0.25 * L2)
    assert num(weighted.stats()["confident"]) == 0.0
    # float64 gradient check through the term, with respect to the student's logits and boxes
    z, b = rand64(1, 2, 2), rand64(1, 2, 4, seed=1)
    full = DenseKD(box="l1", score_weighted=True, score_thresh=0.0, temperature=2.0)

    def through_term(z, b):
        return full(StepView(student={}, student_output={"out": z, "box": b}, teacher_output=t_out))

    assert gradcheck(through_term, (z, b))


def test_softmax_heads_take_per_anchor_kd_over_background_and_classes():
    # SSD-like heads: "bg" [B, A, 1] + "out" [B, A, C]. Teacher [bg, out] = [0, 0] (p = 1/2, 1/2) and
    # [0, ln3] (1/4, 3/4); student [0, ln3] on both anchors. Anchor 1: KL = 1/2 ln 2 + 1/2 ln(2/3)
    # = 1/2 ln(4/3); anchor 2: 0. Mean 1/4 ln(4/3). Teacher confidence (largest foreground
    # probability) 1/2 and 3/4: score-weighted (1/2 * 1/2 ln(4/3)) / (5/4) = 1/5 ln(4/3).
    t_out = {"out": t64([[[0.0], [LN(3)]]]), "bg": t64([[[0.0], [0.0]]])}
    s_out = {"out": t64([[[LN(3)], [LN(3)]]]), "bg": t64([[[0.0], [0.0]]])}
    assert torch.allclose(teacher_confidence(t_out["out"], t_out["bg"]), t64([[0.5, 0.75]]))
    close(softmax_kd_loss(t64([[[0.0, LN(3)]]]), t64([[[0.0, 0.0]]])), 0.5 * LN(4 / 3))
    view = StepView(student={}, student_output=s_out, teacher_output=t_out)
    close(DenseKD()(view), 0.25 * LN(4 / 3))
    close(DenseKD(score_weighted=True)(view), 0.2 * LN(4 / 3))
    # T = 2 on doubled logits: the same distributions, times T^2
    doubled = {k: 2 * v for k, v in s_out.items()}, {k: 2 * v for k, v in t_out.items()}
    close(
        DenseKD(temperature=2.0)(StepView({}, student_output=doubled[0], teacher_output=doubled[1])),
        LN(4 / 3),
    )
    with pytest.raises(KdkitError, match=r"one detector has a softmax head.*use mimic or pkd"):
        DenseKD()(StepView(student={}, student_output={"out": s_out["out"]}, teacher_output=t_out))
    weight, teacher = torch.rand(2, 3, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    assert gradcheck(lambda z: softmax_kd_loss(z, teacher, 2.0, weight), (rand64(2, 3, 4),))


class Decoder:
    """Decodes ``box`` as offsets added to fixed anchors ``[0, 0, 2, 2]`` (a stand-in for a box coder)."""

    dense = True

    def decode_boxes(self, outputs):
        return outputs["box"] + torch.tensor([0.0, 0.0, 2.0, 2.0], dtype=outputs["box"].dtype)


def test_dense_kd_giou_decodes_both_sides():
    # decoded student [0,0,2,2], teacher [1,0,3,2]: GIoU loss 2/3 on the one confident anchor (score 3/4)
    s_out = dense_outputs(Z_S, [[[0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]]])
    t_out = dense_outputs(Z_T, [[[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    term = DenseKD(box="giou")
    term.resolve_taps(Decoder(), Decoder())
    loss = term(StepView(student={}, student_output=s_out, teacher_output=t_out))
    close(loss, (L1 + L2) / 2 + 2 / 3, 1e-6)


def test_dense_kd_errors_name_the_way_out():
    shapes = {LOGITS: torch.Size([2, 20, 3])}
    anchors = r"the pair has different anchors \(student 20 per image, teacher 24\); use mimic or pkd"
    with pytest.raises(KdkitError, match=anchors):
        DenseKD().bind(shapes, {LOGITS: torch.Size([2, 24, 3])})
    with pytest.raises(KdkitError, match=r"different classes \(3 vs 5\)"):
        DenseKD().bind(shapes, {LOGITS: torch.Size([2, 20, 5])})
    with pytest.raises(KdkitError, match=r"needs per-anchor class logits \[B, A, C\].*use mimic or pkd"):
        DenseKD().bind(shapes, {LOGITS: torch.Size([2, 20, 3, 3])})
    view = StepView(
        student={},
        student_output=dense_outputs([[[0.0]]], [[[0.0] * 4]]),
        teacher_output=dense_outputs([[[0.0], [0.0]]], [[[0.0] * 4] * 2]),
    )
    with pytest.raises(KdkitError, match=r"different anchors \(student 1 per image, teacher 2\)"):
        DenseKD()(view)
    with pytest.raises(KdkitError, match=r"teacher SimpleNamespace is not a dense detector; use mimic"):
        DenseKD().resolve_taps(SimpleNamespace(dense=True), SimpleNamespace(dense=False))
    with pytest.raises(KdkitError, match=r"box: giou needs decoded boxes.*student FakeDetector.*use box: l1"):
        DenseKD(box="giou").resolve_taps(FakeDetector(), Decoder())
    with pytest.raises(KdkitError, match=r"box must be one of l1, giou or unset, got 'iou'"):
        DenseKD(box="iou")
    with pytest.raises(KdkitError, match=r"temperature must be > 0, got 0"):
        DenseKD(temperature=0)
    with pytest.raises(KdkitError, match=r"StepView.teacher_output"):
        DenseKD()(StepView(student={}, student_output=view.student_output))


# ------------------------------------------------------------------------------------ end to end


class TinyDetector(nn.Module):
    """A dense detector in miniature: square levels of ``width`` channels at ``strides`` (4, 8, ...),
    each routed through ``levels.p<log2 stride>``; one point per position; shared 1x1 heads.

    ``losses``: a point is positive for class c when its centre lies inside a valid box of class c;
    BCE over all points and classes (classification) and, on positive points, L1 between the decoded
    ``softplus(box) * stride`` distances and the distances to the box's sides (bbox_regression).
    """

    dense = True

    def __init__(self, width: int, strides: tuple[int, ...], num_classes: int = 3) -> None:
        super().__init__()
        self.strides = strides
        convs = [nn.Conv2d(3, width, strides[0], strides[0])]
        convs += [nn.Conv2d(width, width, 2, 2) for _ in strides[1:]]
        self.body = nn.ModuleList(convs)
        self.levels = nn.ModuleDict({f"p{int(math.log2(s))}": nn.Identity() for s in strides})
        self.cls_head = nn.Conv2d(width, num_classes, 1)
        self.box_head = nn.Conv2d(width, 4, 1)
        self.feature_taps = [f"levels.p{int(math.log2(s))}" for s in strides]
        self.feature_strides = list(strides)

    def forward(self, x):
        outs, boxes = [], []
        for conv, level in zip(self.body, self.levels.values()):
            x = level(torch.relu(conv(x)))
            outs.append(self.cls_head(x).flatten(2).transpose(1, 2))
            boxes.append(self.box_head(x).flatten(2).transpose(1, 2))
        size = torch.tensor(x.shape[-2:]) * self.strides[-1]
        return {"out": torch.cat(outs, 1), "box": torch.cat(boxes, 1), "image_size": size}

    def _points(self, size):
        points, strides = [], []
        for s in self.strides:
            n = int(size[0]) // s
            ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
            points.append(torch.stack([xs, ys], -1).reshape(-1, 2) * s + s / 2)
            strides.append(torch.full((n * n,), float(s)))
        return torch.cat(points), torch.cat(strides)

    def decode_boxes(self, outputs):
        points, strides = self._points(outputs["image_size"])
        ltrb = F.softplus(outputs["box"]) * strides[:, None]
        return torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], -1)

    def losses(self, outputs, targets):
        points, strides = self._points(outputs["image_size"])
        logits = outputs["out"]
        cls_target = torch.zeros_like(logits)
        box_error = []
        decoded = self.decode_boxes(outputs)
        for b, image in enumerate(targets):
            for x1, y1, x2, y2, c in image[image[:, 4] >= 0].tolist():
                inside = (points[:, 0] > x1) & (points[:, 0] < x2) & (points[:, 1] > y1) & (points[:, 1] < y2)
                cls_target[b, inside, int(c)] = 1.0
                box = torch.tensor([x1, y1, x2, y2])
                box_error.append((decoded[b, inside] - box).abs().sum(-1) / strides[inside])
        cls = F.binary_cross_entropy_with_logits(logits, cls_target)
        errors = torch.cat(box_error) if box_error else decoded.new_zeros(0)
        box = errors.mean() if len(errors) else decoded.sum() * 0.0
        return {"classification": cls, "bbox_regression": box}


def detector_pair(teacher_strides=(4, 8)) -> tuple[TinyDetector, TinyDetector]:
    torch.manual_seed(0)
    return TinyDetector(4, (4, 8)), TinyDetector(8, teacher_strides)


def batch():
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 16, 16, generator=gen)
    targets = torch.tensor(
        [
            [[1.0, 1.0, 9.0, 9.0, 0.0], [8.0, 4.0, 16.0, 12.0, 2.0]],
            [[0.0, 8.0, 7.0, 16.0, 1.0], [0.0, 0.0, 0.0, 0.0, -1.0]],
            [[0.0, 0.0, 0.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0, -1.0]],  # an image without boxes
        ]
    )
    return images, targets


def test_all_detection_terms_train_through_the_distiller():
    student, teacher = detector_pair()
    terms = [
        WeightedTerm("det", 1.0, Det()),
        WeightedTerm("mimic", 2.0, Mimic()),
        WeightedTerm("pkd", 1.0, PKD(levels=[8])),
        WeightedTerm("dense_kd", 1.0, DenseKD(box="giou", score_thresh=0.0, score_weighted=True)),
    ]
    distiller = Distiller(student, teacher, [terms])
    images, targets = batch()
    distiller.setup(images[:2])
    distiller.train()
    total, parts, logits = distiller(images, targets)
    assert logits.shape == (3, 16 + 4, 3)
    expected_keys = {
        "det", "det/classification", "det/bbox_regression", "mimic", "mimic/stride4", "mimic/stride8",
        "pkd", "pkd/stride8", "dense_kd", "dense_kd/cls", "dense_kd/box", "dense_kd/confident",
    }  # fmt: skip
    assert set(parts) == expected_keys
    close(parts["det"], parts["det/classification"] + parts["det/bbox_regression"], 1e-6)
    close(total, parts["det"] + 2 * parts["mimic"] + parts["pkd"] + parts["dense_kd"], 1e-5)
    # the det term saw the student's own outputs and the targets
    direct = student.losses(student(images), targets)
    close(parts["det/classification"], direct["classification"], 1e-6)
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    connectors = [p for name, p in distiller.terms.named_parameters() if "connectors" in name]
    assert connectors and all(p.grad is not None for p in connectors)  # 4 -> 8 channels: 1x1 conv + BN
    # the det and dense_kd terms keep the detectors by reference only
    assert not any(k.startswith(("terms.s0_0_det", "terms.s0_3_dense_kd")) for k in distiller.state_dict())


def test_dense_kd_refuses_a_pair_with_other_anchors_at_setup():
    student, teacher = detector_pair(teacher_strides=(4, 8, 16))
    distiller = Distiller(student, teacher, [[WeightedTerm("dense_kd", 1.0, DenseKD())]])
    with pytest.raises(KdkitError, match=r"different anchors \(student 20 per image, teacher 21\)"):
        distiller.setup(batch()[0][:2])
    # the feature terms pair the shared strides (4 and 8) and skip the teacher's 16
    distiller = Distiller(student, teacher, [[WeightedTerm("pkd", 1.0, PKD())]])
    distiller.setup(batch()[0][:2])
    assert distiller.terms["s0_0_pkd"].teacher_taps() == ["levels.p2", "levels.p3"]


DETECTION_TERMS = [
    n
    for n in TERMS.names()
    if TERMS.get(n).__module__ in ("kdkit.terms.detection", "kdkit.terms.dense_kd", "kdkit.terms.fgd")
]


@pytest.mark.parametrize("name", DETECTION_TERMS)
def test_every_detection_term_trains_with_its_defaults(name):
    student, teacher = detector_pair()
    term = TERMS.build(name)
    distiller = Distiller(student, teacher, [[WeightedTerm(name, 1.0, term)]])
    images, targets = batch()
    distiller.setup(images[:2])
    distiller.train()
    total, _, _ = distiller(images, targets)
    assert total.dim() == 0 and torch.isfinite(total) and total.item() > 0
    total.backward()
    for param_name, param in term.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


# ------------------------------------------------------------------------------------ box: giou on the zoo


def compact_pair() -> tuple[nn.Module, nn.Module]:
    """The zoo's compact FCOS student and teacher (decode_boxes through torchvision's box coder)."""
    from kdkit.models import build_model

    torch.manual_seed(0)
    return tuple(build_model(f"det_compact_{role}", num_classes=3) for role in ("student", "teacher"))


@pytest.mark.usefixtures("one_thread")  # see conftest.py
def test_dense_kd_giou_on_the_compact_pair_sends_gradients_to_the_confident_student_boxes():
    student, teacher = compact_pair()
    x = torch.randn(2, 3, 64, 96)
    s_out = student(x)
    with torch.no_grad():
        t_out = teacher(x)
    confidence = teacher_confidence(t_out["out"])
    thresh = confidence.median().item()
    term = DenseKD(box="giou", score_thresh=thresh)
    term.resolve_taps(student, teacher)
    loss = term(StepView(student={}, student_output=s_out, teacher_output=t_out))
    # the box part is the mean 1 - GIoU between the decoded boxes on the anchors the teacher is sure of
    keep = confidence >= thresh
    s_boxes, t_boxes = student.decode_boxes(s_out), teacher.decode_boxes(t_out)
    expected = torchvision.ops.generalized_box_iou_loss(s_boxes[keep], t_boxes[keep]).mean()
    close(term.stats()["box"], expected, 1e-6)
    close(term.stats()["confident"], keep.float().mean(), 1e-6)
    close(loss, term.stats()["cls"] + expected, 1e-6)
    (grad,) = torch.autograd.grad(loss, s_out["box"], retain_graph=True)
    assert torch.isfinite(grad).all()
    assert (grad[~keep] == 0).all()  # anchors below the threshold take no box gradient
    reached = grad[keep].abs().sum(-1) > 0
    assert reached.float().mean() > 0.8  # the others: coordinates clipped at the image border
    # the teacher's decoded boxes are targets only
    assert not t_boxes.requires_grad


@pytest.mark.usefixtures("one_thread")  # see conftest.py
def test_the_compact_pair_trains_a_step_with_dense_kd_giou():
    student, teacher = compact_pair()
    # the config entries {name: det} and {name: dense_kd, box: giou, score_thresh: 0.0}; the threshold
    # takes every anchor (a fresh focal-loss teacher scores about 0.01, below the default 0.5)
    configs = [{"name": "det"}, {"name": "dense_kd", "box": "giou", "score_thresh": 0.0}]
    terms = [WeightedTerm(c["name"], 1.0, TERMS.build(c.pop("name"), **c)) for c in configs]
    distiller = Distiller(student, teacher, [terms])
    images = torch.randn(2, 3, 64, 96)
    targets = torch.tensor([[[4.0, 6.0, 30.0, 40.0, 0.0]], [[40.0, 8.0, 90.0, 60.0, 2.0]]])
    distiller.setup(images[:1])
    distiller.train()
    total, parts, _ = distiller(images, targets)
    assert parts["dense_kd/confident"].item() == 1.0 and parts["dense_kd/box"].item() > 0
    close(parts["dense_kd"], parts["dense_kd/cls"] + parts["dense_kd/box"], 1e-6)
    total.backward()
    head = student.head.regression_head.bbox_reg
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    before = parts["dense_kd/box"].item()
    torch.optim.SGD(student.parameters(), lr=0.01).step()
    _, after, _ = distiller(images, targets)
    assert torch.isfinite(after["dense_kd"]) and after["dense_kd/box"].item() != before
