"""Per-sample augmentation replay (issue 12, item 1): a sample's augmented image depends on
``(seed, stage, epoch, dataset index)`` only, not on the batch size, its batch position or the process."""

from __future__ import annotations

import pytest
import torch
from test_engine import tiny_config

from kdkit.api import train_from_config
from kdkit.config import AugmentConfig
from kdkit.data import build_dataset
from kdkit.data.draws import sample_keys
from kdkit.engine.batches import Batches
from kdkit.engine.distiller import Distiller
from kdkit.engine.distributed import DistInfo
from kdkit.engine.tasks import build_task

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _seen(tmp_path, monkeypatch, batch_size: int) -> dict[int, torch.Tensor]:
    """Train one epoch and return the augmented image the student saw for every dataset index."""
    seen: dict[int, torch.Tensor] = {}
    forward = Distiller.forward

    def recording(self, images, labels, epoch, progress, indices, *rest):
        for index, image in zip(indices.tolist(), images):
            seen[index] = image.detach().clone()
        return forward(self, images, labels, epoch, progress, indices, *rest)

    monkeypatch.setattr(Distiller, "forward", recording)
    data = {"name": "embedded", "params": {"train_size": 64, "test_size": 16}, "batch_size": batch_size}
    stages = [{"epochs": 1, "optimizer": {"lr": 0.01}}]
    train_from_config(tiny_config(tmp_path / str(batch_size), data=data, stages=stages))
    return seen


def test_training_sees_each_sample_the_same_whatever_the_batch_size(tmp_path, monkeypatch):
    by_16, by_32 = _seen(tmp_path, monkeypatch, 16), _seen(tmp_path, monkeypatch, 32)
    assert sorted(by_16) == sorted(by_32) == list(range(64))
    assert all(torch.equal(by_16[i], by_32[i]) for i in range(64))
    assert not torch.equal(by_16[0], by_16[1])  # and samples differ (crop offsets, flips)


def test_each_process_augments_its_slice_as_one_process_would():
    """Two processes (ranks simulated) each take half of every global batch of 8: every sample's view
    equals the single-process one, in batches of 8 or 4."""
    data = build_dataset("embedded", "train", train_size=32, test_size=8)
    augment = build_task("classification", data).augmenter(AugmentConfig())  # crop 4, flip

    def views(batch_size: int, info: DistInfo) -> dict[int, torch.Tensor]:
        out = {}
        for images, labels, idx in Batches(data, batch_size, info, train=True).epoch((0, 0, 1), indices=True):
            x, _ = augment(images, labels, sample_keys(idx, "augment", 0, 0, 1))
            out.update(zip(idx.tolist(), x))
        return out

    one = views(8, DistInfo())
    for batch_size, world in ((8, 2), (4, 1)):
        parts = [views(batch_size, DistInfo(rank=r, world=world)) for r in range(world)]
        merged = {i: x for part in parts for i, x in part.items()}
        assert sorted(merged) == sorted(one) and all(torch.equal(merged[i], one[i]) for i in one)
