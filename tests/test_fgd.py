"""FGD (Yang et al. 2022): masks, attention, focal and global losses against hand-worked values, a numpy
reference written here from the paper's Eq. 2-7, gradients in float64, and the term on two tiny FPN nets.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from _tensors import rand64, t64
from torch import nn
from torch.autograd import gradcheck

from kdkit.errors import KdkitError
from kdkit.registry import TERMS
from kdkit.taps import Taps, dry_run
from kdkit.terms import (
    FGD,
    GcBlock,
    Mimic,
    StepView,
    fgd_attention,
    fgd_focal_loss,
    fgd_focal_parts,
    fgd_global_loss,
    fgd_masks,
)

E = math.e
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one intra-op thread is far faster


def num(x) -> float:
    return x.detach().item() if isinstance(x, torch.Tensor) else float(x)


def close(actual, expected, tol: float = 1e-9) -> None:
    assert abs(num(actual) - num(expected)) < tol, (num(actual), num(expected))


# ------------------------------------------------------------------------------------ masks


def test_masks_hand_case_8x8_at_stride_4():
    # A 32x32 image, one level of stride 4 -> an 8x8 map; cell (i, j) covers pixels [4j, 4j+4) x [4i, 4i+4).
    # A = (0, 0, 8, 8):    columns 0..1, rows 0..1                  -> 4 cells,  S = 1/4
    # B = (6, 10, 22, 14): columns floor(1.5)=1 .. ceil(5.5)-1=5,
    #                      rows floor(2.5)=2 .. ceil(3.5)-1=3        -> 10 cells, S = 1/10
    # C = (4, 4, 32, 32):  columns 1..7, rows 1..7                   -> 49 cells, S = 1/49
    # A and C share (1, 1) -> 1/4 (smallest box); B lies inside C -> 1/10. Foreground: 52 cells, so the
    # 12 background cells (row 0 columns 2..7, column 0 rows 2..7) get 1/12. A padding row follows.
    a, b, c, g = 1 / 4, 1 / 10, 1 / 49, 1 / 12
    expected = [
        [a, a, g, g, g, g, g, g],
        [a, a, c, c, c, c, c, c],
        [g, b, b, b, b, b, c, c],
        [g, b, b, b, b, b, c, c],
        *([[g, c, c, c, c, c, c, c]] * 4),
    ]
    targets = t64([[[0, 0, 8, 8, 0], [6, 10, 22, 14, 1], [4, 4, 32, 32, 2], [0, 0, 0, 0, -1]]])
    fg, scale = fgd_masks(targets, (8, 8), 4)
    assert torch.allclose(scale, t64([expected]), atol=1e-15)
    assert torch.equal(fg, (scale != g).to(fg.dtype))
    assert fg.sum() == 52
    # each box that overlaps no smaller one sums to 1 over its cells: A does
    assert math.isclose(scale[0, :2, :2].sum().item(), 1.0)


def test_masks_clip_boxes_to_the_map_and_count_the_cells_left():
    # (20, 20, 40, 40) at stride 4 on 8x8: columns/rows 5 .. ceil(10)-1 = 9, clipped to 5..7 -> 9 cells
    fg, scale = fgd_masks(t64([[[20, 20, 40, 40, 0]]]), (8, 8), 4)
    assert fg[0, 5:, 5:].all() and fg.sum() == 9
    assert torch.allclose(scale[0, 5:, 5:], torch.full((3, 3), 1 / 9, dtype=torch.float64))
    assert torch.allclose(scale[0, :5], torch.full((5, 8), 1 / 55, dtype=torch.float64))


def test_masks_ignore_padding_rows_even_with_coordinates_and_degenerate_boxes():
    box = [4, 4, 12, 12, 3]
    plain = fgd_masks(t64([[box]]), (8, 8), 4)
    padded = fgd_masks(t64([[box, [0, 0, 32, 32, -1], [8, 8, 8, 20, 1], [0, 0, 0, 0, -1]]]), (8, 8), 4)
    for x, y in zip(plain, padded, strict=True):
        assert torch.equal(x, y)


def test_masks_of_an_image_without_boxes_are_all_background():
    # image 0 has a box, image 1 only padding: 1/(h w) = 1/12 everywhere on a 3x4 map
    targets = t64([[[0, 0, 2, 2, 0]], [[0, 0, 0, 0, -1]]])
    fg, scale = fgd_masks(targets, (3, 4), 2)
    assert fg[1].sum() == 0 and torch.allclose(scale[1], torch.full((3, 4), 1 / 12, dtype=torch.float64))
    assert fg[0, 0, 0] == 1 and scale[0, 0, 0] == 1 and math.isclose(scale[0, 1, 1].item(), 1 / 11)
    empty = fgd_masks(torch.zeros(2, 0, 5), (3, 4), 2)
    assert empty[0].sum() == 0 and torch.allclose(empty[1], torch.full((2, 3, 4), 1 / 12))


# ------------------------------------------------------------------------------------ attention


def test_attention_hand_values():
    # channel 0 = [[1, -1], [0, 2]], channel 1 = [[-3, 1], [0, 2]], T = 0.5
    # G^S = mean_c |F| = [[2, 1], [0, 2]] -> /T = [4, 2, 0, 4]; A^S = 4 e^{[4,2,0,4]} / (2 e^4 + e^2 + 1)
    # G^C = mean_hw |F| = [4/4, 6/4] = [1, 1.5] -> /T = [2, 3]; A^C = 2 [1, e] / (1 + e)
    f = t64([[[[1, -1], [0, 2]], [[-3, 1], [0, 2]]]])
    spatial, channel = fgd_attention(f, 0.5)
    z = 2 * E**4 + E**2 + 1
    assert torch.allclose(spatial, t64([[[4 * E**4 / z, 4 * E**2 / z], [4 / z, 4 * E**4 / z]]]))
    assert torch.allclose(channel, t64([[2 / (1 + E), 2 * E / (1 + E)]]))
    # T = 1: G^S = [2, 1, 0, 2] -> A^S = 4 e^{G} / (2 e^2 + e + 1); each map averages to 1
    spatial, channel = fgd_attention(f, 1.0)
    close(spatial[0, 0, 1], 4 * E / (2 * E**2 + E + 1))
    close(spatial.mean(), 1.0)
    close(channel.mean(), 1.0)


# ------------------------------------------------------------------------------------ focal loss


def _hand_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher all ones (A^S_t = A^C_t = 1); student channel 0 = [[2, 0], [0, 0]], channel 1 = 0."""
    teacher = torch.ones(1, 2, 2, 2, dtype=torch.float64)
    student = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    student[0, 0, 0, 0] = 2
    return student, teacher


def _hand_attention_l1() -> float:
    # student: G^S = [[1, 0], [0, 0]] -> /T = [2, 0, 0, 0]: A^S_s = 4 [e^2, 1, 1, 1] / (e^2 + 3)
    #          G^C = [0.5, 0]         -> /T = [1, 0]:       A^C_s = 2 [e, 1] / (e + 1)
    z = E**2 + 3
    spatial = abs(1 - 4 * E**2 / z) + 3 * abs(1 - 4 / z)
    channel = abs(1 - 2 * E / (E + 1)) + abs(1 - 2 / (E + 1))
    return spatial + channel


def test_focal_loss_hand_case_2_channels_2x2():
    # One box on cell (0, 0) at stride 1: M = 1, S = 1 there; 3 background cells with S = 1/3.
    # fg = S (1-2)^2 + S (1-0)^2 = 2;  bg = 1/3 * (3 cells * 2 channels * (1-0)^2) = 2.
    student, teacher = _hand_pair()
    fg, scale = fgd_masks(t64([[[0, 0, 1, 1, 0]]]), (2, 2), 1)
    parts = fgd_focal_parts(student, teacher, fg, scale, 0.5)
    close(parts["fg"], 2.0)
    close(parts["bg"], 2.0)
    close(parts["attention"], _hand_attention_l1())
    loss = fgd_focal_loss(student, teacher, fg, scale, 0.5, alpha=2, beta=3, gamma=5)
    close(loss, 2 * 2 + 3 * 2 + 5 * _hand_attention_l1())
    # a batch of two copies: per-image sums averaged over the batch -> the same values
    twice = fgd_focal_parts(
        student.repeat(2, 1, 1, 1), teacher.repeat(2, 1, 1, 1), fg.repeat(2, 1, 1), scale.repeat(2, 1, 1), 0.5
    )
    for key in parts:
        close(twice[key], parts[key])


def test_focal_loss_of_an_image_without_boxes_is_all_background():
    # no box: S = 1/4 on all 4 cells; fg = 0; each cell's squared difference summed over the 2 channels
    # is 2 ((0,0): (1-2)^2 + (1-0)^2; others: 1 + 1), so bg = 1/4 * (2 + 2 + 2 + 2) = 2
    student, teacher = _hand_pair()
    fg, scale = fgd_masks(t64([[[0, 0, 0, 0, -1]]]), (2, 2), 1)
    parts = fgd_focal_parts(student, teacher, fg, scale, 0.5)
    assert num(parts["fg"]) == 0.0
    close(parts["bg"], (2 + 2 + 2 + 2) / 4)


def _np_reference(student, teacher, boxes, stride, temperature):
    """Eq. 2-7 written out with loops: (fg, bg, attention) summed per image, averaged over the batch."""
    s, t = student.detach().numpy(), teacher.detach().numpy()
    b, c, h, w = t.shape
    out = np.zeros(3)
    for n in range(b):
        scale = np.zeros((h, w))
        for x1, y1, x2, y2, cls in boxes[n]:
            if cls < 0:
                continue
            cols = [j for j in range(w) if j * stride < x2 and (j + 1) * stride > x1]
            rows = [i for i in range(h) if i * stride < y2 and (i + 1) * stride > y1]
            for i in rows:
                for j in cols:
                    scale[i, j] = max(scale[i, j], 1 / (len(rows) * len(cols)))
        fg = scale > 0
        scale[~fg] = 1 / (~fg).sum()

        def att(f):
            g_s = np.abs(f).mean(0).ravel() / temperature
            g_c = np.abs(f).mean((1, 2)) / temperature
            return h * w * np.exp(g_s) / np.exp(g_s).sum(), c * np.exp(g_c) / np.exp(g_c).sum()

        (ss, sc), (ts, tc) = att(s[n]), att(t[n])
        for k in range(c):
            for i in range(h):
                for j in range(w):
                    v = scale[i, j] * ts[i * w + j] * tc[k] * (t[n, k, i, j] - s[n, k, i, j]) ** 2
                    out[0 if fg[i, j] else 1] += v
        out[2] += np.abs(ts - ss).sum() + np.abs(tc - sc).sum()
    return out / b


def test_focal_parts_match_a_loop_reference_on_random_features():
    student, teacher = rand64(2, 3, 5, 6, seed=1), rand64(2, 3, 5, 6, seed=2)
    boxes = [
        [[3, 2, 17, 9, 0], [10, 6, 23.5, 19, 2], [0, 0, 0, 0, -1]],
        [[1, 1, 5, 5, 1], [0, 0, 0, 0, -1], [0, 0, 0, 0, -1]],
    ]
    fg, scale = fgd_masks(t64(boxes), (5, 6), 4)
    parts = fgd_focal_parts(student, teacher, fg, scale, 0.7)
    expected = _np_reference(student, teacher, boxes, 4, 0.7)
    assert np.allclose([num(parts[k]) for k in ("fg", "bg", "attention")], expected, rtol=1e-12)


def test_focal_gradcheck():
    fg, scale = fgd_masks(t64([[[1, 1, 6, 5, 0]], [[0, 0, 0, 0, -1]]]), (3, 4), 2)
    assert fg[0].sum() == 9 and fg[1].sum() == 0  # a 3x3-cell box and an image without one
    assert gradcheck(
        lambda s, t: fgd_focal_loss(s, t, fg, scale, 0.5, 1.0, 0.5, 1.0),
        (rand64(2, 2, 3, 4, seed=3), rand64(2, 2, 3, 4, seed=4)),
    )


# ------------------------------------------------------------------------------------ global loss


def test_gcblock_context_hand_values_and_identity_at_init():
    # 2 channels, 2 positions: x = [[1, 3], [2, -2]]; W_k = [1, 0], bias 0 -> scores [1, 3]
    # softmax -> [1, e^2] / (1 + e^2); context = weighted average of each channel
    block = GcBlock(2).double()
    with torch.no_grad():
        block.key.weight.copy_(t64([1, 0]).view(1, 2, 1, 1))
        block.key.bias.zero_()
    x = t64([[[[1, 3]], [[2, -2]]]])
    p = E**2 / (1 + E**2)
    assert torch.allclose(block.context(x), t64([[(1 - p) * 1 + p * 3, (1 - p) * 2 + p * -2]]))
    assert torch.equal(block(x), x)  # W_v2 starts at zero: R(F) = F


def test_gcblock_transform_hand_values():
    # 4 channels -> hidden 2. W_k = 0: uniform weights, context = mean over the 2 positions = [2, 0, 1, 1].
    # W_v1 picks channels 0 and 1: v = [2, 0]; LayerNorm(2): (v - 1) / sqrt(1 + 1e-5) = [r, -r];
    # ReLU -> [r, 0]; W_v2 = ones column 0, bias 0 -> every channel gets + r at every position.
    block = GcBlock(4).double()
    with torch.no_grad():
        block.key.weight.zero_()
        conv1, conv2 = block.transform[0], block.transform[-1]
        conv1.weight.copy_(t64([[1, 0, 0, 0], [0, 1, 0, 0]]).view(2, 4, 1, 1))
        conv1.bias.zero_()
        conv2.weight.copy_(t64([[1, 0]] * 4).view(4, 2, 1, 1))
    x = t64([[[[1, 3]], [[2, -2]], [[0, 2]], [[1, 1]]]])
    r = 1 / math.sqrt(1 + 1e-5)
    assert torch.allclose(block(x), x + r)


def test_global_loss_at_init_is_the_summed_squared_difference():
    student, teacher = rand64(2, 4, 3, 3, seed=5), rand64(2, 4, 3, 3, seed=6)
    rel_s, rel_t = GcBlock(4).double(), GcBlock(4).double()
    close(fgd_global_loss(student, teacher, rel_s, rel_t), (teacher - student).pow(2).sum() / 2)


# ------------------------------------------------------------------------------------ the term


class TinyFPN(nn.Module):
    """A stand-in for a detector: FPN levels routed through ``nn.Identity`` under ``levels``."""

    def __init__(self, width: int, strides: list[int]) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, stride=strides[0], padding=1)
        self.downs = nn.ModuleList(nn.Conv2d(width, width, 3, stride=2, padding=1) for _ in strides[1:])
        self.levels = nn.ModuleDict({f"p{int(math.log2(s))}": nn.Identity() for s in strides})
        self.feature_taps = [f"levels.p{int(math.log2(s))}" for s in strides]
        self.feature_strides = list(strides)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(x)
        outs = []
        for i, level in enumerate(self.levels.values()):
            if i:
                x = self.downs[i - 1](torch.relu(x))
            outs.append(level(x))
        return {
            "out": torch.cat([o.flatten(2) for o in outs], 2).transpose(1, 2),
            "image_size": torch.tensor(x.shape[-2:]),
        }


def pair() -> tuple[TinyFPN, TinyFPN]:
    torch.manual_seed(0)
    return TinyFPN(3, [4, 8]), TinyFPN(6, [4, 8, 16])


TARGETS = torch.tensor([[[2, 3, 13, 11, 0], [0, 0, 0, 0, -1]], [[4, 4, 30, 20, 1], [18, 2, 29, 9, 0]]])


def bound(term: FGD, student, teacher, x):
    term.resolve_taps(student, teacher)
    term.bind(dry_run(student, x, term.student_taps()), dry_run(teacher, x, term.teacher_taps()))
    return term


def test_levels_pair_by_stride_from_the_declared_taps():
    student, teacher = pair()
    term = FGD()
    term.resolve_taps(student, teacher)
    assert term.student_taps() == ["levels.p2", "levels.p3"]
    assert term.teacher_taps() == ["levels.p2", "levels.p3"] and term.strides == [4, 8]
    only = FGD(levels=[8])  # the same key as mimic's and pkd's
    only.resolve_taps(student, teacher)
    assert (only.student_taps(), only.teacher_taps(), only.strides) == (["levels.p3"], ["levels.p3"], [8])
    with pytest.raises(TypeError):
        FGD(strides=[8])  # the old key is gone
    named = FGD(teacher_taps=["levels.p4"], student_taps=["levels.p3"])
    named.resolve_taps(student, teacher)
    assert named.strides == [16]  # the named teacher tap's declared stride
    student.feature_taps, student.feature_strides = ["stem", "levels.p2", "levels.p3"], [4, 4, 8]
    twice = FGD()
    twice.resolve_taps(student, teacher)
    assert twice.student_taps() == ["levels.p2", "levels.p3"]  # two levels at stride 4: the deepest pairs
    assert TERMS.get("fgd") is FGD


def test_fgd_pairs_the_same_taps_as_mimic_where_a_stride_repeats():
    student, teacher = pair()
    student.feature_taps, student.feature_strides = ["stem", "levels.p2", "levels.p3"], [4, 4, 8]
    teacher.feature_taps = ["stem", "levels.p2", "levels.p3", "levels.p4"]
    teacher.feature_strides = [4, 4, 8, 16]
    for levels in (None, [4]):
        fgd, mimic = FGD(levels=levels), Mimic(levels=levels)
        fgd.resolve_taps(student, teacher)
        mimic.resolve_taps(student, teacher)
        assert (fgd.student_taps(), fgd.teacher_taps(), fgd.strides) == (
            mimic.student_taps(),
            mimic.teacher_taps(),
            mimic.strides,
        )
    # both stride-4 levels pair, last with last (the old FGD kept only the last one declared)
    assert fgd.student_taps() == fgd.teacher_taps() == ["stem", "levels.p2"] and fgd.strides == [4, 4]
    x = torch.randn(2, 3, 16, 16)
    term = bound(FGD(alpha=1.0, beta=1.0, gamma=1.0, lam=1.0), student, teacher, x)
    assert term.strides == [4, 4, 8] and len(term.relations_s) == len(term.connectors) == 3
    s, t = Taps(student, term.student_taps()), Taps(teacher, term.teacher_taps())
    loss = term(StepView(student=s(x), teacher=t(x), labels=TARGETS.float()))
    assert torch.isfinite(loss) and loss.item() > 0


def _message(build, *args) -> str:
    with pytest.raises(KdkitError) as err:
        build().resolve_taps(*args) if args else build()
    return str(err.value)


def test_pairing_errors_are_mimics_word_for_word():
    student, teacher = pair()
    plain = nn.Sequential(nn.Conv2d(3, 4, 3))
    cases = [
        (dict(), (plain, teacher), r"'fgd' needs `student_taps`: the student model declares no"),
        (dict(), (TinyFPN(3, [32]), teacher), r"strides \[32\] and the teacher's \[4, 8, 16\] share none"),
        (dict(levels=[16]), (student, teacher), r"levels \[16\] are not strides of both.*from \[4, 8\]"),
        (dict(levels=["p3"]), (), r"'fgd' levels are FPN strides shared by both models"),
        (dict(student_taps=["stem"]), (), r"'fgd' pairs student_taps with teacher_taps.*set both"),
        (dict(student_taps=["a", "b"], teacher_taps=["c"]), (), r"but got 2 and 1 taps"),
        (dict(student_taps=["a"], teacher_taps=["b"], levels=[8]), (), r"`levels` picks strides"),
    ]
    for kwargs, args, pattern in cases:
        message = _message(lambda kw=kwargs: FGD(**kw), *args)
        assert re.search(pattern, message), (pattern, message)
        assert message.replace("'fgd'", "'mimic'") == _message(lambda kw=kwargs: Mimic(**kw), *args)
    # FGD's own: the masks need the stride of explicitly named teacher taps
    with pytest.raises(KdkitError, match=r"teacher tap 'stem' is not among the teacher model's feature_taps"):
        FGD(teacher_taps=["stem"], student_taps=["stem"]).resolve_taps(student, teacher)
    with pytest.raises(KdkitError, match=r"does not know the strides.*call resolve_taps"):
        FGD(teacher_taps=["stem"], student_taps=["stem"]).bind({}, {})
    term = FGD(teacher_taps=["levels.p3"], student_taps=["levels.p3"])
    term.resolve_taps(student, teacher)
    with pytest.raises(KdkitError, match=r"'fgd' needs FPN maps.*teacher tap 'levels.p3' has shape \(2, 5\)"):
        term.bind({"levels.p3": torch.Size([2, 3, 4, 4])}, {"levels.p3": torch.Size([2, 5])})
    x = torch.randn(2, 3, 32, 32)
    term = bound(FGD(), student, teacher, x)
    s, t = Taps(student, term.student_taps()), Taps(teacher, term.teacher_taps())
    with pytest.raises(KdkitError, match=r"needs detection targets \(B=2, M, 5\).*task: detection"):
        term(StepView(student=s(x), teacher=t(x), labels=torch.tensor([0, 1])))


def test_term_trains_a_step_on_two_tiny_fpns():
    student, teacher = pair()
    x = torch.randn(2, 3, 32, 32)
    term = bound(FGD(alpha=1.0, beta=1.0, gamma=1.0, lam=1.0), student, teacher, x)
    assert [type(c).__name__ for c in term.connectors] == ["Sequential", "Sequential"]  # 3 -> 6 channels
    s, t = Taps(student, term.student_taps()), Taps(teacher, term.teacher_taps())
    with torch.no_grad():
        t_out = t(x)
    view = StepView(student=s(x), teacher=t_out, labels=TARGETS.float())
    loss = term(view)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    close(sum(term.stats().values()), loss, 1e-4)
    assert set(term.stats()) == {"fg", "bg", "attention", "global"}
    loss.backward()
    for name, param in term.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert list(term.teacher_space(view)) == term.teacher_taps()


def test_term_equals_the_functions_summed_over_levels_and_ignores_padding():
    student, teacher = pair()
    x = torch.randn(2, 3, 32, 32)
    term = bound(FGD(temperature=0.8, alpha=2.0, beta=0.5, gamma=0.25, lam=3.0), student, teacher, x)
    s, t = Taps(student, term.student_taps()), Taps(teacher, term.teacher_taps())
    s_out, t_out = s(x), t(x)
    expected = 0.0
    for level, (key, stride) in enumerate(zip(term.teacher_taps(), [4, 8], strict=True)):
        f_s, f_t = term.connectors[level](s_out[key]), t_out[key]
        fg, scale = fgd_masks(TARGETS.float(), tuple(f_t.shape[-2:]), stride)
        expected = expected + fgd_focal_loss(f_s, f_t, fg, scale, 0.8, 2.0, 0.5, 0.25)
        rel_s, rel_t = term.relations_s[level], term.relations_t[level]
        expected = expected + 3.0 * fgd_global_loss(f_s, f_t, rel_s, rel_t)
    got = term(StepView(student=s_out, teacher=t_out, labels=TARGETS.float()))
    close(got, expected, 1e-6 * num(expected))
    more_padding = torch.cat([TARGETS.float(), torch.tensor([[[0, 0, 32, 32, -1]], [[0, 0, 0, 0, -1]]])], 1)
    close(term(StepView(student=s_out, teacher=t_out, labels=more_padding)), got, 1e-6 * num(got))


def test_term_gradcheck_float64_through_connectors_and_gcblocks():
    student, teacher = pair()
    x = torch.randn(2, 3, 8, 8)
    term = bound(FGD(alpha=1.0, beta=1.0, gamma=1.0, lam=1.0), student, teacher, x).double()
    torch.manual_seed(1)
    with torch.no_grad():
        for block in [*term.relations_s, *term.relations_t]:
            for p in block.parameters():
                p.normal_(0, 0.5)  # leave the identity start, so every part of R is exercised
    targets = t64([[[1, 2, 3, 7, 0]], [[0, 0, 0, 0, -1]]])  # image 1: no box
    s_keys, t_keys = term.student_taps(), term.teacher_taps()
    s_shapes = [(2, 3, 2, 2), (2, 3, 1, 1)]
    t_shapes = [(2, 6, 2, 2), (2, 6, 1, 1)]
    inputs = [rand64(*sh, seed=10 + i) for i, sh in enumerate(s_shapes + t_shapes)]

    def loss(*feats):
        view = StepView(
            student=dict(zip(s_keys, feats[:2], strict=True)),
            teacher=dict(zip(t_keys, feats[2:], strict=True)),
            labels=targets,
        )
        return term(view)

    assert gradcheck(loss, tuple(inputs))
