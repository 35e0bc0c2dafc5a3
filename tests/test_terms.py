"""Loss terms: hand-computed values, gradchecks, module == function, properties, and a sweep
over every registered term on two tiny conv nets.

Expected values are derived by hand in the comments, or recomputed with plain math/numpy written
here independently of kdkit (not by calling the code under test).
"""

from __future__ import annotations

import itertools
import math

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
    AT,
    CE,
    DIST,
    DKD,
    DKDLS,
    KD,
    KDLS,
    LOGITS,
    RKD,
    SP,
    FitNet,
    StepView,
    at_loss,
    ce_loss,
    dist_loss,
    dkd_loss,
    fitnet_loss,
    kd_loss,
    pearson_correlation,
    rkd_loss,
    sp_loss,
    standardize_logits,
)

LN = math.log


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> float:
    """Batch mean of sum_c p log(p / q)."""
    return num(np.mean(np.sum(p * np.log(p / q), axis=-1)))


def logits_view(student, teacher=None, labels=None, **kw) -> StepView:
    return StepView(
        student={LOGITS: student}, teacher={} if teacher is None else {LOGITS: teacher}, labels=labels, **kw
    )


def num(x) -> float:
    return x.detach().item() if isinstance(x, torch.Tensor) else float(x)


def close(actual: torch.Tensor, expected: float, tol: float = 1e-9) -> None:
    assert abs(num(actual) - num(expected)) < tol, (num(actual), num(expected))


# --------------------------------------------------------------------------------------- ce


def test_ce_hand_values():
    # sample 1: z = ln[1, 2, 1] -> p = [1/4, 1/2, 1/4], y = 1 -> -ln(1/2) = ln 2
    # sample 2: z = ln[1, 1, 2] -> p = [1/4, 1/4, 1/2], y = 2 -> ln 2
    z = t64([[0.0, LN(2), 0.0], [0.0, 0.0, LN(2)]])
    y = torch.tensor([1, 2])
    close(ce_loss(z, y), LN(2))
    # smoothing eps = 0.3, C = 3: q = 0.7 * onehot + 0.1 -> [0.1, 0.8, 0.1] for sample 1;
    # -(0.1 ln 1/4 + 0.8 ln 1/2 + 0.1 ln 1/4) = 0.2 ln 4 + 0.8 ln 2 = 1.2 ln 2 (sample 2 alike)
    close(ce_loss(z, y, label_smoothing=0.3), 1.2 * LN(2))


def test_ce_label_smoothing_matches_smoothed_target_formula():
    z = rand64(5, 7).detach()
    y = torch.tensor([0, 3, 6, 2, 2])
    eps, c = 0.2, 7
    q = (1 - eps) * np.eye(c)[y.numpy()] + eps / c
    zn = z.numpy()
    log_p = zn - zn.max(1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
    close(ce_loss(z, y, eps), num(np.mean(-(q * log_p).sum(1))))


def test_ce_gradcheck_and_module():
    z = rand64(3, 4)
    y = torch.tensor([0, 3, 1])
    assert gradcheck(lambda a: ce_loss(a, y, 0.1), (z,))
    assert CE.needs_teacher is False and CE.needs_labels is True
    assert CE().teacher_taps() == []
    close(CE(label_smoothing=0.1)(logits_view(z, labels=y)), num(ce_loss(z, y, 0.1)))
    with pytest.raises(KdkitError, match="term 'ce' needs labels"):
        CE()(logits_view(z))


# --------------------------------------------------------------------------------------- kd


def test_kd_hand_value():
    # T = 4. Sample 1: teacher z/T = ln[1, 2, 1] -> p_t = [1/4, 1/2, 1/4]; student zeros -> 1/3 each.
    # KL(p_t || p_s) = 2 * 1/4 ln(3/4) + 1/2 ln(3/2) = 1/2 ln(9/8); times T^2 = 16 -> 8 ln(9/8).
    # Sample 2: identical logits -> 0. Batch mean: 4 ln(9/8).
    teacher = t64([[0.0, 4 * LN(2), 0.0], [1.0, 2.0, 3.0]])
    student = t64([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    close(kd_loss(student, teacher, temperature=4.0), 4 * LN(9 / 8))


def test_kd_properties_gradcheck_and_module():
    s, t = rand64(4, 5, seed=1), rand64(4, 5, seed=2)
    close(kd_loss(t, t), 0.0, 1e-12)
    assert kd_loss(s, t) > 0
    assert gradcheck(lambda a, b: kd_loss(a, b, 3.0), (s, t))
    assert gradcheck(lambda a, b: kd_loss(a, b, 2.0, standardize=True), (s, t))
    close(KD(temperature=3.0)(logits_view(s, t)), num(kd_loss(s, t, 3.0)))
    kd_ls = KDLS()
    assert (kd_ls.temperature, kd_ls.standardize) == (2.0, True)
    close(kd_ls(logits_view(s, t)), num(kd_loss(s, t, 2.0, standardize=True)))


def test_kd_dense_logits_are_per_position_rows():
    s, t = rand64(2, 5, 3, 3, seed=3), rand64(2, 5, 3, 3, seed=4)

    def rows(z):
        return z.permute(0, 2, 3, 1).reshape(-1, 5)

    close(kd_loss(s, t), num(kd_loss(rows(s), rows(t))), 1e-12)


# ------------------------------------------------------------------------ logit standardization


def test_standardize_logits_hand_value():
    # z = [1, 2, 3]: mean 2, population std sqrt(((-1)^2 + 0 + 1^2) / 3) = sqrt(2/3); tau = 2
    # -> (z - 2) / (2 sqrt(2/3)) = [-1, 0, 1] * 0.6123724...
    out = standardize_logits(t64([[1.0, 2.0, 3.0]]), 2.0)
    k = 1 / (2 * math.sqrt(2 / 3))
    torch.testing.assert_close(out, t64([[-k, 0.0, k]]), rtol=0, atol=1e-6)


def test_standardize_logits_zero_mean_and_population_std_one_over_tau():
    z = rand64(6, 10).detach() * 5 + 3
    out = standardize_logits(z, 4.0)
    torch.testing.assert_close(out.mean(-1), torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.std(-1, correction=0), torch.full((6,), 0.25, dtype=torch.float64))
    assert gradcheck(lambda a: standardize_logits(a, 2.0), (rand64(3, 4),))


def test_kd_with_standardization_hand_value():
    # tau = 2. Student [1, 2, 3] -> [-k, 0, k], k = 1 / (2 sqrt(2/3)).
    # Teacher [0, 0, 3]: mean 1, population std sqrt((1 + 1 + 4) / 3) = sqrt(2)
    #   -> [-1, -1, 2] / (2 sqrt 2). Then T^2 * KL(softmax(teacher) || softmax(student)), T = 2.
    k = 1 / (2 * math.sqrt(2 / 3))
    zs = np.array([[-k, 0.0, k]])
    zt = np.array([[-1.0, -1.0, 2.0]]) / (2 * math.sqrt(2))
    expected = 4 * np_kl(np_softmax(zt), np_softmax(zs))
    close(kd_loss(t64([[1.0, 2.0, 3.0]]), t64([[0.0, 0.0, 3.0]]), 2.0, standardize=True), expected, 1e-6)


def test_kd_with_standardization_ignores_student_shift_and_scale():
    s, t = rand64(4, 6, seed=5).detach(), rand64(4, 6, seed=6).detach()
    close(kd_loss(3 * s + 7, t, 2.0, True), num(kd_loss(s, t, 2.0, True)), 1e-6)


# --------------------------------------------------------------------------------------- dkd


def np_tckd_nckd(student: np.ndarray, teacher: np.ndarray, labels: np.ndarray, temperature: float):
    """DKD Eqs. 1-2 spelled out: binary [p_t, 1 - p_t] and the renormalised non-target distribution."""
    tckd, nckd = [], []
    for zs, zt, y in zip(student, teacher, labels, strict=True):
        ps, pt = np_softmax(zs / temperature), np_softmax(zt / temperature)
        bs, bt = np.array([ps[y], 1 - ps[y]]), np.array([pt[y], 1 - pt[y]])
        tckd.append(np.sum(bt * np.log(bt / bs)))
        hs, ht = np.delete(ps, y) / (1 - ps[y]), np.delete(pt, y) / (1 - pt[y])
        nckd.append(np.sum(ht * np.log(ht / hs)))
    return num(np.mean(tckd)), num(np.mean(nckd))


def test_dkd_hand_value():
    # T = 2, target class 0. Sample 1: teacher z/T = ln[2, 1, 1] -> p = [1/2, 1/4, 1/4];
    # student z/T = ln[1, 1, 2] -> p = [1/4, 1/4, 1/2].
    # TCKD: b_T = [1/2, 1/2], b_S = [1/4, 3/4] -> 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3).
    # NCKD: p_hat_T = [1/2, 1/2], p_hat_S = [1/3, 2/3] -> 1/2 ln(3/2) + 1/2 ln(3/4) = 1/2 ln(9/8).
    # alpha = 1, beta = 8, times T^2 = 4: 2 ln(4/3) + 16 ln(9/8). Sample 2 identical -> 0; mean halves.
    teacher = t64([[2 * LN(2), 0.0, 0.0], [0.5, 0.1, 0.3]])
    student = t64([[0.0, 0.0, 2 * LN(2)], [0.5, 0.1, 0.3]])
    labels = torch.tensor([0, 2])
    expected = (2 * LN(4 / 3) + 16 * LN(9 / 8)) / 2
    close(dkd_loss(student, teacher, labels, alpha=1.0, beta=8.0, temperature=2.0), expected)


def test_dkd_beta_zero_is_alpha_tckd_and_alpha_zero_is_beta_nckd():
    s, t = rand64(5, 6, seed=7).detach(), rand64(5, 6, seed=8).detach()
    y = torch.tensor([0, 5, 2, 2, 3])
    tckd, nckd = np_tckd_nckd(s.numpy(), t.numpy(), y.numpy(), 4.0)
    close(dkd_loss(s, t, y, alpha=2.5, beta=0.0, temperature=4.0), 2.5 * tckd * 16)
    close(dkd_loss(s, t, y, alpha=0.0, beta=3.0, temperature=4.0), 3.0 * nckd * 16)


def test_dkd_recovers_kd_with_beta_one_minus_teacher_target_probability():
    # Per sample, KD = TCKD + (1 - p_t^T) NCKD (DKD Sec. 3.1).
    s, t = rand64(1, 5, seed=9).detach(), rand64(1, 5, seed=10).detach()
    y = torch.tensor([3])
    p_target = num(torch.softmax(t / 4.0, -1)[0, 3])
    close(dkd_loss(s, t, y, 1.0, 1 - p_target, 4.0), num(kd_loss(s, t, 4.0)), 1e-12)


def test_dkd_gradcheck_and_module_with_linear_warmup():
    s, t = rand64(3, 5, seed=11), rand64(3, 5, seed=12)
    y = torch.tensor([1, 4, 0])
    assert gradcheck(lambda a, b: dkd_loss(a, b, y, 1.0, 8.0, 4.0), (s, t))
    assert gradcheck(lambda a, b: dkd_loss(a, b, y, 1.0, 8.0, 2.0, True), (s, t))
    full = num(dkd_loss(s, t, y))
    term = DKD()
    assert DKD.needs_labels
    # mdistiller's min(epoch / 20, 1), epoch counted from 1 and fixed within the epoch; kdkit passes the
    # 0-based fractional epoch, so progress 0.0 (first step) and 0.99 are epoch 1: 1/20.
    table = [(0.0, 0.05), (0.99, 0.05), (1.0, 0.1), (4.5, 0.25), (18.99, 0.95), (19.0, 1.0), (35.0, 1.0)]
    for progress, factor in table:
        close(term(logits_view(s, t, y, epoch_progress=progress)), factor * full)
    close(DKD(warmup_epochs=0)(logits_view(s, t, y)), full)
    soft = torch.nn.functional.one_hot(y, 5).double()  # soft labels use their arg-max class
    close(DKD(warmup_epochs=0)(logits_view(s, t, soft)), full)
    dkd_ls = DKDLS(warmup_epochs=0)
    assert (dkd_ls.temperature, dkd_ls.standardize) == (2.0, True)
    close(dkd_ls(logits_view(s, t, y)), num(dkd_loss(s, t, y, 1.0, 8.0, 2.0, True)))


# -------------------------------------------------------------------------------------- dist


def test_pearson_hand_value():
    # u = [1/2, 1/4, 1/4], v = [1/4, 1/4, 1/2], both mean 1/3. Centred: [1/6, -1/12, -1/12] and
    # [-1/12, -1/12, 1/6]; dot = -1/72 + 1/144 - 1/72 = -1/48; squared norms 1/36 + 2/144 = 1/24.
    # rho = (-1/48) / (1/24) = -1/2.
    close(pearson_correlation(t64([0.5, 0.25, 0.25]), t64([0.25, 0.25, 0.5])), -0.5, 1e-6)


def test_dist_hand_value():
    # Y = softmax(Z / T) rows; inter = 1 - mean of row correlations, intra = 1 - mean of column
    # correlations (over the batch); loss = T^2 (beta inter + gamma intra). np.corrcoef is Pearson.
    s, t = rand64(4, 5, seed=13).detach(), rand64(4, 5, seed=14).detach()
    temperature, beta, gamma = 2.0, 1.5, 0.5
    ys, yt = np_softmax(s.numpy() / temperature), np_softmax(t.numpy() / temperature)
    inter = 1 - np.mean([np.corrcoef(ys[i], yt[i])[0, 1] for i in range(4)])
    intra = 1 - np.mean([np.corrcoef(ys[:, j], yt[:, j])[0, 1] for j in range(5)])
    expected = temperature**2 * (beta * inter + gamma * intra)
    close(dist_loss(s, t, beta, gamma, temperature), expected, 1e-6)


def test_dist_properties_gradcheck_and_module():
    s, t = rand64(4, 5, seed=15), rand64(4, 5, seed=16)
    close(dist_loss(t, t), 0.0, 1e-12)
    assert gradcheck(lambda a, b: dist_loss(a, b, 1.0, 2.0, 3.0), (s, t))
    close(DIST(gamma=2.0)(logits_view(s, t)), num(dist_loss(s, t, 1.0, 2.0, 1.0)))


# ------------------------------------------------------------------------------------ fitnet


def test_fitnet_hand_value_and_gradcheck():
    # student [[1, 2], [3, 4]], teacher zeros: (1 + 4 + 9 + 16) / 4 = 7.5
    close(fitnet_loss(t64([[[[1.0, 2.0], [3.0, 4.0]]]]), torch.zeros(1, 1, 2, 2, dtype=torch.float64)), 7.5)
    assert gradcheck(fitnet_loss, (rand64(2, 3, 2, 2, seed=1), rand64(2, 3, 2, 2, seed=2)))


def test_fitnet_module_uses_its_connector():
    term = FitNet(student_tap="a", teacher_tap="b")
    term.bind({"a": torch.Size((2, 4, 8, 8))}, {"b": torch.Size((2, 6, 4, 4))})
    s, t = torch.randn(3, 4, 8, 8), torch.randn(3, 6, 4, 4)
    close(term(StepView(student={"a": s}, teacher={"b": t})), num(fitnet_loss(term.connector(s), t)), 1e-6)


def test_fitnet_map_to_tokens_compares_grid_tokens_only():
    term = FitNet(student_tap="a", teacher_tap="b")
    term.bind({"a": torch.Size((2, 4, 4, 4))}, {"b": torch.Size((2, 5, 4))})  # class token + 2x2 grid
    s, t = torch.randn(3, 4, 4, 4), torch.randn(3, 5, 4)
    expected = fitnet_loss(term.connector(s), t[:, 1:])
    close(term(StepView(student={"a": s}, teacher={"b": t})), num(expected), 1e-6)


# ---------------------------------------------------------------------------------------- at


def test_at_hand_value():
    # Student (1, 2, 1, 2): channel 0 = [1, 0], channel 1 = [1, 2]. mean_c F^2 = [(1+1)/2, (0+4)/2]
    # = [1, 2] -> normalised [1, 2] / sqrt 5. Teacher (1, 1, 1, 2) = [3, 0] -> [9, 0] -> [1, 0].
    # mean((a_s - a_t)^2) = ((1/sqrt5 - 1)^2 + 4/5) / 2 = (2 - 2/sqrt5) / 2 = 1 - 1/sqrt5.
    student = t64([[[[1.0, 0.0]], [[1.0, 2.0]]]])
    teacher = t64([[[[3.0, 0.0]]]])
    close(at_loss(student, teacher), 1 - 1 / math.sqrt(5))


def test_at_properties_gradcheck_and_module():
    s, t = rand64(2, 3, 4, 4, seed=17), rand64(2, 5, 4, 4, seed=18)
    sd, td = s.detach(), t.detach()
    # invariant to rescaling either feature map (attention maps are L2-normalised)
    close(at_loss(3 * sd, 0.5 * td), num(at_loss(sd, td)), 1e-12)
    close(at_loss(sd, sd), 0.0, 1e-12)
    # a 4x4 map built from 2x2 blocks pools (adaptive avg) to the attention of the 2x2 map
    small = rand64(2, 3, 2, 2, seed=19).detach()
    big = small.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    t_small = rand64(2, 5, 2, 2, seed=20).detach()
    close(at_loss(big, t_small), num(at_loss(small, t_small)), 1e-12)
    # ViT tokens (class token + 2x2 grid) are folded onto their grid
    tokens = rand64(2, 5, 3, seed=21).detach()
    close(at_loss(tokens, t_small), num(at_loss(tokens[:, 1:].transpose(1, 2).reshape(2, 3, 2, 2), t_small)))
    assert gradcheck(at_loss, (s, t))
    assert gradcheck(lambda a, b: at_loss(a, b, 3.0), (rand64(2, 3, 4, 4, seed=22), t_small.requires_grad_()))
    term = AT(student_taps=["a", "b"], teacher_taps=["c", "d"])
    view = StepView(student={"a": sd, "b": small}, teacher={"c": td, "d": t_small})
    close(term(view), num(at_loss(sd, td)) + num(at_loss(small, t_small)), 1e-12)


def test_at_bind_rejects_vectors():
    term = AT(student_taps=["fc:input"], teacher_taps=["layer3"])
    with pytest.raises(KdkitError, match="term 'at' needs feature maps.*student tap 'fc:input'"):
        term.bind({"fc:input": torch.Size((2, 8))}, {"layer3": torch.Size((2, 8, 4, 4))})


# ---------------------------------------------------------------------------------------- sp


def test_sp_hand_value():
    # b = 2. Student rows e1, e2 -> G_s = I (rows already unit). Teacher rows [1, 0], [1, 0]
    # -> G = ones -> normalised rows [1, 1] / sqrt 2. ||G_s - G_t||_F^2 =
    # 2 (1 - 1/sqrt2)^2 + 2 (1/sqrt2)^2 = (3 - 2 sqrt2) + 1 = 4 - 2 sqrt2; / b^2 -> 1 - sqrt2 / 2.
    close(sp_loss(t64([[1.0, 0.0], [0.0, 1.0]]), t64([[1.0, 0.0], [1.0, 0.0]])), 1 - math.sqrt(2) / 2)


def test_sp_properties_gradcheck_and_module():
    s, t = rand64(4, 3, 2, 2, seed=23), rand64(4, 7, seed=24)  # shapes differ: only b matters
    sd, td = s.detach(), t.detach()
    rotation = torch.linalg.qr(rand64(12, 12, seed=25).detach())[0]
    rotated = (sd.flatten(1) @ rotation).reshape_as(sd)
    # G = F F^T is unchanged by an orthogonal map of the features; row normalisation removes scale
    close(sp_loss(5 * rotated, td), num(sp_loss(sd, td)), 1e-12)
    assert gradcheck(sp_loss, (s, t))
    term = SP(student_taps=["a"], teacher_taps=["b"])
    close(term(StepView(student={"a": sd}, teacher={"b": td})), num(sp_loss(sd, td)))


# --------------------------------------------------------------------------------------- rkd


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def np_rkd_parts(s: list[list[float]], t: list[list[float]]) -> tuple[float, float]:
    """RKD Sec. 3.2 with loops: distances / mean distance of distinct pairs, cosines at vertex i."""
    b = len(s)

    def dist(e):
        d = [[math.dist(e[i], e[j]) for j in range(b)] for i in range(b)]
        mu = sum(map(sum, d)) / (b * (b - 1))
        return [[x / mu for x in row] for row in d]

    def cos(e, i, j, k):
        if j == i or k == i:
            return 0.0
        u = [a - c for a, c in zip(e[j], e[i], strict=True)]
        v = [a - c for a, c in zip(e[k], e[i], strict=True)]
        return sum(x * y for x, y in zip(u, v, strict=True)) / (math.hypot(*u) * math.hypot(*v))

    ds, dt = dist(s), dist(t)
    loss_d = sum(huber(ds[i][j] - dt[i][j]) for i in range(b) for j in range(b)) / b**2
    triples = list(itertools.product(range(b), repeat=3))
    loss_a = sum(huber(cos(s, *ijk) - cos(t, *ijk)) for ijk in triples) / b**3
    return loss_d, loss_a


def test_rkd_hand_value():
    # Student: right isosceles triangle (0,0), (1,0), (0,1): distances 1, 1, sqrt2,
    # mu = (2 + sqrt2) / 3. Teacher: collinear (0,0), (1,0), (2,0): distances 1, 2, 1, mu = 4/3.
    # Normalised differences: pair (0,1): 3/(2+sqrt2) - 3/4 = 0.1287; (0,2): 3/(2+sqrt2) - 3/2;
    # (1,2): 3 sqrt2/(2+sqrt2) - 3/4. All |x| < 1 -> Huber = x^2 / 2, each pair counted twice,
    # over 9 entries: loss_d = (x01^2 + x02^2 + x12^2) / 9.
    s, t = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]]
    r = 3 / (2 + math.sqrt(2))
    loss_d = ((r - 0.75) ** 2 + (r - 1.5) ** 2 + (math.sqrt(2) * r - 0.75) ** 2) / 9
    close(rkd_loss(t64(s), t64(t), 1.0, 0.0), loss_d)
    # the loop implementation agrees on the distance part, and gives the angle part
    loop_d, loop_a = np_rkd_parts(s, t)
    assert abs(loop_d - loss_d) < 1e-12
    close(rkd_loss(t64(s), t64(t), 0.0, 1.0), loop_a)
    close(rkd_loss(t64(s), t64(t)), 25 * loss_d + 50 * loop_a)


def test_rkd_random_matches_loops_and_similarity_invariance():
    s, t = rand64(5, 4, seed=26).detach(), rand64(5, 6, seed=27).detach()
    loop_d, loop_a = np_rkd_parts(s.tolist(), t.tolist())
    close(rkd_loss(s, t, 2.0, 3.0), 2 * loop_d + 3 * loop_a)
    # distances and angles are invariant to rotation, translation and scaling of the embedding
    rotation = torch.linalg.qr(rand64(4, 4, seed=28).detach())[0]
    moved = 7.0 * s @ rotation + 3.0
    close(rkd_loss(moved, s), 0.0, 1e-10)
    close(rkd_loss(s * 10, t, 1.0, 0.0), num(rkd_loss(s, t, 1.0, 0.0)), 1e-12)


def test_rkd_gradcheck_and_module():
    s, t = rand64(4, 3, seed=29), rand64(4, 5, seed=30)
    assert gradcheck(rkd_loss, (s, t))
    assert gradcheck(rkd_loss, (rand64(3, 2, 2, 2, seed=31), rand64(3, 4, seed=32)))  # maps flattened
    term = RKD(student_tap="e", teacher_tap="f", angle_weight=10.0)
    close(term(StepView(student={"e": s}, teacher={"f": t})), num(rkd_loss(s, t, 25.0, 10.0)))


# ------------------------------------------------------------------------------ tap resolution


class TinyConvNet(nn.Module):
    """A small CNN declaring its taps like a zoo model: stage outputs and the classifier input."""

    def __init__(self, widths: tuple[int, ...], num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
        channels = widths[0]
        for i, width in enumerate(widths):
            stage = nn.Sequential(
                nn.Conv2d(channels, width, 3, stride=1 if i == 0 else 2, padding=1),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            )
            self.add_module(f"layer{i + 1}", stage)
            channels = width
        self.fc = nn.Linear(channels, num_classes)
        self.feature_taps = tuple(f"layer{i + 1}" for i in range(len(widths)))
        self.embedding_tap = "fc:input"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for name in self.feature_taps:
            x = self.get_submodule(name)(x)
        return self.fc(x.mean((2, 3)))


def student_teacher() -> tuple[TinyConvNet, TinyConvNet]:
    torch.manual_seed(0)
    # 8x8 inputs: student stages at 8, 4, 2; teacher stages at 8, 4, 2, 1 with other widths
    return TinyConvNet((4, 8, 8)), TinyConvNet((6, 8, 12, 16))


class TinySegNet(nn.Module):
    """A small fully convolutional net declaring its taps like a segmentation zoo model.

    ``front`` names the first block (``spirit``'s default taps: the student's ``extractor``, the
    teacher's ``backbone``); stride-2 stages follow and a 1x1 classifier whose score map is
    upsampled to the input size.
    """

    def __init__(self, front: str, widths: tuple[int, ...], num_classes: int = 5) -> None:
        super().__init__()

        def block(c_in: int, c_out: int, stride: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.ReLU())

        self.add_module(front, block(3, widths[0], 1))
        self.front = front
        for i, (c_in, c_out) in enumerate(zip(widths, widths[1:])):
            self.add_module(f"layer{i + 1}", block(c_in, c_out, 2))
        self.classifier = nn.Conv2d(widths[-1], num_classes, 1)
        self.feature_taps = tuple(f"layer{i + 1}" for i in range(len(widths) - 1))
        self.embedding_tap = "classifier:input"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        x = self.get_submodule(self.front)(x)
        for name in self.feature_taps:
            x = self.get_submodule(name)(x)
        return nn.functional.interpolate(self.classifier(x), size=size, mode="bilinear", align_corners=False)


# Terms that need score maps and masks: swept on TinySegNet with dense labels (255 = ignore).
SEGMENTATION_TERMS = {"cwd", "i2ckd", "spirit"}


def seg_student_teacher() -> tuple[TinySegNet, TinySegNet]:
    torch.manual_seed(0)
    # 8x8 inputs: student embedding 8 channels at 4x4, teacher 16 channels at 2x2; fronts 4 vs 6 wide
    return TinySegNet("extractor", (4, 8)), TinySegNet("backbone", (6, 12, 16))


def test_default_taps_from_declared_model_taps():
    student, teacher = student_teacher()
    cases = [
        (FitNet(), ["layer2"], ["layer3"]),  # feature_taps[len // 2]
        (AT(), ["layer1", "layer2", "layer3"], ["layer2", "layer3", "layer4"]),  # last min(3, 4)
        (AT(student_taps="layer3"), ["layer3"], ["layer4"]),  # other side: last len(given)
        (SP(), ["layer3"], ["layer4"]),
        (RKD(), ["fc:input"], ["fc:input"]),
        (FitNet(student_tap="layer1"), ["layer1"], ["layer3"]),
    ]
    for term, s_taps, t_taps in cases:
        term.resolve_taps(student, teacher)
        assert (term.student_taps(), term.teacher_taps()) == (s_taps, t_taps)
    same = AT()
    same.resolve_taps(student, student)
    assert same.teacher_taps() == ["layer1", "layer2", "layer3"]  # equal stage counts: all


def test_unresolvable_taps_raise_naming_term_and_argument():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    _, teacher = student_teacher()
    with pytest.raises(KdkitError, match=r"term 'fitnet' needs `student_tap`.*no `feature_taps`"):
        FitNet().resolve_taps(plain, teacher)
    with pytest.raises(KdkitError, match=r"term 'rkd' needs `teacher_tap`.*no `embedding_tap`"):
        RKD(student_tap="1").resolve_taps(plain, plain)
    with pytest.raises(KdkitError, match=r"term 'sp' needs `student_taps`"):
        SP().resolve_taps(plain, teacher)
    with pytest.raises(KdkitError, match=r"term 'fitnet' has no `student_tap`"):
        FitNet().student_taps()
    with pytest.raises(KdkitError, match=r"term 'at' pairs student_taps with teacher_taps.*2 and 1"):
        AT(student_taps=["a", "b"], teacher_taps=["c"])
    with pytest.raises(KdkitError, match=r"term 'at' needs 5 teacher taps.*declares only 4"):
        AT(student_taps=["a", "b", "c", "d", "e"]).resolve_taps(plain, teacher)


# ------------------------------------------------------------------------- registered terms


# Detection terms read detector outputs and FPN levels: swept on tiny detectors in test_det_terms.py
# and test_fgd.py.
DETECTION_MODULES = ("kdkit.terms.detection", "kdkit.terms.dense_kd", "kdkit.terms.fgd")


@pytest.mark.parametrize(
    "name", [n for n in TERMS.names() if TERMS.get(n).__module__ not in DETECTION_MODULES]
)
def test_every_registered_term_trains_on_real_taps(name):
    dense = name in SEGMENTATION_TERMS
    student, teacher = seg_student_teacher() if dense else student_teacher()
    term = TERMS.build(name)
    term.resolve_taps(student, teacher)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6, 8, 8) if dense else (6,))
    if dense:
        y[:, :2, :3] = 255
    s_shapes = dry_run(student, x[:2], term.student_taps(), "student")
    t_shapes = dry_run(teacher, x[:2], term.teacher_taps(), "teacher")
    term.bind(s_shapes, t_shapes)
    term.bind_data(10)  # a training set of 10 samples; the batch holds samples 2..7
    s_taps, t_taps = Taps(student, term.student_taps()), Taps(teacher, term.teacher_taps())
    with torch.no_grad():
        t_out = t_taps(x) if term.needs_teacher else {}
    view = StepView(
        student=s_taps(x), teacher=t_out, labels=y, epoch=5, epoch_progress=5.5, indices=torch.arange(2, 8)
    )
    loss = term(view)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for param_name, param in term.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    if name in {"fitnet", "i2ckd", "spirit"}:
        assert list(term.parameters()), f"{name} should own a connector with parameters here"
