"""ReviewKD (Chen et al. 2021): HCL against hand-worked values, ABF fusion with hand-set weights, the
deep-to-shallow review order, float64 gradient checks, warm-up, taps and the engine's dry run on zoo
models. Expected values are worked out in the comments, not by calling the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from _tensors import rand64, t64
from torch import nn
from torch.autograd import gradcheck
from torch.func import functional_call

from kdkit.engine.distiller import Distiller, WeightedTerm
from kdkit.errors import KdkitError
from kdkit.models import build_model
from kdkit.registry import TERMS
from kdkit.terms import CE, ReviewKD, StepView, hcl_loss
from kdkit.terms.review import ABF, review_features

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def close(actual: torch.Tensor, expected: float, tol: float = 1e-12) -> None:
    assert abs(actual.item() - expected) <= tol * max(1.0, abs(expected)), (actual.item(), expected)


# ------------------------------------------------------------------------------------------ HCL


def test_hcl_hand_values_on_2x2_and_4x4_maps():
    # 2x2 level: diff = s - t = [[0, 1], [2, 3]]. Pool sizes 4 and 2 are not below H = 2, so only 1x1
    # is used, with weight 1/2. Full MSE = (0 + 1 + 4 + 9) / 4 = 3.5; the 1x1 pool of the diff is
    # 1.5, MSE 2.25. HCL = (3.5 + 0.5 * 2.25) / 1.5 = 4.625 / 1.5 = 37 / 12.
    s_a, t_a = t64([[[[1.0, 2.0], [3.0, 4.0]]]]), torch.ones(1, 1, 2, 2, dtype=torch.float64)
    close(hcl_loss([s_a], [t_a]), 37 / 12)
    # 4x4 level: s = 0..15 row-major, t = 0. Size 4 is skipped (4 >= H), 2 and 1 get 1/2 and 1/4.
    # Full MSE = sum k^2 / 16 = 1240 / 16 = 77.5. 2x2 pooled = [[2.5, 4.5], [10.5, 12.5]]: MSE
    # (6.25 + 20.25 + 110.25 + 156.25) / 4 = 73.25. 1x1 pooled = 7.5: MSE 56.25.
    # HCL = (77.5 + 0.5 * 73.25 + 0.25 * 56.25) / 1.75 = 128.1875 / 1.75 = 73.25.
    s_b = torch.arange(16, dtype=torch.float64).reshape(1, 1, 4, 4)
    t_b = torch.zeros_like(s_b)
    close(hcl_loss([s_b], [t_b]), 73.25)
    # Levels are summed.
    close(hcl_loss([s_a, s_b], [t_a, t_b]), 37 / 12 + 73.25)


def test_hcl_8x8_uses_every_pool_size_with_halving_weights():
    # diff = 1 on the top-left 4x4 quadrant of an 8x8 map, 0 elsewhere. Full MSE = 16 / 64 = 0.25;
    # pooled to 4x4 the quadrant is the top-left 2x2 block of ones: MSE 4 / 16 = 0.25; pooled to 2x2 it
    # is one 1 of four: 0.25; pooled to 1x1 the mean is 0.25: MSE 0.0625. Weights 1, 1/2, 1/4, 1/8
    # (sum 1.875): (0.25 + 0.125 + 0.0625 + 0.0078125) / 1.875 = 0.4453125 / 1.875 = 0.2375.
    s = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    s[..., :4, :4] = 1.0
    close(hcl_loss([s], [torch.zeros_like(s)]), 0.2375)
    # A checkerboard of +-1 vanishes under every pooling: only the full MSE (1) survives, over 1.875.
    board = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1.0
    board = board.to(torch.float64).expand(1, 1, 8, 8)
    close(hcl_loss([board], [torch.zeros_like(board)]), 1 / 1.875)
    # A 1x1 map (the embedding level) is the MSE alone: (3^2 + 4^2) / 2 = 12.5.
    close(hcl_loss([t64([[[[3.0]], [[4.0]]]])], [torch.zeros(1, 2, 1, 1, dtype=torch.float64)]), 12.5)
    # Other pool sizes: [2] on the quadrant map: (0.25 + 0.5 * 0.25) / 1.5 = 0.25.
    close(hcl_loss([s], [torch.zeros_like(s)], pool_sizes=[2]), 0.25)


def test_hcl_rejects_unpaired_or_mismatched_maps():
    a = torch.zeros(1, 2, 4, 4)
    with pytest.raises(KdkitError, match="equal shape"):
        hcl_loss([a], [torch.zeros(1, 3, 4, 4)])
    with pytest.raises(KdkitError, match="1 and 2"):
        hcl_loss([a], [a, a])


# ------------------------------------------------------------------------------------------ ABF


def identity_bn(bn: nn.BatchNorm2d) -> None:
    """Eval-mode batch norm that is exactly the identity (running mean 0, variance 1, eps 0)."""
    bn.eps = 0.0
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)


def test_abf_fusion_hand_values():
    abf = ABF(1, 1, 1, fuse=True).double().eval()
    with torch.no_grad():
        abf.reduce[0].weight.fill_(2.0)  # x_mid = 2 x
        identity_bn(abf.reduce[1])
        att = abf.attention[0]
        att.weight.zero_()
        att.weight[0, 0] = 1.0  # a0 = sigmoid(x_mid): the concat's first channel is this level
        att.weight[1, 1] = 0.5  # a1 = sigmoid(deeper / 2 - 4): its second channel is the deeper map
        att.bias.copy_(t64([0.0, -4.0]))
        abf.out[0].weight.zero_()
        abf.out[0].weight[0, 0, 1, 1] = 1.0  # 3x3 conv with only its centre: the identity
        identity_bn(abf.out[1])
    x = t64([[[[0.5, 1.0], [-1.0, 0.0]]]])
    deeper = t64([[[[8.0]]]])  # 1x1, nearest-upsampled to 2x2: 8 everywhere, a1 = sigmoid(0) = 1/2
    out, fused = abf(x, deeper)
    # fused = v * sigmoid(v) + 8 * 1/2 with v = 2x in {1, 2, -2, 0}
    expected = [[v / (1 + math.exp(-v)) + 4.0 for v in row] for row in ([1.0, 2.0], [-2.0, 0.0])]
    assert torch.allclose(fused, t64([[expected]]), atol=1e-12)
    assert torch.allclose(out, fused, atol=1e-12)
    # A teacher grid of 4x4: the fused 2x2 map is resized (nearest) before the output conv, and the
    # map handed to the next level stays at this level's 2x2.
    out4, fused2 = abf(x, deeper, out_size=(4, 4))
    assert fused2.shape[-2:] == (2, 2)
    big = t64([[expected]]).repeat_interleave(2, -1).repeat_interleave(2, -2)
    # the 3x3 identity conv sees the 4x4 map with zero padding: still the identity
    assert torch.allclose(out4, big, atol=1e-12)


def test_review_goes_from_deep_to_shallow():
    torch.manual_seed(0)
    abfs = [ABF(2, 3, 4, fuse=True), ABF(3, 3, 5, fuse=True), ABF(4, 3, 6, fuse=False)]
    for abf in abfs:
        abf.double().eval()
    feats = [rand64(2, 2, 8, 8, seed=1), rand64(2, 3, 4, 4, seed=2), rand64(2, 4, 2, 2, seed=3)]
    outs = review_features(abfs, feats, [(8, 8), (4, 4), (2, 2)])
    assert [tuple(o.shape) for o in outs] == [(2, 4, 8, 8), (2, 5, 4, 4), (2, 6, 2, 2)]

    def reaches(out: torch.Tensor) -> list[bool]:
        grads = torch.autograd.grad(out.sum(), feats, retain_graph=True, allow_unused=True)
        return [g is not None and bool(g.abs().sum() > 0) for g in grads]

    assert reaches(outs[2]) == [False, False, True]  # the deepest level is mapped alone
    assert reaches(outs[1]) == [False, True, True]  # level 2 fuses level 3
    assert reaches(outs[0]) == [True, True, True]  # the shallowest reviews everything below it


def test_gradcheck_abf_review_and_hcl_float64():
    torch.manual_seed(0)
    abfs = [ABF(2, 3, 2, fuse=True).double(), ABF(3, 3, 3, fuse=False).double()]  # training mode BN
    s1, s2 = rand64(2, 2, 4, 4, seed=4), rand64(2, 3, 2, 2, seed=5)
    t1, t2 = rand64(2, 2, 4, 4, seed=6), rand64(2, 3, 2, 2, seed=7)

    def loss(a, b, c, d):
        return hcl_loss(review_features(abfs, [a, b], [(4, 4), (2, 2)]), [c, d])

    assert gradcheck(loss, (s1, s2, t1, t2), eps=1e-6, atol=1e-6)

    # and through the fusion's own parameters (the attention conv and the 1x1 reduction before it)
    fusing = abfs[0]
    names = ["attention.0.weight", "attention.0.bias", "reduce.0.weight"]
    params = tuple(fusing.get_parameter(n).detach().clone().requires_grad_(True) for n in names)

    def through_params(*values):
        def run(x, deeper):
            return functional_call(fusing, dict(zip(names, values, strict=True)), (x, deeper, (4, 4)))[0]

        out = run(s1, abfs[1](s2, None, (2, 2))[1])
        return hcl_loss([out], [t1])

    assert gradcheck(through_params, params, eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------- term


def bound_term(**kwargs) -> ReviewKD:
    term = ReviewKD(student_taps=["a", "b", "e"], teacher_taps=["x", "y", "z"], **kwargs)
    term.bind(
        {"a": torch.Size([2, 2, 4, 4]), "b": torch.Size([2, 3, 2, 2]), "e": torch.Size([2, 3])},
        {"x": torch.Size([2, 4, 8, 8]), "y": torch.Size([2, 5, 4, 4]), "z": torch.Size([2, 6])},
    )
    return term.double()


def test_bind_builds_abfs_from_shapes():
    term = bound_term()
    # levels shallow to deep; mid channels min(512, deepest student channels) = 3; teacher channels out
    assert [abf.reduce[0].in_channels for abf in term.abfs] == [2, 3, 3]
    assert [abf.reduce[0].out_channels for abf in term.abfs] == [3, 3, 3]
    assert [abf.out[0].out_channels for abf in term.abfs] == [4, 5, 6]
    assert [abf.attention is None for abf in term.abfs] == [False, False, True]
    assert term.out_sizes == [(8, 8), (4, 4), (1, 1)]
    assert bound_term(mid_channels=7).abfs[0].reduce[0].out_channels == 7
    wide = ReviewKD(student_taps=["a"], teacher_taps=["x"])
    wide.bind({"a": torch.Size([2, 600, 4, 4])}, {"x": torch.Size([2, 8, 4, 4])})
    assert wide.abfs[0].reduce[0].out_channels == 512  # capped as in the code


def test_module_is_warmup_times_hcl_of_the_review():
    torch.manual_seed(0)
    term = bound_term()
    s = {"a": rand64(2, 2, 4, 4, seed=1), "b": rand64(2, 3, 2, 2, seed=2), "e": rand64(2, 3, seed=3)}
    t = {"x": rand64(2, 4, 8, 8, seed=4), "y": rand64(2, 5, 4, 4, seed=5), "z": rand64(2, 6, seed=6)}
    maps = [s["a"], s["b"], s["e"][:, :, None, None]]  # the (B, C) embedding is a 1x1 level
    outs = review_features(list(term.abfs), maps, [(8, 8), (4, 4), (1, 1)])
    full = hcl_loss(outs, [t["x"], t["y"], t["z"][:, :, None, None]])
    # the authors' CIFAR factor min(epoch / 20, 1) with a 0-based epoch fixed within the epoch
    for progress, factor in [(0.0, 0.0), (0.99, 0.0), (1.0, 0.05), (10.5, 0.5), (20.0, 1.0), (33.3, 1.0)]:
        close(term(StepView(student=s, teacher=t, epoch_progress=progress)), factor * full.item())
    assert bound_term(warmup_epochs=0).warmup_factor(0.0) == 1.0
    assert bound_term(warmup_epochs=4).warmup_factor(2.5) == 0.5


def test_bad_arguments_shapes_and_order_raise_one_line_errors():
    for kwargs, pattern in [
        ({"mid_channels": 0}, "mid_channels must be a positive integer"),
        ({"pool_sizes": [1, 2]}, "pool_sizes must be positive integers, largest first"),
        ({"warmup_epochs": -1}, "warmup_epochs must be a number >= 0"),
    ]:
        with pytest.raises(KdkitError, match=pattern):
            ReviewKD(**kwargs)
    term = ReviewKD(student_taps=["deep", "shallow"], teacher_taps=["x", "y"])
    size = torch.Size
    teacher = {"x": size([2, 4, 4, 4]), "y": size([2, 2, 8, 8])}
    with pytest.raises(KdkitError, match=r"'shallow' \(8x8\) is larger .* list student_taps shallow to deep"):
        term.bind({"deep": size([2, 4, 4, 4]), "shallow": size([2, 2, 8, 8])}, teacher)
    student = {"deep": size([2, 2, 8, 8]), "shallow": size([2, 4, 4, 4])}
    with pytest.raises(KdkitError, match=r"teacher tap 'y' has shape \(2, 3, 2, 2, 2\)") as info:
        term.bind(student, {**teacher, "y": size([2, 3, 2, 2, 2])})
    assert "\n" not in str(info.value)
    with pytest.raises(KdkitError, match="no ABF modules yet"):
        ReviewKD(student_taps=["a"], teacher_taps=["x"])(StepView(student={}, teacher={}))


def test_default_taps_are_stages_then_embedding():
    student, teacher = build_model("resnet8", num_classes=5), build_model("resnet20", num_classes=5)
    term = ReviewKD()
    term.resolve_taps(student, teacher)
    assert term.student_taps() == term.teacher_taps() == ["layer1", "layer2", "layer3", "fc:input"]
    plain = ReviewKD(embedding=False)
    plain.resolve_taps(student, teacher)
    assert plain.student_taps() == ["layer1", "layer2", "layer3"]
    del student.embedding_tap
    with pytest.raises(
        KdkitError, match=r"student model declares no `embedding_tap`; set `embedding: false`"
    ):
        ReviewKD().resolve_taps(student, teacher)


def test_reviewkd_on_zoo_models_through_the_distiller_dry_run():
    torch.manual_seed(0)
    assert TERMS.get("reviewkd") is ReviewKD
    student, teacher = build_model("resnet8", num_classes=10), build_model("resnet20", num_classes=10)
    term = ReviewKD()
    distiller = Distiller(
        student, teacher, [[WeightedTerm("ce", 1.0, CE()), WeightedTerm("reviewkd", 1.0, term)]]
    )
    shapes = distiller.setup(torch.randn(2, 3, 16, 16))  # 16x16 inputs keep the test fast
    assert shapes["teacher"]["layer3"] == (2, 64, 4, 4) and shapes["student"]["fc:input"] == (2, 64)
    # paper/code for resnet students: in = out = [16, 32, 64, 64], mid 64, 4 ABFs (3 fusing)
    assert [a.out[0].out_channels for a in term.abfs] == [16, 32, 64, 64]
    assert {a.reduce[0].out_channels for a in term.abfs} == {64}
    assert set(map(id, term.parameters())) <= set(map(id, distiller.trainable_term_parameters()))
    distiller.train()
    images, labels = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    total, parts, _ = distiller(images, labels, epoch=20, epoch_progress=20.0)
    assert torch.isfinite(parts["reviewkd"]) and parts["reviewkd"] > 0
    total.backward()
    for name, param in term.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for name in ("stem.0.weight", "layer1.0.conv1.0.weight", "layer3.0.conv2.0.weight"):
        assert student.get_parameter(name).grad.abs().sum() > 0, name
    assert all(p.grad is None for p in teacher.parameters())
    distiller.release_taps()
