"""Dense-prediction terms: ce on masks, pixel-wise kd, cwd, I2CKD prototypes and triplet, Spirit.

Expected values are worked out by hand in the comments on tensors of a few pixels.
"""

from __future__ import annotations

import math

import pytest
import torch
from _tensors import rand64, t64
from torch import nn
from torch.autograd import gradcheck

from kdkit.errors import KdkitError
from kdkit.terms import (
    CE,
    CWD,
    I2CKD,
    LOGITS,
    Spirit,
    StepView,
    ce_loss,
    cwd_loss,
    i2ckd_loss,
    i2ckd_prototypes,
    kd_loss,
    spirit_loss,
)

LN = math.log


def num(x) -> float:
    return x.detach().item() if isinstance(x, torch.Tensor) else float(x)


def close(actual, expected, tol: float = 1e-9) -> None:
    assert abs(num(actual) - num(expected)) < tol, (num(actual), num(expected))


def maps(*channels) -> torch.Tensor:
    """One image ``(1, C, 1, W)`` from per-channel rows."""
    return t64([[[list(row)] for row in channels]])


# ------------------------------------------------------------------------------------ ce, dense


def test_ce_dense_skips_ignore_index_hand_value():
    # 2 classes on a 2x2 image; logits z0 = 0, z1 = [[0, ln3], [ln3, 5]]; mask [[0, 1], [0, 255]].
    # (0,0): p = [1/2, 1/2], y = 0 -> ln 2. (0,1): p1 = 3/4, y = 1 -> ln(4/3).
    # (1,0): p0 = 1/4, y = 0 -> ln 4. (1,1) ignored. Mean over 3 labelled pixels: ln(32/3) / 3.
    logits = t64([[[[0.0, 0.0], [0.0, 0.0]], [[0.0, LN(3)], [LN(3), 5.0]]]])
    mask = torch.tensor([[[0, 1], [0, 255]]])
    close(ce_loss(logits, mask), LN(32 / 3) / 3)
    close(CE()(StepView(student={LOGITS: logits}, labels=mask)), LN(32 / 3) / 3)
    everything_ignored = torch.full_like(mask, 255)
    loss = ce_loss(logits.clone().requires_grad_(), everything_ignored)
    assert num(loss) == 0.0  # not NaN
    assert gradcheck(lambda z: ce_loss(z, mask, 0.1), (rand64(1, 2, 2, 2),))


def test_ce_dense_upsamples_logits_bilinearly_to_the_mask():
    # Logits 1x2 -> mask 1x4. Bilinear, align_corners=False, 2 -> 4 columns: source x = (i + 1/2) / 2 - 1/2
    # = -1/4, 1/4, 3/4, 5/4, clamped to [0, 1] -> [v0, 3/4 v0 + 1/4 v1, 1/4 v0 + 3/4 v1, v1].
    # z0 = 0 and z1 = [0, 4 ln3] -> z1 = [0, ln3, 3 ln3, 4 ln3]; all pixels class 1:
    # -log sigmoid(z1) = ln(1 + e^-z1) = ln 2, ln(4/3), ln(28/27), ln(82/81); mean of the four.
    logits = t64([[[[0.0, 0.0]], [[0.0, 4 * LN(3)]]]])
    mask = torch.ones(1, 1, 4, dtype=torch.int64)
    expected = (LN(2) + LN(4 / 3) + LN(28 / 27) + LN(82 / 81)) / 4
    close(ce_loss(logits, mask), expected)


def test_ce_classification_keeps_class_255():
    # 256 classes, zero logits: every class has p = 1/256, so label 255 costs ln 256 (not ignored).
    logits = torch.zeros(2, 256, dtype=torch.float64)
    close(ce_loss(logits, torch.tensor([255, 0])), LN(256))


# ----------------------------------------------------------------------------- kd, pixel-wise


def test_kd_on_score_maps_is_pixel_kl_mean_times_t2():
    # SKD's pixel distillation: per-pixel KL(teacher || student) over classes, mean over pixels, T^2.
    # T = 2, 2 classes, 2 pixels. Pixel 0: teacher [2 ln3, 0] / T -> [3/4, 1/4], student uniform:
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 3/4 ln3 - ln2. Pixel 1: teacher uniform, student [3/4, 1/4]:
    # KL = 1/2 ln(2/3) + 1/2 ln2 = 1/2 ln(4/3). Mean times 4: 3/2 ln3 - 2 ln2 + ln(4/3) = 1/2 ln3.
    teacher = maps([2 * LN(3), 0.0], [0.0, 0.0])  # channel (class) rows, pixel columns
    student = maps([0.0, 2 * LN(3)], [0.0, 0.0])
    close(kd_loss(student, teacher, temperature=2.0), LN(3) / 2)


# ------------------------------------------------------------------------------------------ cwd


def test_cwd_hand_value():
    # T = 2, C = 2 channels x 2 positions; each channel is softmaxed over its positions.
    # Channel 0: teacher [2 ln3, 0] / T -> [3/4, 1/4], student [0, 0] -> [1/2, 1/2]: 3/4 ln3 - ln2.
    # Channel 1: teacher [0, 0] -> uniform, student [2 ln3, 0] -> [3/4, 1/4]: 1/2 ln(4/3).
    # T^2 / C * (sum over channels) = 2 * (3/4 ln3 - ln2 + 1/2 ln(4/3)) = 1/2 ln3.
    teacher = maps([2 * LN(3), 0.0], [0.0, 0.0])
    student = maps([0.0, 0.0], [2 * LN(3), 0.0])
    close(cwd_loss(student, teacher, temperature=2.0), LN(3) / 2)
    # batch mean: a second image whose maps agree adds 0, so the loss halves
    close(cwd_loss(torch.cat([student, teacher]), torch.cat([teacher, teacher]), 2.0), LN(3) / 4)
    # softmax over positions is KD's softmax over classes with the two axes swapped
    swapped = num(kd_loss(student.transpose(1, 3), teacher.transpose(1, 3), 2.0))
    close(cwd_loss(student, teacher, 2.0), swapped)


def test_cwd_gradcheck_and_module_with_connector():
    s, t = rand64(2, 3, 2, 3, seed=1), rand64(2, 3, 2, 3, seed=2)
    close(cwd_loss(t, t), 0.0, 1e-12)
    assert gradcheck(lambda a, b: cwd_loss(a, b, 2.0), (s, t))
    term = CWD(temperature=2.0, student_tap="layer2", teacher_tap="layer3")
    term.bind({"layer2": torch.Size((2, 3, 8, 8))}, {"layer3": torch.Size((2, 5, 4, 4))})
    assert list(term.parameters())  # 1x1 conv + BN, then resize
    fs, ft = torch.randn(3, 3, 8, 8), torch.randn(3, 5, 4, 4)
    view = StepView(student={"layer2": fs}, teacher={"layer3": ft})
    close(term(view), num(cwd_loss(term.connector(fs), ft, 2.0)), 1e-6)
    default = CWD()
    assert (default.student_taps(), default.teacher_taps()) == ([LOGITS], [LOGITS])
    assert default.temperature == 4.0
    with pytest.raises(KdkitError, match=r"term 'cwd' needs maps.*teacher tap 'fc:input'"):
        CWD(teacher_tap="fc:input").bind({LOGITS: torch.Size((2, 5, 4, 4))}, {"fc:input": torch.Size((2, 8))})


# -------------------------------------------------------------------------------- i2ckd prototypes


def test_i2ckd_prototypes_hand_value_nearest_ignore_absent():
    # Features (B=2, K=2, 2x2); masks 4x4 are brought to 2x2 by nearest neighbour, which keeps the
    # pixels (0,0), (0,2), (2,0), (2,2). X marks pixels that are dropped: there only class 2 appears,
    # so class 2 is absent. Kept labels: image 0 [[0, 1], [255, 0]], image 1 [[1, 1], [0, 255]].
    features = t64(
        [
            [[[1, 2], [3, 4]], [[10, 20], [30, 40]]],
            [[[5, 6], [7, 8]], [[50, 60], [70, 80]]],
        ]
    )
    X = 2
    mask = torch.tensor(
        [
            [[0, X, 1, X], [X, X, X, X], [255, X, 0, X], [X, X, X, X]],
            [[1, X, 1, X], [X, X, X, X], [0, X, 255, X], [X, X, X, X]],
        ]
    )
    protos, present = i2ckd_prototypes(features, mask, num_classes=3)
    # class 0: image 0 (0,0) = (1, 10), (1,1) = (4, 40); image 1 (1,0) = (7, 70) -> (12/3, 120/3)
    # class 1: image 0 (0,1) = (2, 20); image 1 (0,0) = (5, 50), (0,1) = (6, 60) -> (13/3, 130/3)
    expected = t64([[4.0, 40.0], [13 / 3, 130 / 3], [0.0, 0.0]])
    torch.testing.assert_close(protos, expected, rtol=0, atol=1e-12)
    assert present.tolist() == [True, True, False]
    # a mask already at the feature size is used as it is
    small = mask[:, ::2, ::2]
    torch.testing.assert_close(i2ckd_prototypes(features, small, 3)[0], expected, rtol=0, atol=1e-12)
    # everything ignored: all absent, prototypes 0, no NaN
    protos, present = i2ckd_prototypes(features, torch.full_like(mask, 255), 3)
    assert not present.any() and torch.equal(protos, torch.zeros(3, 2, dtype=torch.float64))


# ---------------------------------------------------------------------------------- i2ckd triplet


def test_i2ckd_triplet_hand_value():
    # 2-D prototypes, margin m = 2. Teacher t0 = (0, 0), t1 = (3, 0), t2 = (0, 4).
    # s0 = (1, 0): d(s0,t0) = 1, d(s0,t1) = 2, d(s0,t2) = sqrt17 -> [2 + 1 - 2]+ = 1, [3 - sqrt17]+ = 0
    # s1 = (3, 1): d(s1,t1) = 1, d(s1,t0) = sqrt10, d(s1,t2) = sqrt18 -> [3 - sqrt10]+ = 0, [3 - sqrt18]+ = 0
    # s2 = (0, 2): d(s2,t2) = 2, d(s2,t0) = 2, d(s2,t1) = sqrt13 -> [2 + 2 - 2]+ = 2, [4 - sqrt13]+
    # mean over the 6 ordered pairs: (1 + 2 + 4 - sqrt13) / 6.
    s = t64([[1.0, 0.0], [3.0, 1.0], [0.0, 2.0]])
    t = t64([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    everything = torch.tensor([True, True, True])
    close(i2ckd_loss(s, t, everything, margin=2.0), (7 - math.sqrt(13)) / 6)
    # class 2 absent: pairs (0, 1) and (1, 0) only -> (1 + 0) / 2. A 4th absent class with any values
    # changes nothing.
    close(i2ckd_loss(s, t, torch.tensor([True, True, False]), 2.0), 0.5)
    s4 = torch.cat([s, t64([[100.0, 100.0]])])
    t4 = torch.cat([t, t64([[0.5, 0.5]])])
    close(i2ckd_loss(s4, t4, torch.tensor([True, True, True, False]), 2.0), (7 - math.sqrt(13)) / 6)


def test_i2ckd_fewer_than_two_classes_is_zero_with_a_graph():
    s, t = rand64(3, 2, seed=3), rand64(3, 2, seed=4)
    for present in ([True, False, False], [False, False, False]):
        loss = i2ckd_loss(s, t, torch.tensor(present), 1.0)
        assert num(loss) == 0.0 and loss.requires_grad
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.equal(grad, torch.zeros_like(s))


def test_i2ckd_identical_prototypes_give_finite_gradients():
    # ||p_c^s - p_c^t|| = 0 at a copy of the teacher: the norm's gradient there must not be NaN
    p = rand64(4, 3, seed=5)
    loss = i2ckd_loss(p, p.detach().clone(), torch.ones(4, dtype=torch.bool), 10.0)
    loss.backward()
    assert torch.isfinite(p.grad).all()


def test_i2ckd_gradcheck_through_prototypes():
    mask = torch.tensor([[[0, 1, 1, 255], [2, 2, 0, 1]], [[1, 0, 255, 2], [0, 0, 2, 1]]])

    def loss(fs, ft):
        ps, present_s = i2ckd_prototypes(fs, mask, 3)
        pt, present_t = i2ckd_prototypes(ft, mask, 3)
        return i2ckd_loss(ps, pt, present_s & present_t, 0.5)

    assert gradcheck(loss, (rand64(2, 4, 2, 4, seed=6), rand64(2, 4, 2, 4, seed=7)))


class SegNet(nn.Module):
    """Declares taps like a segmentation zoo model: stages and the classifier's input."""

    def __init__(self, embedding: bool) -> None:
        super().__init__()
        self.layer1 = nn.Conv2d(3, 4, 1)
        self.classifier = nn.Conv2d(4, 3, 1)
        self.feature_taps = ("layer1",)
        if embedding:
            self.embedding_tap = "classifier:input"


def test_i2ckd_default_taps_projector_and_module():
    term = I2CKD()
    assert term.margin == 1.0 and I2CKD.needs_labels and I2CKD.needs_teacher
    term.resolve_taps(SegNet(embedding=True), SegNet(embedding=False))
    assert (term.student_taps(), term.teacher_taps()) == (["classifier:input"], ["layer1"])
    with pytest.raises(KdkitError, match=r"term 'i2ckd' needs `student_tap`"):
        I2CKD().resolve_taps(nn.Conv2d(3, 3, 1), SegNet(embedding=True))
    # student 4 channels at 8x8, teacher 6 channels at 4x4: projector 1x1 conv + BN, no resize
    term = I2CKD(margin=0.5, student_tap="s", teacher_tap="t")
    term.bind({"s": torch.Size((2, 4, 8, 8))}, {"t": torch.Size((2, 6, 4, 4))})
    assert [type(m) for m in term.projector] == [nn.Conv2d, nn.BatchNorm2d]
    fs, ft = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)
    mask = torch.randint(0, 3, (2, 8, 8))
    mask[0, :2] = 255
    logits = torch.randn(2, 3, 8, 8)
    view = StepView(student={"s": fs, LOGITS: logits}, teacher={"t": ft}, labels=mask)
    ps, present_s = i2ckd_prototypes(term.projector(fs), mask, 3)
    pt, present_t = i2ckd_prototypes(ft, mask, 3)
    close(term(view), num(i2ckd_loss(ps, pt, present_s & present_t, 0.5)), 1e-6)
    with pytest.raises(KdkitError, match="term 'i2ckd' needs masks"):
        term(StepView(student={"s": fs, LOGITS: logits}, teacher={"t": ft}, labels=torch.tensor([0, 1])))
    with pytest.raises(KdkitError, match="term 'i2ckd' needs labels"):
        term(StepView(student={"s": fs, LOGITS: logits}, teacher={"t": ft}))


# --------------------------------------------------------------------------------------- spirit


def test_spirit_hand_value():
    # y^FE channels [1, 2] and [0, 0]; y^AMG channels [0, 0] and [1, 1] over 2 positions.
    # Squared error summed over channels: position 0: 1 + 1 = 2, position 1: 4 + 1 = 5; mean 7/2
    # (the element-wise MSE would be 7/4).
    close(spirit_loss(maps([1.0, 2.0], [0.0, 0.0]), maps([0.0, 0.0], [1.0, 1.0])), 3.5)


def test_spirit_gradcheck_and_module():
    assert gradcheck(spirit_loss, (rand64(2, 3, 2, 2, seed=8), rand64(2, 3, 2, 2, seed=9)))
    term = Spirit()
    assert (term.student_taps(), term.teacher_taps()) == (["extractor"], ["backbone"])
    term.bind({"extractor": torch.Size((2, 4, 4, 4))}, {"backbone": torch.Size((2, 4, 4, 4))})
    assert isinstance(term.connector, nn.Identity)
    s, t = rand64(2, 4, 4, 4, seed=10), rand64(2, 4, 4, 4, seed=11)
    close(term(StepView(student={"extractor": s}, teacher={"backbone": t})), num(spirit_loss(s, t)))
    term.bind({"extractor": torch.Size((2, 2, 4, 4))}, {"backbone": torch.Size((2, 4, 4, 4))})
    assert list(term.parameters())


# ------------------------------------------------------------------------------------ bf16 autocast


@pytest.mark.parametrize("name", ["cwd", "i2ckd", "spirit"])
def test_losses_compute_in_float32_under_bf16_autocast(name):
    gen = torch.Generator().manual_seed(12)
    s, t = (torch.randn(2, 4, 4, 4, generator=gen).bfloat16() for _ in range(2))
    mask = torch.randint(0, 3, (2, 8, 8), generator=gen)

    def loss(a, b):
        if name == "cwd":
            return cwd_loss(a, b, 2.0)
        if name == "spirit":
            return spirit_loss(a, b)
        ps, present = i2ckd_prototypes(a, mask, 3)
        return i2ckd_loss(ps, i2ckd_prototypes(b, mask, 3)[0], present, 1.0)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss(s, t)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    close(low, num(loss(s.float(), t.float())), 1e-5)
