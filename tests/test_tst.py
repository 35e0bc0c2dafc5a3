"""The ``tst`` refiner (Shao et al. 2023): Eq. 2, 4 and 5 against hand values, gradients through the frozen
teacher and student, the segmentation variant's identical warps of image and mask, and a 2-process run
whose refiner parameters match one process with the same global batch; the detection variant: boxes
moved with the image, stage II over the detectors' own losses."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from torch import nn

from kdkit.engine.checkpoint import load_checkpoint
from kdkit.models import build_model
from kdkit.refiners.base import RefinerContext
from kdkit.refiners.tst import TSTRefiner, anti_ce, anti_loss, relaxed_bernoulli
from kdkit.refiners.tst_encoders import THETA_DIM, make_encoder
from kdkit.refiners.tst_ops import MAGNITUDE_OPS, PRIMITIVES, affine_matrix, warp, warp_boxes


def context(task="classification", ignore_index=-100):
    return RefinerContext(
        task=task,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        device=torch.device("cpu"),
        build_dataset=lambda *a: None,
        ignore_index=ignore_index,
    )


def refiner_with(encoders: dict[str, nn.Module], size=(8, 8), task="classification", **kwargs):
    """A TST refiner whose meta-encoders are given (no stage I fit)."""
    refiner = TSTRefiner(**kwargs)
    refiner.setup(context(task, ignore_index=255 if task == "segmentation" else -100))
    refiner.encoders = nn.ModuleDict(encoders)
    for p in refiner.encoders.parameters():
        p.requires_grad_(False)
    refiner.size = size
    return refiner


def translate_encoder(pixels: int, width: int) -> nn.Module:
    """An affine meta-encoder set by hand to shift by ``pixels * m`` pixels along x."""
    encoder = make_encoder("TranslateX")
    with torch.no_grad():
        encoder.fc.weight[2, THETA_DIM] = 2.0 * pixels / width  # A[0, 2] = (2k / W) m
    return encoder


def test_relaxed_bernoulli_and_anti_ce_by_hand():
    assert relaxed_bernoulli(torch.tensor(0.0), torch.tensor(0.0), 0.05).item() == 0.5
    value = relaxed_bernoulli(torch.tensor(0.1), torch.tensor(-0.05), 0.05).item()
    assert value == pytest.approx(1 / (1 + math.exp(-1.0)))  # sigmoid((0.1 - 0.05) / 0.05)
    # p = softmax([0, ln 3]) = [1/4, 3/4]: CE(1 - p, y=1) = -log(1/4), CE(1 - p, y=0) = -log(3/4)
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    assert anti_ce(logits, torch.tensor([1, 0]), -100).item() == pytest.approx(
        (math.log(4.0) + math.log(4.0 / 3.0)) / 2
    )
    assert anti_ce(logits, torch.tensor([1, -100]), -100).item() == pytest.approx(math.log(4.0))


def test_zero_probabilities_give_x_hat_equal_to_x():
    encoders = {name: make_encoder(name) for name in MAGNITUDE_OPS}
    refiner = refiner_with(encoders, num_ops=len(PRIMITIVES))
    with torch.no_grad():
        refiner.theta_p.fill_(-1e4)  # sigmoid(-1e4) = 0; RBD of it is exactly 0
    x = torch.rand(4, 3, 8, 8)
    x_hat, _ = refiner.augment(x, None, torch.Generator().manual_seed(0), 4, 0)
    assert torch.equal(x_hat, x)


def test_eq5_sum_with_probability_one_by_hand():
    """Invert and a 2-px shift at p = 1, m = 1: x_hat = x + (1 - x - x) + (shift(x) - x)."""
    refiner = refiner_with(
        {"TranslateX": translate_encoder(2, 8)}, primitives=["TranslateX", "Invert"], num_ops=2
    )
    with torch.no_grad():
        refiner.theta_p.fill_(1e4)
        refiner.theta_m.fill_(1e4)
    x = torch.rand(2, 3, 8, 8) * 0.2 + 0.4  # stays inside [0, 1] after the sum
    x_hat, _ = refiner.augment(x, None, torch.Generator().manual_seed(1), 2, 0)
    signs = refiner._draws(torch.Generator().manual_seed(1), 2, 0, 2)
    z = signs["z"].tolist()
    sign = signs["sign"][:, z.index(0)]  # the sign drawn for TranslateX's slot, per image
    for i in range(2):
        k = 2 if sign[i] > 0 else -2
        shifted = torch.zeros_like(x[i])
        if k > 0:
            shifted[..., : 8 - k] = x[i][..., k:]
        else:
            shifted[..., -k:] = x[i][..., :k]
        expected = (x[i] + (1 - x[i] - x[i]) + (shifted - x[i])).clamp(0, 1)
        assert torch.allclose(x_hat[i], expected, atol=1e-6)


def full_translation(pixels: int, size: tuple[int, int], task: str) -> TSTRefiner:
    """A refiner whose only primitive, TranslateX by ``pixels`` (random sign), is always applied in full."""
    refiner = refiner_with(
        {"TranslateX": translate_encoder(pixels, size[1])}, size=size, task=task,
        primitives=["TranslateX"], num_ops=1,
    )  # fmt: skip
    with torch.no_grad():
        refiner.theta_p.fill_(1e4)
        refiner.theta_m.fill_(1e4)
    return refiner


def test_gradients_reach_magnitudes_and_probabilities_through_frozen_networks(one_thread):
    refiner = refiner_with(
        {"TranslateX": translate_encoder(2, 16)},
        size=(16, 16),
        primitives=["TranslateX", "Invert"],
        num_ops=2,
    )
    teacher, student = build_model("resnet8", num_classes=10), build_model("resnet8", num_classes=10)
    teacher.eval(), student.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    class Frozen:
        def teacher(self, x):
            return teacher(x)

        def student(self, x):
            return student(x)

    images = torch.randn(6, 3, 16, 16)
    labels = torch.arange(6)
    loss, parts = refiner.loss(images, labels, torch.Generator().manual_seed(0), 6, 0, Frozen())
    assert loss.item() == pytest.approx(parts["teacher_ce"].item() + parts["student_anti_ce"].item())
    loss.backward(inputs=[refiner.theta_m, refiner.theta_p])
    assert refiner.theta_m.grad.abs().sum() > 0 and refiner.theta_p.grad.abs().sum() > 0
    assert all(p.grad is None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in refiner.encoders.parameters())


def test_segmentation_warps_image_and_mask_identically():
    refiner = full_translation(3, (12, 12), "segmentation")
    masks = torch.randint(0, 8, (4, 12, 12))
    images = (masks.float() / 10).unsqueeze(1).expand(4, 3, 12, 12).contiguous()
    x_hat, warped = refiner.augment(images, masks, torch.Generator().manual_seed(2), 4, 0)
    inside = warped != 255
    assert inside.float().mean() == pytest.approx(9 / 12)  # 3 of 12 columns came from outside
    assert torch.equal((x_hat[:, 0] * 10).round().long()[inside], warped[inside])
    assert x_hat[:, 0][~inside].abs().max() < 1e-6  # out-of-frame pixels: zero padding
    assert not torch.equal(warped, masks)


# ---------------------------------------------------------------- detection


def test_warp_boxes_by_hand_and_boxes_leaving_the_frame_are_dropped():
    targets = torch.tensor([[[10, 5, 30, 15, 1], [60, 0, 80, 10, 2], [0, 0, 0, 0, -1]]], dtype=torch.float32)
    size = (40, 80)
    # theta maps output to input coordinates: u_in = u_out - 0.5, so content moves right by W / 4 = 20 px
    shift = torch.tensor([[[1.0, 0.0, -0.5], [0.0, 1.0, 0.0]]])
    moved = warp_boxes(targets, shift, size)
    assert moved[0, 0].tolist() == pytest.approx([30, 5, 50, 15, 1])
    assert moved[0, 1].tolist() == [0, 0, 0, 0, -1]  # 80..100 lies outside the 80-px frame: dropped
    assert moved[0, 2].tolist() == [0, 0, 0, 0, -1]  # padding stays padding
    # a mirror (u_in = -u_out): x -> 80 - x
    mirror = torch.tensor([[[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    assert warp_boxes(targets, mirror, size)[0, 0].tolist() == pytest.approx([50, 5, 70, 15, 1])
    # a box half out of frame is clamped, one shifted to a sliver under 2 px is dropped
    near = torch.tensor([[[1.0, 0.0, -1.95], [0.0, 1.0, 0.0]]])  # + 78 px: box 10..30 -> 78..80
    assert warp_boxes(targets, near, size)[0, 0].tolist() == [0, 0, 0, 0, -1]
    half = torch.tensor([[[1.0, 0.0, -1.5], [0.0, 1.0, 0.0]]])  # + 60 px: 70..90 -> 70..80
    assert warp_boxes(targets, half, size)[0, 0].tolist() == pytest.approx([70, 5, 80, 15, 1])


def test_warp_boxes_encloses_the_rotated_object_the_image_warp_draws():
    size = (40, 80)
    mask = torch.zeros(1, 1, *size)
    mask[0, 0, 5:15, 10:30] = 1
    theta = affine_matrix("Rotate", torch.tensor([0.7]), size)  # 21 degrees
    ys, xs = torch.where(warp(mask, theta, mode="nearest")[0, 0] > 0)
    box = warp_boxes(torch.tensor([[[10.0, 5.0, 30.0, 15.0, 0.0]]]), theta, size)[0, 0]
    drawn = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    assert (box[:4] - drawn).abs().max() <= 1.0  # the rotated corners' enclosing box, to a pixel


def test_anti_loss_is_ce_of_one_minus_p_by_hand():
    # L = -log p: p = 1/2 -> -log(1 - 1/2) = log 2; p = 0.9 (L = -log 0.9) -> -log 0.1
    assert anti_loss(torch.tensor(math.log(2))).item() == pytest.approx(math.log(2))
    assert anti_loss(torch.tensor(-math.log(0.9))).item() == pytest.approx(-math.log(0.1), rel=1e-5)
    assert torch.isfinite(anti_loss(torch.tensor(0.0)))  # clamped: a perfect student is finite


def test_detection_moves_boxes_with_x_hat_and_stage_ii_reads_the_detectors_losses(one_thread):
    refiner = full_translation(8, (32, 64), "detection")
    targets = torch.tensor([[[4, 4, 20, 20, 0], [50, 8, 62, 30, 1]]] * 2, dtype=torch.float32)
    images = torch.randn(2, 3, 32, 64)
    batch, labels = refiner(images, targets, torch.Generator().manual_seed(0), 2, 0)
    assert torch.equal(batch[:2], images) and torch.equal(labels[:2], targets)  # [x; x_hat]
    moved = labels[2:]
    # m = +8 px or -8 px (AutoAugment's random sign, per image); a box pushed past the border is dropped
    for row in moved:
        shift = row[0, 2] - 20  # x2 of the first box (its x1 may be clamped at 0)
        assert abs(abs(float(shift)) - 8) < 1e-3
        expected = targets[0].clone()
        expected[:, [0, 2]] = (expected[:, [0, 2]] + shift).clamp(0, 64)
        keep = (expected[:, 2] - expected[:, 0]) >= 2
        assert torch.allclose(row[keep], expected[keep], atol=1e-3)
    teacher = build_model("det_compact_teacher", num_classes=3).eval()
    student = build_model("det_compact_student", num_classes=3).eval()
    for p in [*teacher.parameters(), *student.parameters()]:
        p.requires_grad_(False)
    with torch.no_grad():
        refiner.theta_p.zero_(), refiner.theta_m.zero_()

    class Frozen:
        def losses(self, role, x, t):
            model = teacher if role == "teacher" else student
            return model.losses(model(x), t)

    loss, parts = refiner.loss(images, targets, torch.Generator().manual_seed(1), 2, 0, Frozen())
    assert loss.item() == pytest.approx(parts["teacher_det"].item() + parts["student_anti_det"].item())
    loss.backward(inputs=[refiner.theta_m, refiner.theta_p])
    assert refiner.theta_m.grad.abs().sum() > 0 and refiner.theta_p.grad.abs().sum() > 0


DDP_REFINERS = {  # refiner entry, terms, learned tensors compared
    "tst": (
        {
            "name": "tst",
            "primitives": ["Equalize", "Invert", "Cutout"],
            "num_ops": 2,
            "optimizer": {"name": "sgd", "lr": 5.0, "momentum": 0.0, "weight_decay": 0.0},
        },
        [{"name": "ce"}, {"name": "kd"}],
        ["theta_p"],
    ),
    "dafa": (
        {"name": "dafa", "optimizer": {"name": "sgd", "lr": 5.0, "momentum": 0.0, "weight_decay": 0.0}},
        [{"name": "ce"}, {"name": "fitnet"}],
        ["alpha", "theta_p", "theta_m"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(DDP_REFINERS))
def test_two_processes_average_refiner_gradients(tmp_path, kind):
    """torchrun, 2 processes x 16 images vs 1 process x 32 (the global batch): the same refiner parameters
    after 4 updates, to a relative 1e-4 (measured for tst: 2e-5; only the float reduction order differs,
    amplified by the refiner's lr of 5; without averaging the processes would step on halves of the batch
    and differ by whole units). TST's three primitives without magnitude keep it free of stage I fitting;
    DAFA (a feature refiner) draws its sub-policy for the global batch and slices the per-sample draws."""
    entry, terms, keys = DDP_REFINERS[kind]
    config = {
        "name": f"{kind}-ddp",
        "data": {"name": "embedded", "params": {"train_size": 64, "test_size": 32}, "batch_size": 32},
        "teacher": {"name": "resnet8"},
        "student": {"name": "resnet8"},
        "terms": terms,
        "refiners": [{**entry, "update": {"every": 1, "iterations": 2}}],
        "stages": [{"epochs": 1, "optimizer": {"lr": 0.05}}],
        "runtime": {"progress": False, "deterministic": True},
    }
    path = tmp_path / "refiner.yaml"
    path.write_text(yaml.safe_dump(config))
    states = []
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}"
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        proc = subprocess.run(
            [*launch, "-m", "kdkit", "train", str(path), "--out", str(out)],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        states.append(load_checkpoint(out / "checkpoints" / "last.pt")["refiners"][0])
    assert states[0]["updates"] == states[1]["updates"] == 4  # 64 images / 32: 2 steps x 2 updates
    for key in keys:
        one, two = states[0]["module"][key], states[1]["module"][key]
        torch.testing.assert_close(two, one, atol=0, rtol=1e-4)
    first = states[0]["module"][keys[0]]
    assert not torch.equal(first, torch.zeros_like(first))
