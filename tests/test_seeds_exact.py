"""The seeds read exactly (issue 8, items 6-9): Spirit Distillation's student size (Table II), Eq. 5's
mIoU beside the dataset mIoU, ESD's proximity images drawn afresh per epoch, and the style refiner's
mask reuse, diffusion noise seeds and style-source cache."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kdkit.config import EvalConfig, _read_yaml, load_config
from kdkit.data.base import IGNORE_INDEX, SegmentationTensorDataset
from kdkit.data.mixing import MixedDataset
from kdkit.deploy.profile import count_flops, count_parameters
from kdkit.engine.batches import Batches, generator
from kdkit.engine.distributed import DistInfo
from kdkit.engine.segmetrics import SegmentationMeter, mean_image_miou
from kdkit.engine.tasks import METRIC_LABELS, build_task
from kdkit.engine.trainer import Trainer
from kdkit.errors import KdkitError
from kdkit.models import build_model
from kdkit.refiners import RefinerContext, StyleRefiner
from kdkit.refiners import style as style_module

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "kdkit" / "configs"
SPIRIT = CONFIGS / "cityscapes" / "spirit"

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ------------------------------------------------------------------ 6. Spirit student size (Table II)

# Table II: S has 9.5M parameters and 169.4 GFLOPs, the constructed teacher CT (AMG + SH) 405.7 GFLOPs
# (41.8%). FLOPs at the paper's input, a 1024x2048 Cityscapes image max-pooled by 2; a multiply-add = 2.
PAPER_PARAMS, PAPER_GFLOPS, PAPER_CT_GFLOPS = 9.5e6, 169.4, 405.7


@functools.cache
def _r50(grouping: str | None) -> tuple[nn.Module, int, float]:
    """The R50 preset's student built on the meta device, its parameters and GFLOPs at 512x1024. FLOPs
    are counted at 64x128 and scaled by 64 (every layer's output is exactly 1/64 the size there)."""
    kwargs = dict(load_config(SPIRIT / "student.yaml").student.kwargs)
    kwargs.pop("grouping") if grouping is None else kwargs.update(grouping=grouping)
    with torch.device("meta"):
        student = build_model("spirit", 2, **kwargs)
        flops = count_flops(student, torch.zeros(1, 3, 64, 128))
    return student, count_parameters(student), flops * 64 / 1e9


def _r50_student(grouping: str | None) -> tuple[int, float]:
    return _r50(grouping)[1:]


def test_spirit_r50_student_matches_table_ii_under_the_default_grouping():
    assert load_config(SPIRIT / "student.yaml").student.kwargs["grouping"] == "separable"
    params, gflops = _r50_student("separable")
    assert _r50_student(None)[0] == params  # the model's default is the preset's
    assert abs(params / PAPER_PARAMS - 1) < 0.01  # 9,513,712 vs 9.5M
    assert abs(gflops / PAPER_GFLOPS - 1) < 0.005  # 169.37 vs 169.4
    assert abs(100 * gflops / PAPER_CT_GFLOPS - 41.8) < 0.1  # 41.75% vs 41.8%


def test_spirit_gcd_grouping_keeps_the_literal_rule():
    params, gflops = _r50_student("gcd")
    assert params == 182_850 and 10.5 < gflops < 10.7  # 0.18M params, 2.6% of CT's FLOPs
    student = _r50("separable")[0]
    convs = {p: m for p, m in student.extractor.named_modules() if isinstance(m, nn.Conv2d)}
    gcd = {p: math.gcd(m.in_channels, m.out_channels) for p, m in convs.items()}
    assert convs["layer1.0.conv2"].groups == 64 and convs["layer4.0.downsample.0"].groups == 1024
    assert convs["layer1.0.conv1"].groups == 1 and convs["layer4.2.conv3"].groups == 1  # dense 1x1
    assert convs["conv1"].groups == 1  # 3 -> 64: gcd 1
    assert all(m.groups in (1, gcd[p]) for p, m in convs.items())
    with pytest.raises(KdkitError, match="unknown Spirit grouping 'cap'"):
        build_model("spirit", 2, teacher="mini_deeplab_teacher", grouping="cap")


def test_spirit_demo_student_is_the_same_under_both_rules():
    """The compact teacher's front has no bottleneck 1x1 convolutions: the demo's student is unchanged."""
    kw = {"teacher": "mini_deeplab_teacher", "widths": [64, 32], "depths": [3, 4]}
    sizes = {g: count_parameters(build_model("spirit", 10, grouping=g, **kw)) for g in ("gcd", "separable")}
    assert sizes == {"gcd": 24_194, "separable": 24_194}


# ------------------------------------------------------------------ 7. Eq. 5 mIoU beside the dataset mIoU


def _two_images() -> SegmentationMeter:
    """Image 1: target [0,0,1,1], prediction equal (IoU 1, 1: mIoU_1 = 1).
    Image 2: target [0,0,0,0], prediction [0,0,0,1] (IoU_0 = 3/4, IoU_1 = 0/1: mIoU_2 = 0.375).
    Dataset: IoU_0 = 5/6 (TP 5, FN 1), IoU_1 = 2/3 (TP 2, FP 1): mIoU 0.75. Eq. 5: (1 + 0.375)/2."""
    meter = SegmentationMeter(2)
    meter.update(torch.tensor([[[0, 0, 1, 1]]]), torch.tensor([[[0, 0, 1, 1]]]))
    meter.update(torch.tensor([[[0, 0, 0, 1]]]), torch.tensor([[[0, 0, 0, 0]]]))
    return meter


def test_dataset_miou_and_eq5_miou_differ_by_hand():
    out = _two_images().compute()
    assert out["miou"] == pytest.approx(75.0)
    assert out["miou_per_image"] == pytest.approx(68.75)
    assert out["image_miou"] == pytest.approx([1.0, 0.375])
    assert out["miou_var"] == pytest.approx(1000 * 0.3125**2)  # Eq. 6 around Eq. 5's mean
    assert mean_image_miou([1.0, None, 0.375]) == pytest.approx(0.6875)  # images without pixels left out
    assert METRIC_LABELS["miou_per_image"] != METRIC_LABELS["miou"]


def test_headline_metric_is_explicit_and_summaries_carry_both():
    dataset = SegmentationTensorDataset(torch.zeros(1, 3, 2, 2, dtype=torch.uint8),
                                        torch.zeros(1, 2, 2, dtype=torch.uint8), ["a", "b"])  # fmt: skip
    assert build_task("segmentation", dataset).metric == "miou"
    task = build_task("segmentation", dataset, EvalConfig(metric="miou_per_image"))
    assert task.metric == "miou_per_image"
    record = {"kind": "eval", "stage_index": 0, "epoch": 1, **_two_images().compute()}
    fake = SimpleNamespace(task=task, name="x", history=[record])
    summary = Trainer.summary(fake)
    assert summary["metric"] == "miou_per_image" and summary["best_miou_per_image"] == pytest.approx(68.75)
    assert summary["last_miou"] == pytest.approx(75.0)
    assert summary["last_miou_per_image"] == pytest.approx(68.75)
    for name in ("student.yaml", "sd.yaml", "esd.yaml"):  # the presets that reproduce the paper use Eq. 5
        overrides = [f"teacher.weights={__file__}"] if "teacher" in _read_yaml(SPIRIT / name) else []
        assert load_config(SPIRIT / name, overrides).evaluation.metric == "miou_per_image"


# ------------------------------------------------------------------ 8. ESD: proximity images per epoch


def _mixed(ratio: float = 0.5) -> MixedDataset:
    target = SegmentationTensorDataset(torch.zeros(4, 3, 4, 4, dtype=torch.uint8),
                                       torch.zeros(4, 4, 4, dtype=torch.uint8), ["a", "b"])  # fmt: skip
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 3, 4, 4).clone() + 100
    other = SegmentationTensorDataset(images, torch.zeros(40, 4, 4, dtype=torch.uint8), ["a", "b"])
    return MixedDataset(target, other, ratio)


def _drawn(mixed: MixedDataset) -> list[int]:
    return sorted(int(v) - 100 for v in mixed.images[mixed.n_target :, 0, 0, 0])


def test_proximity_subset_is_drawn_per_epoch_from_the_seed():
    mixed = _mixed(0.5)
    assert (mixed.n_target, mixed.n_other, len(mixed)) == (4, 8, 12)  # r = 0.5: 4 target, 8 proximity
    draws = {}
    for epoch in range(4):
        mixed.for_epoch((0, 0, epoch))
        draws[epoch] = _drawn(mixed)
        assert draws[epoch] == mixed.other_index.tolist() and len(set(draws[epoch])) == 8
        assert (mixed.labels[4:] == IGNORE_INDEX).all() and (mixed.images[:4] == 0).all()
    assert len({tuple(d) for d in draws.values()}) == 4  # every epoch a different subset
    fresh = _mixed(0.5)
    fresh.for_epoch((0, 0, 2))
    assert _drawn(fresh) == draws[2]  # same (seed, stage, epoch): same subset (resume, other ranks)
    fresh.for_epoch((1, 0, 2))
    assert _drawn(fresh) != draws[2]
    # sources of different image sizes are not stacked: items are read through the drawn indices
    larger = SegmentationTensorDataset(torch.zeros(4, 3, 8, 8, dtype=torch.uint8),
                                       torch.zeros(4, 8, 8, dtype=torch.uint8), ["a", "b"])  # fmt: skip
    lazy = MixedDataset(larger, fresh.other, 0.5)
    assert not lazy.in_memory
    lazy.for_epoch((0, 0, 2))
    items = [lazy[i] for i in range(4, 12)]
    assert sorted(int(image[0, 0, 0]) - 100 for image, _ in items) == draws[2]
    assert all((mask == IGNORE_INDEX).all() for _, mask in items)


def test_batches_tell_the_dataset_its_epoch():
    mixed = _mixed(0.5)
    batches = Batches(mixed, 4, DistInfo(rank=0, world=1, local_rank=0), train=True)
    for epoch in (0, 1):
        seen = sorted(v for images, _ in batches.epoch((3, 1, epoch)) for v in images[:, 0, 0, 0].tolist())
        expected = _mixed(0.5)
        expected.for_epoch((3, 1, epoch))
        assert [v - 100 for v in seen if v >= 100] == _drawn(expected)
    resumed = list(batches.epoch((3, 1, 1), start_step=2))
    whole = list(batches.epoch((3, 1, 1)))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, whole[2:], strict=True))


# ------------------------------------------------------------------ 9. style refiner details


class _Recorder(nn.Module):
    """A stand-in transfer: x' = x, recording the noise seeds it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.seeds: list[list[int]] = []

    def forward(self, content, style, alpha, seeds=None):
        self.seeds.append(list(seeds))
        return content.clone()


def _context(task: str = "segmentation", build=None, seed: int = 0) -> RefinerContext:
    ignore = 255 if task == "segmentation" else -100
    return RefinerContext(task, (0.5,) * 3, (0.5,) * 3, torch.device("cpu"), build, ["ce"], ignore, seed)


def _diffusion(monkeypatch, **kwargs) -> StyleRefiner:
    monkeypatch.setattr(StyleRefiner, "_build_transfer", lambda self: _Recorder())
    return StyleRefiner(method="diffusion", model="unused", prompt="at night", **kwargs)


def test_diffusion_mask_reuse_is_an_explicit_choice_in_segmentation(monkeypatch):
    with pytest.raises(KdkitError, match="choose label_styled: true .* or false"):
        _diffusion(monkeypatch).setup(_context())
    with pytest.warns(UserWarning, match="reuses x's masks"):
        _diffusion(monkeypatch, label_styled=True).setup(_context())
    refiner = _diffusion(monkeypatch, label_styled=False)
    refiner.setup(_context())
    masks = torch.randint(0, 3, (2, 4, 4))
    _, labels = refiner(torch.zeros(2, 3, 4, 4), masks, generator("refine", 0, 0, 0, 0), 2, 0)
    assert torch.equal(labels[:2], masks) and (labels[2:] == 255).all()  # the task loss skips x'
    _diffusion(monkeypatch).setup(_context("classification"))  # classification keeps the default, true


def test_diffusion_noise_follows_the_global_sample_position(monkeypatch):
    refiner = _diffusion(monkeypatch, label_styled=True)
    refiner.setup(_context("classification"))
    images, labels = torch.zeros(4, 3, 4, 4), torch.arange(4)
    refiner(images, labels, generator("refine", 0, 1, 2, 3), 4, 0)  # one process, whole batch
    refiner(images, labels, generator("refine", 0, 1, 2, 3), 4, 0)  # the same step again (resumed)
    for start in (0, 2):  # two processes, each its slice
        part = slice(start, start + 2)
        refiner(images[part], labels[part], generator("refine", 0, 1, 2, 3), 4, start)
    refiner(images, labels, generator("refine", 0, 1, 2, 4), 4, 0)  # the next step
    whole, again, first, second, nxt = refiner.transfer.seeds
    assert len(set(whole)) == 4 and whole == again == first + second
    assert not set(nxt) & set(whole)


class _Numbered:
    """A dataset whose image i is filled with (offset + i)."""

    def __init__(self, n: int, offset: int) -> None:
        self.n, self.offset = n, offset

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.full((3, 6, 6), self.offset + i, dtype=torch.uint8), 0


def test_style_sources_are_a_seeded_sample_kept_in_uint8(monkeypatch):
    monkeypatch.setattr(style_module, "MAX_SOURCES", 6)
    datasets = {"a": _Numbered(10, 0), "b": _Numbered(10, 100)}

    def picked(seed: int) -> list[int]:
        refiner = StyleRefiner(sources=[{"name": "a"}, {"name": "b"}])
        refiner.setup(_context(build=lambda name, root, split, params: datasets[name], seed=seed))
        assert all(s.dtype == torch.uint8 for s in refiner.sources)
        cache = refiner._sources_at((3, 3), torch.device("cpu"))
        assert cache.dtype == torch.uint8 and cache.shape == (len(refiner.sources), 3, 3, 3)
        return [int(s[0, 0, 0]) for s in refiner.sources]

    first = picked(0)
    assert len(set(first)) == 6 and first != [0, 1, 2, 3, 4, 5]  # not the first images
    assert first == picked(0) and first != picked(1)
    assert all(0 <= v < 10 or 100 <= v < 110 for v in first)
    monkeypatch.setattr(style_module, "MAX_SOURCES", 100)
    assert picked(0) == [*range(10), *range(100, 110)]  # all of them when they fit
