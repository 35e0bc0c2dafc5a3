"""Augmentation per image at decode time (issue 12, item 2): the ImageNet recipe, replayable per sample."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from kdkit.config import AugmentConfig
from kdkit.data import build_dataset
from kdkit.data.decode import DecodeAugment
from kdkit.data.folders import load_image
from kdkit.engine.batches import Batches
from kdkit.engine.distributed import DistInfo
from kdkit.engine.tasks import build_task
from kdkit.errors import KdkitError

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two classes of 6 noisy images of different sizes (PNG), as <root>/train/<class>/*.png."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(6):
            h, w = 20 + 4 * i, 28 + 2 * i
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                root / "train" / c / f"{i}.png"
            )
    return root


def test_resized_crop_of_the_whole_square_is_a_resize():
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    config = AugmentConfig(resized_crop={"size": 16, "scale": (1.0, 1.0), "ratio": (1.0, 1.0)}, flip=False)
    out = DecodeAugment(config)(image, key=5)
    assert torch.equal(out, TF.resize(image, [16, 16], antialias=True))


def test_decode_is_a_function_of_the_key_only():
    image = torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8)
    augment = DecodeAugment(
        AugmentConfig(resized_crop={"size": 12}, color_jitter=(0.4, 0.4, 0.4), randaugment=(2, 9))
    )
    torch.manual_seed(123)
    before = torch.rand(1)
    a = augment(image, 7)
    torch.rand(5)  # the global RNG state does not matter, and is left as it was
    assert torch.equal(a, augment(image, 7)) and not torch.equal(a, augment(image, 8))
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)
    assert a.shape == (3, 12, 12) and a.dtype == torch.uint8


def test_eval_resize_then_centre_crop_by_hand(tmp_path):
    """16x8 image (w x h) whose pixel value is its column: resize_size 8 keeps it, image_size 4 crops the
    centre: columns 6..9 and rows 2..5."""
    array = np.tile(np.arange(16, dtype=np.uint8)[None, :, None] * 10, (8, 1, 3))
    Image.fromarray(array).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png", image_size=4, resize_size=8)
    assert out.shape == (3, 4, 4) and out[0, 0].tolist() == [60, 70, 80, 90]


def _views(dataset, task, config, batch_size, world, workers):
    decode = task.decoder(config)
    augment = task.augmenter(config)
    from kdkit.data.draws import sample_keys

    out = {}
    for rank in range(world):
        batches = Batches(
            dataset, batch_size, DistInfo(rank, world), train=True, num_workers=workers, decode=decode
        )
        for images, labels, idx in batches.epoch((0, 0, 3), indices=True):
            x, _ = augment(images, labels, sample_keys(idx, "augment", 0, 0, 3))
            out.update(zip(idx.tolist(), x))
    return out


def test_folder_images_decode_the_same_in_any_batch_worker_or_process(photos):
    dataset = build_dataset("image_folder", "train", root=str(photos), mean=(0.5,) * 3, std=(0.25,) * 3)
    task = build_task("classification", dataset)
    config = AugmentConfig(resized_crop={"size": 16}, color_jitter=(0.3, 0.3, 0.3))
    one = _views(dataset, task, config, 4, 1, 0)
    assert len(one) == 12 and next(iter(one.values())).shape == (3, 16, 16)
    for batch_size, world, workers in ((2, 1, 2), (4, 2, 0), (12, 1, 1)):
        other = _views(dataset, task, config, batch_size, world, workers)
        assert sorted(other) == sorted(one) and all(torch.equal(other[i], one[i]) for i in one)
    keys = sorted(one)
    assert not torch.equal(one[keys[0]], one[keys[1]])


def test_decode_options_are_refused_for_dense_tasks():
    config = AugmentConfig(resized_crop={"size": 16})
    dataset = build_dataset("road_scenes", "train", train_size=2, test_size=2, image_size=[32, 64])
    with pytest.raises(KdkitError, match="classification options; remove them from this segmentation run"):
        build_task("segmentation", dataset).decoder(config)


def test_a_run_trains_from_folder_images_cropped_in_the_workers(photos, tmp_path):
    from test_engine import tiny_config

    from kdkit.api import train_from_config

    data = {
        "name": "image_folder",
        "root": str(photos),
        "eval_split": "train",
        "params": {"mean": [0.5] * 3, "std": [0.25] * 3},
        "eval_params": {"image_size": 16, "resize_size": 20},
        "batch_size": 4,
        "num_workers": 1,
        "augment": {"resized_crop": {"size": 16}, "flip": True},
    }
    summary = train_from_config(
        tiny_config(tmp_path, data=data, stages=[{"epochs": 1, "optimizer": {"lr": 0.01}}])
    )
    run = tmp_path / "runs" / "tiny"
    assert 0 <= summary["last_top1"] <= 100
    assert json.loads((run / "student.json").read_text())["image_size"] == [16, 16]
    assert "random-resized crop 16" in (run / "report.md").read_text()
