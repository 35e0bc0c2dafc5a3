"""Mixup and CutMix with a per-sample partner (issue 12, item 2): hand-checked mixing, soft targets,
and images that depend on the sample only (not on the batch, the loader or the process)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import Dataset

from kdkit.config import AugmentConfig
from kdkit.data.draws import sample_keys
from kdkit.data.mixup import MixDraws, Mixup, cut_box, symmetric_beta
from kdkit.engine.batches import Batches
from kdkit.engine.distributed import DistInfo
from kdkit.engine.tasks import ClassificationTask
from kdkit.errors import KdkitError

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_cut_box_by_hand():
    # lam 0.75 -> sides 8 * sqrt(0.25) = 4, centred at (4, 4): rows and columns 2..6, 16 of 64 pixels
    assert cut_box(0.75, torch.tensor([0.5, 0.5]), 8, 8) == ((2, 6, 2, 6), 0.75)
    # centred in the corner, the box is clipped to 2 x 2: lambda becomes 1 - 4/64
    assert cut_box(0.75, torch.tensor([0.0, 0.0]), 8, 8) == ((0, 2, 0, 2), 1 - 4 / 64)


def test_mixup_and_cutmix_images_and_targets_by_hand():
    mix = Mixup(3, 0.8, 1.0, 1.0, 0.5)
    a = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    b = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    draws = MixDraws(
        partner=torch.tensor([5, 6]),
        lam=torch.tensor([0.3, 0.75], dtype=torch.float64),
        cut=torch.tensor([False, True]),
        centre=torch.tensor([[0.1, 0.9], [0.0, 0.0]], dtype=torch.float64),
    )
    images, targets = mix.mix(a, b, torch.tensor([1, 0]), torch.tensor([2, 2]), draws)
    assert images.dtype == torch.float32
    assert torch.allclose(images[0], torch.full((1, 8, 8), 0.7))  # 0.3 * 0 + 0.7 * 1
    expected = torch.zeros(1, 8, 8)
    expected[:, 0:2, 0:2] = 1  # the partner's corner box
    assert torch.equal(images[1], expected)
    assert torch.allclose(targets, torch.tensor([[0, 0.3, 0.7], [1 - 4 / 64, 0, 4 / 64]]))


@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.8, 2.0])
def test_symmetric_beta_has_the_beta_moments(alpha):
    """Mean 1/2 and variance 1 / (4 (2 alpha + 1)) of Beta(alpha, alpha), over 4000 keyed samples
    (Johnk's rejection for alpha <= 1/2, Ulrich's polar method above)."""
    u = sample_keys(range(4000), "beta", alpha).uniform(16)
    x = symmetric_beta(alpha, u)
    assert ((x >= 0) & (x <= 1)).all()
    assert abs(x.mean() - 0.5) < 0.02 and abs(x.var() - 1 / (4 * (2 * alpha + 1))) < 0.012
    # draws past the eighth come in further blocks; the first eight are those of uniform(8)
    assert torch.equal(u[:, :8], sample_keys(range(4000), "beta", alpha).uniform(8))


def test_draws_belong_to_the_sample_not_the_batch():
    mix = Mixup(10, 0.8, 1.0, 1.0, 0.5)
    whole = mix.draw(sample_keys([3, 7, 11], "mixup", 0, 0, 2), 20)
    alone = mix.draw(sample_keys([7], "mixup", 0, 0, 2), 20)
    assert int(alone.partner) == int(whole.partner[1]) and float(alone.lam) == float(whole.lam[1])
    assert bool(alone.cut) == bool(whole.cut[1])
    many = mix.draw(sample_keys(range(2000), "mixup", 0, 0, 2), 2000)
    assert (many.partner != torch.arange(2000)).all() and many.partner.max() < 2000
    assert abs(many.cut.double().mean() - 0.5) < 0.04  # switch_prob
    # CutMix's lambda ~ Beta(1, 1) = uniform: mean 1/2, variance 1/12
    lam = many.lam[many.cut]
    assert abs(lam.mean() - 0.5) < 0.03 and abs(lam.var() - 1 / 12) < 0.01
    never = Mixup(10, 0.8, 0.0, 0.0, 0.5).draw(sample_keys(range(50), "mixup", 1), 50)
    assert (never.lam == 1).all() and torch.equal(never.partner, torch.arange(50))


class Photos(Dataset):
    """12 random 3x10x10 images of 3 classes, in memory or (``in_memory = False``) item by item."""

    task = "classification"

    def __init__(self, in_memory: bool) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (12, 3, 10, 10), generator=g, dtype=torch.uint8)
        self.labels = torch.arange(12) % 3
        self.in_memory = in_memory

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


def _mixed(dataset, config, batch_size, world=1, workers=0):
    task = ClassificationTask(3, (0.5,) * 3, (0.5,) * 3)
    out = {}
    for rank in range(world):
        batches = Batches(
            dataset,
            batch_size,
            DistInfo(rank, world),
            train=True,
            num_workers=workers,
            decode=task.decoder(config),
            mixup=task.mixer(config),
        )
        for images, labels, idx in batches.epoch((0, 0, 1), indices=True):
            out.update(zip(idx.tolist(), zip(images, labels)))
    return out


@pytest.mark.parametrize("decode", [False, True])
def test_a_mixed_sample_is_the_same_in_any_batch_loader_or_process(decode):
    config = AugmentConfig(mixup={"prob": 1.0}, resized_crop={"size": 8} if decode else None, crop_padding=2)
    one = _mixed(Photos(True), config, 4)
    assert len(one) == 12
    for in_memory, batch_size, world, workers in ((True, 6, 2, 0), (False, 2, 1, 0), (False, 4, 2, 1)):
        other = _mixed(Photos(in_memory), config, batch_size, world, workers)
        for i in one:
            assert torch.equal(other[i][0], one[i][0]) and torch.equal(other[i][1], one[i][1]), i
    image, target = one[0]
    assert image.dtype == torch.float32 and target.shape == (3,)
    assert target.sum().item() == pytest.approx(1.0) and target.max() < 1  # every sample is mixed
    if not decode:  # raw images: a mixup row is a blend of the sample and its partner
        mix = Mixup(3, 0.8, 1.0, 1.0, 0.5)
        draws = mix.draw(sample_keys([0], "mixup", 0, 0, 1), 12)
        if not draws.cut[0]:
            lam, j = float(draws.lam[0]), int(draws.partner[0])
            raw = Photos(True).images.float() / 255
            assert torch.allclose(image, lam * raw[0] + (1 - lam) * raw[j], atol=1e-6)


def test_mixup_is_refused_for_dense_tasks():
    task_cls = __import__("kdkit.engine.tasks", fromlist=["SegmentationTask"]).SegmentationTask
    with pytest.raises(KdkitError, match="mixup are classification options"):
        task_cls(3, (0.5,) * 3, (0.5,) * 3).mixer(AugmentConfig(mixup={}))
    with pytest.raises(ValueError, match="both 0"):
        AugmentConfig(mixup={"mixup_alpha": 0, "cutmix_alpha": 0})


def test_a_dkd_run_with_mixup_replays_its_cached_teacher(tmp_path):
    """Soft targets reach ``ce`` and ``dkd``; ``kdkit cache-teacher`` mixes the samples as training does,
    so the run replays every step and trains what the live teacher trains."""
    from test_teacher_cache import _kd_config, _records, _weights

    from kdkit.api import cache_teacher, train_from_config
    from kdkit.config import dump_config
    from kdkit.models import build_model, save_weights

    torch.manual_seed(1)
    teacher = tmp_path / "teacher.safetensors"
    save_weights(build_model("resnet8", num_classes=10), teacher)

    def config(name, cache):
        c = _kd_config(tmp_path, teacher, name, cache=cache)
        c.terms[1] = type(c.terms[1])(name="dkd")
        c.data.augment = AugmentConfig(mixup={"mixup_alpha": 0.4, "cutmix_alpha": 1.0})
        c.stages[0].epochs = 1
        return c

    path = tmp_path / "kd.yaml"
    path.write_text(dump_config(config("ahead", True)))
    cache_teacher(path, progress=lambda line: None)
    train_from_config(config("ahead", True))
    train_from_config(config("live", False))
    assert _records(tmp_path, "ahead")[-1]["replayed_steps"] == 4
    ahead, live = _weights(tmp_path, "ahead"), _weights(tmp_path, "live")
    for key in live:
        assert torch.allclose(ahead[key], live[key], atol=1e-5), key
    report = (tmp_path / "runs" / "live" / "report.md").read_text()
    assert "mixup (alpha 0.4) or CutMix (alpha 1) with a per-sample partner" in report
    losses = [
        r for r in map(json.loads, (tmp_path / "runs" / "live" / "metrics.jsonl").open()) if "loss" in r
    ]
    assert losses and all(torch.isfinite(torch.tensor(r["loss"])) for r in losses)


def test_tst_anti_ce_of_one_hot_targets_equals_the_class_id_form():
    from kdkit.refiners.tst import anti_ce

    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    labels = torch.tensor([0, 2])
    hard = anti_ce(logits, labels, 255)
    assert torch.allclose(anti_ce(logits, torch.eye(3)[labels], 255), hard, atol=1e-6)
    # a 50/50 target: the mean of -log(1 - p_c) over the two classes, by hand
    p = logits.softmax(1)
    soft = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
    expected = (
        -(0.5 * torch.log(1 - p[0, 0]) + 0.5 * torch.log(1 - p[0, 1]))
        - (0.5 * torch.log(1 - p[1, 1]) + 0.5 * torch.log(1 - p[1, 2]))
    ) / 2
    assert torch.allclose(anti_ce(logits, soft, 255), expected, atol=1e-6)
