"""SoKD's DAM term (kdkit.terms.dam): shared heads, peak picking, decoded boxes and masks, L_D and L_DA
against hand-worked values, gradients, the collapse guard, and the plot."""

from __future__ import annotations

import math

import matplotlib.image
import pytest
import torch
from _tensors import rand64, t64
from torch import nn

from kdkit.errors import KdkitError
from kdkit.registry import TERMS
from kdkit.report.dam_plots import plot_dam
from kdkit.terms import DAM, StepView
from kdkit.terms.dam import area_loss, area_masks, decode_areas, detection_loss, pick_peaks

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def bound(student=(2, 3, 4, 4), teacher=(2, 5, 4, 4), **kwargs) -> DAM:
    torch.manual_seed(0)
    term = DAM(student_tap="s", teacher_tap="t", **kwargs)
    term.bind({"s": torch.Size(student)}, {"t": torch.Size(teacher)})
    return term


# ------------------------------------------------------------------------------ shared heads


def test_one_set_of_heads_for_student_and_teacher():
    term = bound(hidden=4)
    assert TERMS.build("dam").__class__ is DAM
    # one copy: 3 branches of conv3x3 (5 -> 4, +bias) and conv1x1 (4 -> 1, 2, 2, no bias)
    head_params = sum(p.numel() for p in term.heads.parameters())
    assert head_params == 3 * (5 * 4 * 9 + 4) + 4 * 1 + 2 * (4 * 2)
    adapter_params = sum(p.numel() for p in term.adapter.parameters())
    assert adapter_params == 3 * 5 + 2 * 5  # 1x1 conv 3 -> 5 without bias, batch norm
    assert sum(p.numel() for p in term.parameters()) == head_params + adapter_params
    convs = [m for m in term.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 7  # the adapter's and the six of one head
    seen = []
    hook = term.heads.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    term(StepView(student={"s": s}, teacher={"t": t}))
    hook.remove()
    assert len(seen) == 2  # the same module objects saw the adapted student and the teacher
    assert torch.equal(seen[0], term.adapter(s)) and torch.equal(seen[1], t)
    # changing one weight changes both sides' predictions
    before = [term.heads(x)[0] for x in seen]
    with torch.no_grad():
        term.heads.heatmap[2].weight += 1.0
    after = [term.heads(x)[0] for x in seen]
    for a, b, x in zip(after, before, seen):  # +1 on every 1x1 weight adds the sum of the hidden units
        hidden = term.heads.heatmap[1](term.heads.heatmap[0](x)).sum(1, keepdim=True)
        assert hidden.abs().sum() > 0 and torch.allclose(a, b + hidden)


def test_teacher_space_is_the_adapted_student_feature():
    term = bound()
    s = torch.randn(2, 3, 4, 4)
    out = term.teacher_space(StepView(student={"s": s}, teacher={}))
    assert list(out) == ["t"] == term.teacher_space_taps()
    assert torch.equal(out["t"], term.adapter(s)) and out["t"].shape == (2, 5, 4, 4)


# ------------------------------------------------------------------------------ decoding


def peak_map() -> torch.Tensor:
    """5x5 scores rising slowly with the flat index; peaks (0,1)=.95, (4,1)=.8, (2,3)=.7 and the
    background corner (4,4); (0,0)=.9 is higher than most but next to (0,1), so not a peak."""
    score = 0.01 * torch.arange(25.0).reshape(5, 5) / 25
    for (i, j), v in {(0, 0): 0.9, (0, 1): 0.95, (4, 1): 0.8, (2, 3): 0.7}.items():
        score[i, j] = v
    return score.unsqueeze(0)


def test_pick_peaks_takes_the_local_maxima_by_score():
    score = peak_map()
    assert pick_peaks(score, 3).tolist() == [[1, 21, 13]]
    assert pick_peaks(score, 4).tolist() == [[1, 21, 13, 24]]
    assert pick_peaks(score, 5).tolist() == [[1, 21, 13, 24, 0]]  # then the best non-peak cell
    assert pick_peaks(torch.tensor([[[0.3]]]), 3).tolist() == [[0, 0, 0]]  # fewer cells than areas
    two = torch.cat([score, score.flip(-1)])  # per sample
    assert pick_peaks(two, 2).tolist() == [[1, 21], [3, 23]]


def test_masks_cover_exactly_the_decoded_boxes():
    h, w = 8, 6
    heat = torch.full((1, h, w), -3.0)
    heat[0, 2, 5], heat[0, 6, 1] = 3.0, 2.0
    size, offset = torch.zeros(1, 2, h, w), torch.zeros(1, 2, h, w)
    size[0, 0, 2, 5] = logit(0.2)  # side 0.125 + 0.375 * 0.2 = 0.2 of 8 rows: 1.6 cells; width: 0.3125 * 6
    offset[0, 0, 2, 5] = logit(0.25)  # centre (2.25, 5.5)
    size[0, :, 6, 1] = -20.0  # smallest box: 1.0 x 0.75 cells
    offset[0, 0, 6, 1], offset[0, 1, 6, 1] = 20.0, -20.0  # centre (6.99, 1.01): offsets clamped to [.01, .99]
    score, boxes, masks, flat = decode_areas(heat, size, offset, areas=2)
    assert not flat.any() and torch.allclose(score, heat.sigmoid())
    expected = torch.tensor([[[1.45, 4.5625, 3.05, 6.0], [6.49, 0.635, 7.49, 1.385]]])
    assert torch.allclose(boxes, expected, atol=1e-5)
    want = torch.zeros(1, 2, h, w, dtype=torch.bool)
    want[0, 0, 1:3, 5] = True  # row centres 1.5, 2.5 in [1.45, 3.05); column centre 5.5 in [4.5625, 6)
    want[0, 1, 6, 1] = True  # row 6.5 in [6.49, 7.49); no column centre in [0.635, 1.385): the peak cell
    assert torch.equal(masks, want)


def test_masks_are_cell_centres_in_the_box_plus_the_peak_cell():
    gen = torch.Generator().manual_seed(1)
    b, n, h, w = 3, 5, 7, 9
    heat, size, offset = (torch.randn(b, c, h, w, generator=gen) * 3 for c in (1, 2, 2))
    _, boxes, masks, _ = decode_areas(heat[:, 0], size, offset, areas=n)
    peaks = pick_peaks(heat[:, 0].sigmoid(), n)
    for i in range(b):
        for k in range(n):
            y0, x0, y1, x1 = boxes[i, k].tolist()
            p = int(peaks[i, k])
            for r in range(h):
                for c in range(w):
                    inside = y0 <= r + 0.5 < y1 and x0 <= c + 0.5 < x1
                    in_rows = y0 <= r + 0.5 < y1 or r == p // w
                    in_cols = x0 <= c + 0.5 < x1 or c == p % w
                    assert bool(masks[i, k, r, c]) == (in_rows and in_cols)
                    assert not inside or masks[i, k, r, c]
            assert masks[i, k, p // w, p % w]
    assert torch.equal(area_masks(boxes, peaks, h, w), masks)


# ------------------------------------------------------------------------------ collapse guard


def test_flat_heatmap_takes_its_peaks_from_the_teacher_energy():
    h = w = 5
    energy = peak_map()[0].flip(0).unsqueeze(0)  # peaks now at (4,1), (0,1), (2,3), (0,4)
    heat = torch.zeros(2, h, w)
    heat[1] = peak_map()[0] * 10  # sample 1 is not flat: its own peaks
    zeros = torch.zeros(2, 2, h, w)
    score, boxes, masks, flat = decode_areas(heat, zeros, zeros, torch.cat([energy, energy]), areas=3)
    assert flat.tolist() == [True, False]
    assert pick_peaks(score, 3).tolist() == [[21, 1, 13], [1, 21, 13]]
    assert score[0].min() == 0 and score[0].max() == 1  # energy scaled to [0, 1]
    assert masks[0, 0, 4, 1] and masks[0, 1, 0, 1] and masks[0, 2, 2, 3]


def test_collapsed_heads_use_the_energy_and_keep_masks_small():
    term = bound(areas=2)
    with torch.no_grad():
        for branch in (term.heads.heatmap, term.heads.size, term.heads.offset):
            branch[2].weight.zero_()  # constant outputs: L_D = 0, flat heatmap
    t = torch.zeros(2, 5, 4, 4)
    t[:, :, 1, 2], t[:, :, 3, 0] = 3.0, 2.0
    s = torch.randn(2, 3, 4, 4)
    score, boxes, masks = term.detect(s, t)
    # size logit 0: side 0.3125 * 4 = 1.25 cells around the cell centre -> exactly the peak cell
    want = torch.zeros(2, 2, 4, 4, dtype=torch.bool)
    want[:, 0, 1, 2] = want[:, 1, 3, 0] = True
    assert torch.equal(masks, want)
    term(StepView(student={"s": s}, teacher={"t": t}))
    assert term.last_stats == {"coverage": 2 / 16, "box_coverage": 1 / 16, "flat": 1.0}


@pytest.mark.parametrize("h,w", [(1, 1), (1, 5), (2, 1), (2, 2), (3, 3), (4, 7), (9, 8)])
def test_masks_never_empty_never_the_whole_map(h, w):
    gen = torch.Generator().manual_seed(h * 10 + w)
    heat = torch.randn(4, h, w, generator=gen)
    offset = torch.randn(4, 2, h, w, generator=gen) * 50
    for extreme in (-50.0, 50.0):
        size = torch.full((4, 2, h, w), extreme)
        _, _, masks, _ = decode_areas(heat, size, offset, areas=4)
        cells = masks.flatten(2).sum(-1)
        assert masks.shape == (4, 4, h, w) and (cells >= 1).all()
        if h * w > 1:
            assert (cells < h * w).all()
        # per axis at most max(ceil(0.5 * side), 1) cells
        assert (masks.any(-1).sum(-1) <= max(math.ceil(h / 2), 1)).all()
        assert (masks.any(-2).sum(-1) <= max(math.ceil(w / 2), 1)).all()


# ------------------------------------------------------------------------------ losses


def test_detection_loss_hand_value():
    a = (t64([[[[1.0, 2.0]]]]), t64([[[[1.0]], [[3.0]]]]), t64([[[[0.0]], [[0.0]]]]))
    b = (t64([[[[0.0, 0.0]]]]), t64([[[[1.0]], [[1.0]]]]), t64([[[[2.0]], [[0.0]]]]))
    # (1 + 4) / 2 + (0 + 4) / 2 + (4 + 0) / 2
    assert detection_loss(a, b).item() == pytest.approx(6.5)


def test_area_loss_hand_value_and_gradcheck():
    s = t64([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    masks = torch.tensor([[[[1, 1], [0, 0]], [[0, 1], [0, 0]]]], dtype=torch.bool)
    # box 1: 1 + 4, box 2: 4 -> 9 over C = 2 times 3 masked cells
    assert area_loss(s, torch.zeros_like(s), masks).item() == pytest.approx(1.5)
    a, b = rand64(2, 3, 4, 4, seed=1), rand64(2, 3, 4, 4, seed=2)
    m = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(3)) > 0.5
    assert torch.autograd.gradcheck(lambda x, y: area_loss(x, y, m), (a, b))
    assert torch.autograd.gradcheck(
        lambda *p: detection_loss(p[:3], p[3:]),
        tuple(rand64(2, c, 3, 3, seed=c + k) for k in (0, 9) for c in (1, 2, 2)),
    )


def test_module_is_the_weighted_sum_and_gradients_reach_adapter_and_heads():
    term = bound(detect_weight=0.3, area_weight=2.0).double()
    s = rand64(2, 3, 4, 4, seed=4)
    t = rand64(2, 5, 4, 4, seed=5)
    loss = term(StepView(student={"s": s}, teacher={"t": t}))
    _, _, masks = term.detect(s, t)
    adapted = term.adapter(s)
    want = 0.3 * detection_loss(term.heads(adapted), term.heads(t)) + 2.0 * area_loss(adapted, t, masks)
    assert torch.allclose(loss, want)
    loss.backward()
    assert t.grad is None  # the (refined) teacher feature carries no gradient
    assert s.grad is not None and s.grad.abs().sum() > 0
    for name, p in term.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    # float64 gradient check of the differentiable part (L_D and L_DA with the masks fixed)
    def fixed(x: torch.Tensor) -> torch.Tensor:
        a = term.adapter(x)
        return 0.3 * detection_loss(term.heads(a), term.heads(t.detach())) + 2.0 * area_loss(
            a, t.detach(), masks
        )

    assert torch.autograd.gradcheck(fixed, (s.detach().requires_grad_(),))


def test_areas_come_from_the_mean_of_both_sides_predictions():
    term = bound(areas=3)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4) * 3
    pred_s, pred_t = term.heads(term.adapter(s)), term.heads(t)
    heat, size, offset = ((a + b) / 2 for a, b in zip(pred_s, pred_t))
    energy = t.pow(2).mean(1)
    want = decode_areas(heat[:, 0], size, offset, energy, areas=3)
    got = term.detect(s, t)
    for g, w in zip(got, want[:3]):
        assert torch.allclose(g.float(), w.float())
    alone = decode_areas(pred_s[0][:, 0], pred_s[1], pred_s[2], energy, areas=3)
    assert not torch.equal(got[1], alone[1])  # not the student side alone


def test_teacher_side_trains_the_shared_heads_too():
    term = bound()
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    adapted = term.adapter(s).detach()  # only the teacher side's path stays differentiable below
    pred_s = tuple(p.detach() for p in term.heads(adapted))
    detection_loss(pred_s, term.heads(t)).backward()
    assert term.heads.heatmap[0].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ errors


def test_bad_tap_shapes_and_arguments_raise_one_line_errors():
    term = DAM(student_tap="blocks.3", teacher_tap="layer3")
    with pytest.raises(KdkitError, match=r"student tap 'blocks.3' has shape \(2, 16, 8\); set student_tap"):
        term.bind({"blocks.3": torch.Size((2, 16, 8))}, {"layer3": torch.Size((2, 8, 4, 4))})
    with pytest.raises(KdkitError, match=r"teacher tap 'layer3' has shape \(2, 10\); set teacher_tap"):
        term.bind({"blocks.3": torch.Size((2, 8, 4, 4))}, {"layer3": torch.Size((2, 10))})
    with pytest.raises(KdkitError, match="not bound"):
        term(
            StepView(
                student={"blocks.3": torch.zeros(1, 8, 4, 4)}, teacher={"layer3": torch.zeros(1, 8, 4, 4)}
            )
        )
    for kwargs, pattern in (
        ({"areas": 0}, "areas must be an integer >= 1"),
        ({"min_size": 0.6}, "0 < min_size <= max_size < 1"),
        ({"max_size": 1.0}, "0 < min_size <= max_size < 1"),
        ({"hidden": 0}, "hidden must be an integer >= 1"),
        ({"area_weight": -1.0}, "area_weight must be >= 0"),
    ):
        with pytest.raises(KdkitError, match=pattern) as info:
            DAM(**kwargs)
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------ plot


def test_plot_dam_writes_one_column_per_image(tmp_path):
    term = bound(student=(3, 3, 4, 4), teacher=(3, 5, 4, 4))
    score, boxes, _ = term.detect(torch.randn(3, 3, 4, 4), torch.randn(3, 5, 4, 4))
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    path = plot_dam(images, score, boxes, (4, 4), tmp_path / "dam.png")
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[1] > pixels.shape[0] > 100
