"""The seeds' extra detectors (kdkit.models.detection.zoo): each builds offline with torchvision's
architecture, taps its FPN levels at the declared strides; the small Faster R-CNN students train a step
and detect on CPU (the heavy teachers: slow)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from _detectors import RCNN_SMALL
from torch import nn

from kdkit.errors import KdkitError
from kdkit.models import build_model
from kdkit.models.detection import DET_MODELS, Detector, check_input_sizes, zoo
from kdkit.models.detection.wrappers import FasterRCNNDetector, FCOSDetector, RetinaNetDetector
from kdkit.registry import MODELS
from kdkit.taps import Taps

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

K = 3
TARGETS = torch.tensor(  # image 0: two boxes (classes 0, 2) + padding; image 1: no objects
    [
        [[4.0, 6.0, 30.0, 40.0, 0.0], [20.0, 10.0, 60.0, 50.0, 2.0], [0.0, 0.0, 0.0, 0.0, -1.0]],
        [[0.0, 0.0, 0.0, 0.0, -1.0]] * 3,
    ]
)
# name: (wrapper, strides, blocks per ResNet stage or None)
EXPECTED = {
    "fasterrcnn_resnet18_fpn": (FasterRCNNDetector, [4, 8, 16, 32, 64], [2, 2, 2, 2]),
    "fasterrcnn_mobilenet_v2_fpn": (FasterRCNNDetector, [4, 8, 16, 32, 64], None),
    "retinanet_resnext101_64x4d_fpn": (RetinaNetDetector, [8, 16, 32, 64, 128], [3, 4, 23, 3]),
    "fcos_resnet101_fpn": (FCOSDetector, [8, 16, 32, 64, 128], [3, 4, 23, 3]),
}
SMALL = ["fasterrcnn_resnet18_fpn", "fasterrcnn_mobilenet_v2_fpn"]


def _build(name: str, **kwargs) -> Detector:
    torch.manual_seed(0)
    extra = RCNN_SMALL if name.startswith("fasterrcnn") else {}
    return build_model(name, num_classes=K, **extra, **kwargs)


def test_zoo_is_registered_and_listed_with_the_detectors() -> None:
    assert set(EXPECTED) == set(zoo.DET_ZOO) and set(zoo.DET_ZOO) <= set(DET_MODELS)
    entries = {e.name: e.description for e in MODELS.entries()}
    assert all("offline" in entries[n] and "M params" in entries[n] for n in zoo.DET_ZOO)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_zoo_detector_builds_offline_and_taps_its_levels(name: str, monkeypatch) -> None:
    def no_download(*args, **kwargs):
        raise AssertionError("a detector tried to download weights")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", no_download)
    wrapper, strides, blocks = EXPECTED[name]
    model = _build(name)
    assert type(model) is wrapper and model.num_classes == K
    assert model.feature_strides == strides and model.input_size == (800, 1333)
    assert model.size_divisible == 32 and model.fixed_size is None
    assert set(model.state_dict()) == set(model._tv.state_dict())  # torchvision's keys
    body = model.backbone.body
    if blocks is not None:
        assert [len(getattr(body, f"layer{i}")) for i in (1, 2, 3, 4)] == blocks
        assert isinstance(body.bn1, nn.BatchNorm2d)  # trainable BN, as torchvision without weights
    if name == "retinanet_resnext101_64x4d_fpn":  # 64 groups of width 4: 64 * 4 = 256 channels in conv2
        conv = body.layer1[0].conv2
        assert (conv.groups, conv.in_channels) == (64, 256)
    if name == "fasterrcnn_mobilenet_v2_fpn":  # the last block of strides 4, 8, 16, 32
        inner = [b[0].in_channels for b in model.backbone.fpn.inner_blocks]
        assert inner == [24, 32, 96, 1280]
    assert all(p.requires_grad for p in model.parameters())  # all stages trainable (trainable_layers 5)

    x = torch.randn(1, 3, 64, 96)
    taps = Taps(model.eval(), model.feature_taps)
    with torch.no_grad():
        found = taps(x)
    taps.remove()
    for key, stride in zip(model.feature_taps, strides, strict=True):
        assert found[key].shape == (1, 256, math.ceil(64 / stride), math.ceil(96 / stride)), key


@pytest.mark.parametrize("name", SMALL)
def test_small_zoo_students_train_a_step_and_detect(name: str) -> None:
    model = _build(name).train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    losses = model.losses(out, TARGETS)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname
    before = model.roi_heads.box_predictor.cls_score.weight.detach().clone()
    torch.optim.SGD(model.parameters(), lr=1e-2).step()
    assert not torch.equal(before, model.roi_heads.box_predictor.cls_score.weight)
    with torch.no_grad():
        found = model.eval().detect(model(x), score_thresh=0.0)
    assert len(found) == 2
    for d in found:
        assert d["boxes"].shape == (len(d["scores"]), 4)
        assert ((0 <= d["labels"]) & (d["labels"] < K)).all()


def test_preset_pairs_agree_on_the_input_size() -> None:
    """The COCO presets' pairs built at min_size 800, max_size 1344 take 800x1344 crops; the zoo's
    default (800, 1333) would resize an 800x1344 batch (1333 / 1344 < 1) and is named."""
    sizes = {"min_size": 800, "max_size": 1344}
    student = _build("fasterrcnn_mobilenet_v2_fpn", **sizes)
    teacher = _build("fasterrcnn_resnet50_fpn", **sizes)
    check_input_sizes(student, teacher, (800, 1344))
    with pytest.raises(KdkitError, match="min_size=800, max_size=1344"):
        check_input_sizes(_build("fasterrcnn_resnet18_fpn"), None, (800, 1344))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["retinanet_resnext101_64x4d_fpn", "fcos_resnet101_fpn"])
def test_heavy_zoo_teachers_train_a_step(name: str) -> None:
    model = _build(name).train()
    losses = model.losses(model(torch.randn(2, 3, 64, 64)), TARGETS)
    assert set(losses) >= {"classification", "bbox_regression"}
    sum(losses.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
