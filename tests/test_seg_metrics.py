"""Segmentation metrics, Spirit Distillation's robustness figures, sliding-window inference and the
per-image mIoU histogram. Expected values are worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kdkit.engine.segmetrics import (
    SegmentationMeter,
    class_iou,
    confusion_matrix,
    hp_acc,
    mean_iou,
    miou_variance,
    per_image_miou,
    pixel_accuracy,
    slide_logits,
)
from kdkit.report.histogram import plot_miou_histogram

NAN = math.nan

# Two 2x2 images, 2 classes, 255 = ignore.
# image 0: target [[0, 0], [1, 255]], prediction [[0, 1], [1, 0]]
# image 1: target [[1, 1], [1, 1]],   prediction [[1, 1], [1, 0]]
TARGET = torch.tensor([[[0, 0], [1, 255]], [[1, 1], [1, 1]]])
PRED = torch.tensor([[[0, 1], [1, 0]], [[1, 1], [1, 0]]])


def test_confusion_matrix_iou_and_pixel_accuracy_hand_values():
    # Labelled pixels (target, pred): image 0: (0,0), (0,1), (1,1); image 1: (1,1) x3, (1,0).
    # rows = target: [[1, 1], [1, 4]]
    cm = confusion_matrix(PRED, TARGET, 2)
    assert cm.dtype == torch.int64 and cm.tolist() == [[1, 1], [1, 4]]
    # IoU 0 = 1 / (1 + 1 + 1) = 1/3; IoU 1 = 4 / (4 + 1 + 1) = 2/3; mean 1/2; pixel acc 5/7
    torch.testing.assert_close(class_iou(cm), torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    assert mean_iou(cm) == pytest.approx(0.5)
    assert pixel_accuracy(cm) == pytest.approx(5 / 7)
    # the flattened pixels give the same matrix; a class seen in neither target nor prediction is NaN
    assert torch.equal(confusion_matrix(PRED.flatten(), TARGET.flatten(), 2), cm)
    cm3 = confusion_matrix(PRED, TARGET, 3)
    assert math.isnan(class_iou(cm3)[2]) and mean_iou(cm3) == pytest.approx(0.5)
    # a class only predicted has IoU 0 (not NaN)
    assert class_iou(torch.tensor([[1, 1], [0, 0]])).tolist() == [0.5, 0.0]
    assert math.isnan(pixel_accuracy(torch.zeros(2, 2, dtype=torch.int64)))
    with pytest.raises(ValueError, match="outside 0..1"):
        confusion_matrix(PRED, torch.full_like(TARGET, 7), 2)


def test_per_image_miou_hand_values():
    # image 0: cm [[1, 1], [0, 1]] -> IoU 0 = 1/2, IoU 1 = 1/2 -> 1/2
    # image 1: cm [[0, 0], [1, 3]] -> class 0 only predicted: IoU 0 = 0/1 = 0, IoU 1 = 3/4 -> 3/8
    expected = torch.tensor([0.5, 0.375], dtype=torch.float64)
    torch.testing.assert_close(per_image_miou(PRED, TARGET, 2), expected)
    # a class absent from an image's target and prediction does not count in its mean:
    # image 1 predicted all correct (only class 1 anywhere) -> 1, not (0 + 1) / 2
    assert per_image_miou(TARGET[1:], TARGET[1:], 2).tolist() == [1.0]
    # no labelled pixel -> NaN
    assert math.isnan(per_image_miou(PRED[:1], torch.full_like(TARGET[:1], 255), 2)[0])


def test_miou_variance_and_hp_acc_hand_values():
    # values 0.5, 0.75, 1.0: mean 0.75, population variance (1/16 + 0 + 1/16) / 3 = 1/24
    values = [0.5, 0.75, 1.0]
    assert miou_variance(values) == pytest.approx(1 / 24)
    # strictly above theta = 0.75: only 1.0 counts -> 1/3; theta 0.7 -> 2/3
    assert hp_acc(values) == pytest.approx(1 / 3)
    assert hp_acc(values, threshold=0.7) == pytest.approx(2 / 3)
    # images without labelled pixels (NaN / None) are left out
    assert miou_variance([*values, NAN]) == pytest.approx(1 / 24)
    assert hp_acc([*values, None]) == pytest.approx(1 / 3)
    assert math.isnan(hp_acc([])) and math.isnan(miou_variance([None]))


def test_meter_from_logits_and_predictions():
    # logits at half the mask's resolution: bilinear upsampling of a 1x1 map is constant -> class 1
    meter = SegmentationMeter(2, hp_threshold=0.4)
    meter.update(torch.tensor([[[[0.0]], [[1.0]]]]), TARGET[1:].clone())
    meter.update(PRED[:1], TARGET[:1])
    out = meter.compute()
    # image 1 (first update) all class 1 predicted, target all 1 -> mIoU 1; image 0 -> 1/2.
    # cm = image 1 [[0, 0], [0, 4]] + image 0 [[1, 1], [0, 1]] = [[1, 1], [0, 5]]
    # IoU 0 = 1/2, IoU 1 = 5/6 -> mIoU 2/3; pixel acc 6/7.
    assert out["miou"] == pytest.approx(100 * 2 / 3)
    assert out["pixel_acc"] == pytest.approx(100 * 6 / 7)
    assert out["class_iou"] == pytest.approx([50.0, 100 * 5 / 6])
    assert out["image_miou"] == pytest.approx([1.0, 0.5])  # fractions, by image index (update order)
    assert out["miou_var"] == pytest.approx(1000 / 16)  # (1/4)^2 in units of 1e-3 (Table III)
    assert out["hp_acc"] == pytest.approx(100.0)  # both above 0.4, in %
    # explicit dataset indices order the images; absent classes and empty images come out as None
    meter = SegmentationMeter(3)
    meter.update(PRED, TARGET, indices=torch.tensor([5, 2]))
    meter.update(PRED[:1], torch.full_like(TARGET[:1], 255), indices=torch.tensor([0]))
    out = meter.compute()
    assert out["image_miou"] == [None, 0.375, 0.5]
    assert out["class_iou"][2] is None
    assert meter.compute() == out  # compute leaves the state alone


def _meter_worker(rank: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        preds, targets = _three_images()
        meter = SegmentationMeter(2)
        for k in range(rank, 3, 2):  # the strided split of evaluation batches: rank 0 gets 2 images
            meter.update(preds[k : k + 1], targets[k : k + 1])
        results[rank] = meter.compute()
    finally:
        dist.destroy_process_group()


def _three_images() -> tuple[torch.Tensor, torch.Tensor]:
    third = torch.tensor([[[0, 0], [0, 0]]])
    return torch.cat([PRED, third]), torch.cat([TARGET, third])


def test_meter_reduces_over_processes_with_uneven_counts(tmp_path):
    preds, targets = _three_images()
    single = SegmentationMeter(2)
    single.update(preds, targets)
    expected = single.compute()
    assert expected["image_miou"] == pytest.approx([0.5, 0.375, 1.0])
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_meter_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
        for rank in (0, 1):
            assert results[rank] == expected  # integer counts, the same values: exact


# --------------------------------------------------------------------------------- slide inference


def test_slide_equals_whole_for_a_pointwise_model():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 1).double()
    for size, crop, stride in [((7, 10), (4, 4), (3, 2)), ((5, 6), (8, 8), (4, 4)), ((6, 9), (6, 4), (6, 4))]:
        image = torch.randn(2, 3, *size, dtype=torch.float64)
        with torch.no_grad():
            slid = slide_logits(conv, image, 4, crop, stride)
            torch.testing.assert_close(slid, conv(image).float())


def test_slide_averages_overlapping_windows():
    # width 3, crop 2, stride 1: windows at x = 0 and x = 1. The model returns the window's number
    # (0, then 1) everywhere: pixel 0 sees window 0 -> 0, pixel 1 both -> 1/2, pixel 2 window 1 -> 1.
    calls = []

    def model_fn(window):
        calls.append(window.shape)
        return torch.full((1, 1, *window.shape[-2:]), float(len(calls) - 1))

    out = slide_logits(model_fn, torch.zeros(1, 3, 1, 3), 1, (1, 2), (1, 1))
    assert out.tolist() == [[[[0.0, 0.5, 1.0]]]] and len(calls) == 2
    with pytest.raises(ValueError, match="stride"):
        slide_logits(model_fn, torch.zeros(1, 3, 4, 4), 1, (2, 2), (3, 1))


# ---------------------------------------------------------------------------------------- histogram


def test_miou_histogram_is_written(tmp_path):
    series = {"S": [0.6, 0.8, 0.9, None], "S (SD)": [0.7, 0.85, 0.95, 0.99]}
    path = plot_miou_histogram(series, tmp_path / "hist.png", threshold=0.75, bins=10)
    assert path == tmp_path / "hist.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
