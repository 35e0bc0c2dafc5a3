"""Segmentation through the engine: joint augmentation, domain mixing, batching, config."""

from __future__ import annotations

import pytest
import torch

from kdkit.config import load_config
from kdkit.data.base import IGNORE_INDEX, SegmentationTensorDataset
from kdkit.data.draws import sample_keys
from kdkit.data.mixing import MixedDataset, mixed_counts
from kdkit.data.seg_augment import SegmentationAugment
from kdkit.engine.batches import _collate
from kdkit.errors import ConfigError, KdkitError


def _coded(n: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose red channel encodes the mask (class * 40 + 20), so warps can be checked."""
    g = torch.Generator().manual_seed(0)
    masks = (
        torch.randint(0, 5, (n, h // 8, w // 8), generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2)
    )
    images = torch.zeros(n, 3, h, w, dtype=torch.uint8)
    images[:, 0] = (masks * 40 + 20).to(torch.uint8)
    return images, masks.to(torch.uint8)


def _decode(normalised: torch.Tensor) -> torch.Tensor:
    """Class from the red channel of an image normalised with mean 0, std 1."""
    return ((normalised[:, 0] * 255 - 20) / 40).round().long()


def test_augment_keeps_image_and_mask_aligned_and_pads_with_ignore():
    images, masks = _coded(6, 32, 48)
    augment = SegmentationAugment(scale=(0.5, 2.0), crop=(40, 40), flip=True, mean=(0, 0, 0), std=(1, 1, 1))
    x, y = augment(images, masks, sample_keys(range(6), 3))
    assert x.shape == (6, 3, 40, 40) and y.shape == (6, 40, 40) and y.dtype == torch.int64
    labelled = y != IGNORE_INDEX
    # away from class edges (3x3 neighbourhood of one class) the bilinear image decodes to the mask
    padded_y = torch.nn.functional.pad(y.float()[:, None], (1, 1, 1, 1), mode="replicate")
    window = padded_y.unfold(2, 3, 1).unfold(3, 3, 1).flatten(-2)[:, 0]
    interior = labelled & (window == y[..., None]).all(-1)
    assert interior.float().mean() > 0.15
    assert torch.equal(_decode(x)[interior], y[interior])
    # padding (a scale of 0.5 makes a 16x24 image, smaller than the 40x40 crop) is ignore in the mask, 0 in x
    padded = ~labelled
    assert padded.any() and (x.permute(0, 2, 3, 1)[padded] == 0).all()


def test_augment_identity_and_flip_are_exact():
    images, masks = _coded(4, 16, 16)
    plain = SegmentationAugment(flip=False, mean=(0, 0, 0), std=(1, 1, 1))
    x, y = plain(images, masks, sample_keys(range(4), 0))
    assert torch.equal(y, masks.long()) and torch.equal(_decode(x), masks.long())
    flipping = SegmentationAugment(flip=True, mean=(0, 0, 0), std=(1, 1, 1))
    keys = sample_keys(range(4), 1)
    _, _, flips = flipping.sample(keys)
    assert flips.tolist() == (keys.uniform(4)[:, 3] < 0.5).tolist()
    x, y = flipping(images, masks, keys)
    expect = torch.where(flips[:, None, None], masks.long().flip(-1), masks.long())
    assert torch.equal(y, expect) and torch.equal(_decode(x), expect)


def test_augment_slices_of_a_batch_match_the_whole_batch():
    images, masks = _coded(4, 24, 24)
    augment = SegmentationAugment(scale=(0.75, 1.5), crop=(20, 20), mean=(0, 0, 0), std=(1, 1, 1))
    whole = augment(images, masks, sample_keys(range(4), 5))
    halves = [augment(images[i : i + 2], masks[i : i + 2], sample_keys([i, i + 1], 5)) for i in (0, 2)]
    assert torch.equal(torch.cat([h[0] for h in halves]), whole[0])
    assert torch.equal(torch.cat([h[1] for h in halves]), whole[1])


def test_augment_takes_lists_of_differently_sized_samples():
    a, ma = _coded(1, 16, 24)
    b, mb = _coded(1, 32, 24)
    augment = SegmentationAugment(crop=(16, 16), mean=(0, 0, 0), std=(1, 1, 1))
    x, y = augment([a[0], b[0]], [ma[0], mb[0]], sample_keys(range(2), 0))
    assert x.shape == (2, 3, 16, 16) and y.shape == (2, 16, 16)


def test_collate_stacks_masks_and_keeps_lists_for_mixed_sizes():
    a, ma = _coded(2, 16, 16)
    images, masks = _collate([(a[0], ma[0]), (a[1], ma[1])])
    assert images.shape == (2, 3, 16, 16) and masks.shape == (2, 16, 16)
    b, mb = _coded(1, 8, 16)
    images, masks = _collate([(a[0], ma[0]), (b[0], mb[0])])
    assert isinstance(images, list) and [m.shape for m in masks] == [(16, 16), (8, 16)]
    images, labels = _collate([(a[0], 3), (a[1], 1)])
    assert labels.tolist() == [3, 1]


@pytest.mark.parametrize(
    "target,other,ratio,expect",
    [
        (64, 1000, 1.0, (64, 64)),
        (64, 1000, 0.5, (64, 128)),
        (64, 1000, 10.0, (64, 6)),
        (64, 100, 0.2, (64, 100)),
        (64, 1000, 0.0, (0, 1000)),
    ],
)
def test_mixed_counts_follow_the_ratio(target, other, ratio, expect):
    assert mixed_counts(target, other, ratio) == expect


def test_mixed_dataset_keeps_target_labels_and_blanks_the_other_domain():
    t_images, t_masks = _coded(4, 16, 16)
    o_images, o_masks = _coded(10, 16, 16)
    target = SegmentationTensorDataset(t_images, t_masks, ["a", "b", "c", "d", "e"])
    other = SegmentationTensorDataset(o_images + 1, o_masks, ["a", "b", "c", "d", "e"])
    mixed = MixedDataset(target, other, ratio=2.0)
    assert len(mixed) == 6 and mixed.in_memory
    assert torch.equal(mixed.images[:4], t_images) and torch.equal(mixed.labels[:4], t_masks)
    picked = mixed.other_index  # 2 distinct proximity images, redrawn each epoch (tests/test_seeds_exact.py)
    assert picked.tolist() == sorted(set(picked.tolist())) and len(picked) == 2
    assert torch.equal(mixed.images[4:], o_images[picked] + 1)
    assert (mixed.labels[4:] == IGNORE_INDEX).all()
    only_other = MixedDataset(target, other, ratio=0.0)
    assert len(only_other) == 10 and (only_other.labels == IGNORE_INDEX).all()


def test_mixed_dataset_rejects_classification_data():
    from kdkit.data.base import TensorDataset

    cls = TensorDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"])
    target = SegmentationTensorDataset(*_coded(2, 16, 16), ["a"] * 5)
    with pytest.raises(KdkitError, match="segmentation datasets"):
        MixedDataset(target, cls, 1.0)


def test_segmentation_config_keys_validate(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "task: segmentation\nstudent: {name: resnet8}\n"
        "data: {augment: {scale: [0.5, 2.0], crop: [32, 64]}, mix: {name: embedded, ratio: 0.5}}\n"
        "evaluation: {mode: slide, crop: [32, 32]}\n"
    )
    config = load_config(path)
    assert config.data.augment.scale == (0.5, 2.0) and config.data.mix.ratio == 0.5
    with pytest.raises(ConfigError, match="needs crop"):
        load_config(path, ["evaluation.crop=null"])
    with pytest.raises(ConfigError, match=r"--set data.mix.name=nope: data.mix.name: unknown dataset 'nope'"):
        load_config(path, ["data.mix.name=nope"])
    with pytest.raises(ConfigError, match="scale"):
        load_config(path, ["data.augment.scale=[2.0, 0.5]"])


# ------------------------------------------------------------------ end to end on a generic folder


def _write_folder(root, n_train: int = 8, n_test: int = 4, h: int = 32, w: int = 64):
    """A tiny ``segmentation_folder`` layout: 3 classes drawn as coloured vertical bands."""
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    root.mkdir(parents=True)
    (root / "classes.txt").write_text("sky\nroad\ncar\n")
    colours = torch.tensor([[70, 130, 180], [128, 64, 128], [0, 0, 142]], dtype=torch.uint8)
    for split, n in (("train", n_train), ("test", n_test)):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(n):
            cuts = sorted(torch.randint(4, w - 4, (2,), generator=g).tolist())
            mask = torch.zeros(h, w, dtype=torch.uint8)
            mask[:, cuts[0] :] = 1
            mask[h // 2 :, cuts[1] :] = 2
            mask[0, 0] = 255
            image = colours[mask.clamp(max=2).long()] + torch.randint(0, 30, (h, w, 3), generator=g).to(
                torch.uint8
            )
            Image.fromarray(image.numpy()).save(root / "images" / split / f"{i}.png")
            Image.fromarray(mask.numpy()).save(root / "masks" / split / f"{i}.png")
    return root


def _config(root, out, **extra):
    base = {
        "name": "seg",
        "task": "segmentation",
        "data": {
            "name": "segmentation_folder",
            "root": str(root),
            "batch_size": 4,
            "eval_batch_size": 2,
            "augment": {"scale": [0.75, 1.25], "crop": [32, 48]},
        },
        "student": {"name": "mini_deeplab_student"},
        "terms": [{"name": "ce"}],
        "stages": [{"epochs": 2, "optimizer": {"lr": 0.05}, "schedule": {"name": "poly"}}],
        "runtime": {"out_dir": str(out), "progress": False},
    }
    base.update(extra)
    return load_config(base=base)


def test_segmentation_run_trains_evaluates_and_reports(tmp_path):
    from kdkit.api import train_from_config

    root = _write_folder(tmp_path / "data")
    summary = train_from_config(_config(root, tmp_path / "runs"))
    assert summary["metric"] == "miou" and 0 <= summary["best_miou"] <= 100
    for key in ("last_pixel_acc", "last_miou_var", "last_hp_acc"):
        assert key in summary
    run = tmp_path / "runs" / "seg"
    import json

    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert len(evals[-1]["image_miou"]) == 4 and len(evals[-1]["class_iou"]) == 3
    for name in ("image_miou.png", "accuracy.png", "student.safetensors", "report.md"):
        assert (run / name).is_file(), name
    assert "HP-Acc" in (run / "report.md").read_text()
    assert json.loads((run / "student.json").read_text())["task"] == "segmentation"  # for predict/export


def test_slide_and_whole_evaluation_agree_for_a_full_window(tmp_path):
    from kdkit.api import train_from_config

    root = _write_folder(tmp_path / "data", n_train=4, n_test=2)
    whole = train_from_config(_config(root, tmp_path / "a", stages=[{"steps": 1}]))
    slide = train_from_config(
        _config(root, tmp_path / "b", stages=[{"steps": 1}], evaluation={"mode": "slide", "crop": [32, 64]})
    )
    assert slide["last_miou"] == pytest.approx(whole["last_miou"], abs=1e-4)


def test_classification_model_on_segmentation_data_is_a_clear_error(tmp_path):
    from kdkit.api import train_from_config

    root = _write_folder(tmp_path / "data", n_train=4, n_test=2)
    with pytest.raises(KdkitError, match="task 'classification' needs a classification dataset"):
        train_from_config(_config(root, tmp_path / "runs", task="classification"))


def test_spirit_stages_train_exactly_the_parameters_they_claim(tmp_path):
    """Stage 1 changes only the extractor, stage 2 only the head (the extractor's BN statistics
    included), stage 3 everything (Spirit Distillation, Algorithm 1)."""
    from kdkit.api import train_from_config
    from kdkit.engine.callbacks import Callback
    from kdkit.models import build_model, save_weights

    root = _write_folder(tmp_path / "data")
    teacher = build_model("mini_deeplab_teacher", num_classes=3)
    save_weights(teacher, tmp_path / "teacher.safetensors")
    snapshots = []

    class Snapshot(Callback):
        def on_run_start(self, trainer):
            snapshots.append({k: v.clone() for k, v in trainer.distiller.student.state_dict().items()})

        def on_stage_end(self, trainer, stage):
            snapshots.append({k: v.clone() for k, v in trainer.distiller.student.state_dict().items()})

    stage = {"steps": 2, "optimizer": {"lr": 0.01}, "schedule": {"name": "constant"}}
    config = _config(
        root,
        tmp_path / "runs",
        teacher={"name": "mini_deeplab_teacher", "weights": str(tmp_path / "teacher.safetensors")},
        student={
            "name": "spirit",
            "kwargs": {"teacher": "mini_deeplab_teacher", "widths": [16, 8], "depths": [1, 1]},
        },
        stages=[
            {
                **stage,
                "name": "imitation",
                "train": ["extractor.*"],
                "terms": [{"name": "spirit", "student_tap": "extractor", "teacher_tap": "backbone"}],
            },
            {**stage, "name": "head", "train": ["head.*"]},
            {**stage, "name": "finetune"},
        ],
    )
    train_from_config(config, callbacks=[Snapshot()])
    start, s1, s2, s3 = snapshots

    def changed(a, b, prefix):
        keys = [k for k in a if k.startswith(prefix) and not k.endswith("num_batches_tracked")]
        assert keys
        return {k for k in keys if not torch.equal(a[k], b[k])}, keys

    params = {
        n
        for n, _ in build_model(
            "spirit", 3, teacher="mini_deeplab_teacher", widths=[16, 8], depths=[1, 1]
        ).named_parameters()
    }
    moved, keys = changed(start, s1, "extractor.")
    assert moved & params == {k for k in keys if k in params}  # every extractor parameter moved
    moved, _ = changed(start, s1, "head.")
    assert not moved & params  # no head parameter moved in stage 1
    moved, _ = changed(s1, s2, "extractor.")
    assert not moved  # frozen extractor: parameters and BN statistics unchanged
    moved, keys = changed(s1, s2, "head.")
    assert moved & params == {k for k in keys if k in params}
    moved, keys = changed(s2, s3, "")
    assert moved & params == params
