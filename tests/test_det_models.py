"""Detectors: every zoo detector builds offline, trains a step and detects on CPU; its FPN taps fire at the
declared strides; the wrappers give exactly torchvision's own losses and detections (labels shifted for
the background class of Faster R-CNN and SSD); the compact pair shares its points; input-size checks."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from _detectors import RCNN_SMALL
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNet

from kdkit.errors import KdkitError
from kdkit.models import build_model
from kdkit.models.detection import DET_MODELS, Detector, check_input_sizes, zoo
from kdkit.models.detection.base import overridden, resized_size, torchvision_targets
from kdkit.models.detection.compact import CompactBackbone
from kdkit.models.detection.wrappers import FasterRCNNDetector, RetinaNetDetector
from kdkit.taps import Taps

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

K = 3
# image 0: two boxes (classes 0 and 2) and a padding row; image 1: padding only (no objects)
TARGETS = torch.tensor(
    [
        [[4.0, 6.0, 30.0, 40.0, 0.0], [20.0, 10.0, 60.0, 50.0, 2.0], [0.0, 0.0, 0.0, 0.0, -1.0]],
        [[0.0, 0.0, 0.0, 0.0, -1.0]] * 3,
    ]
)


def _build(name: str, **kwargs) -> Detector:
    torch.manual_seed(0)
    extra = RCNN_SMALL if name.startswith("fasterrcnn") else {}
    return build_model(name, num_classes=K, **extra, **kwargs)


def _finite_scalars(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    assert losses
    for key, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), f"{key} = {value}"
    return sum(losses.values())


def _check_detections(found: list[dict[str, torch.Tensor]], batch: int, height: int, width: int) -> None:
    assert len(found) == batch
    for d in found:
        n = len(d["scores"])
        assert d["boxes"].shape == (n, 4) and d["labels"].shape == (n,)
        assert d["labels"].dtype == torch.int64 and d["boxes"].is_floating_point()
        if n:
            assert 0 <= d["labels"].min() and d["labels"].max() < K
            assert (d["boxes"][:, 0::2] >= 0).all() and (d["boxes"][:, 0::2] <= width).all()
            assert (d["boxes"][:, 1::2] >= 0).all() and (d["boxes"][:, 1::2] <= height).all()


# zoo.DET_ZOO: tests/test_det_zoo.py
ZOO = [n for n in DET_MODELS if n not in ("fasterrcnn_resnet101_fpn", "det_compact", *zoo.DET_ZOO)]


@pytest.mark.parametrize("name", ZOO)
def test_detector_trains_a_step_detects_and_taps_its_levels(name: str, monkeypatch) -> None:
    def no_download(*args, **kwargs):
        raise AssertionError("a detector tried to download weights")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", no_download)
    model = _build(name).train()
    assert isinstance(model, Detector) and model.num_classes == K
    # torchvision's state-dict keys, so its checkpoints load into the wrapper
    assert set(model.state_dict()) == set(model._tv.state_dict())
    x = torch.randn(2, 3, 64, 64)
    taps = Taps(model, model.feature_taps)
    found = taps(x)
    out = taps.output
    assert out["image_size"].tolist() == [64, 64]
    for key, stride in zip(model.feature_taps, model.feature_strides, strict=True):
        assert found[key].shape[0] == 2 and found[key].shape[-2:] == (math.ceil(64 / stride),) * 2, key
    if model.dense:
        points = sum(
            math.ceil(64 / s) ** 2 * a
            for s, a in zip(
                model.feature_strides, model.anchor_generator.num_anchors_per_location(), strict=True
            )
        )
        assert out["out"].shape == (2, points, K) and out["box"].shape == (2, points, 4)
    else:  # Faster R-CNN: RPN objectness and every level under its name
        assert out["out"].shape[-1] == 1 and out["rpn_box"].shape == (*out["out"].shape[:2], 4)
        for key, level in zip(model.feature_taps, model.level_names, strict=True):
            assert out[level] is found[key]

    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    _finite_scalars(model.losses(out, TARGETS)).backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname
    opt.step()
    _finite_scalars(model.losses(model(x), TARGETS))
    taps.remove()

    model.eval()
    with torch.no_grad():
        out = model(x)
        _finite_scalars(model.losses(out, TARGETS))  # the evaluation loop reads losses in eval mode too
        _check_detections(model.detect(out, score_thresh=0.0), 2, 64, 64)
        if model.dense:  # one decoded box per anchor (test_decode_boxes_... checks the values)
            assert model.decode_boxes(out).shape == out["box"].shape
        else:
            assert model.decode_boxes is None


def test_fasterrcnn_resnet101_builds_offline() -> None:
    model = _build("fasterrcnn_resnet101_fpn")
    assert len(model.backbone.body.layer3) == 23  # ResNet-101's 23 blocks in conv4
    assert isinstance(model.backbone.body.bn1, nn.BatchNorm2d)  # trainable BN, as without backbone weights
    assert model.feature_strides == [4, 8, 16, 32, 64] and model.input_size == (800, 1333)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 60.35) < 0.05


@pytest.mark.slow
def test_fasterrcnn_resnet101_trains_a_step() -> None:
    model = _build("fasterrcnn_resnet101_fpn").train()
    _finite_scalars(model.losses(model(torch.randn(2, 3, 64, 64)), TARGETS)).backward()
    assert all(p.grad is not None for p in model.parameters())


def _small_retinanet() -> RetinaNetDetector:
    """torchvision's RetinaNet on the compact backbone: the RetinaNet wrapper at a tiny cost."""
    torch.manual_seed(0)
    anchors = AnchorGenerator(((16, 20, 25), (32, 40, 50), (64, 80, 100)), ((0.5, 1.0, 2.0),) * 3)
    tv = RetinaNet(CompactBackbone(0.35), K, anchor_generator=anchors)
    return RetinaNetDetector(tv, K, (("p3", "p4", "p5"), (8, 16, 32)))


TV_EQUIVALENCE = {
    "retinanet": _small_retinanet,
    "fcos": lambda: _build("det_compact_student"),
    "ssd": lambda: _build("ssdlite320_mobilenet_v3_large", size=(64, 96)),
    "fasterrcnn": lambda: _build("fasterrcnn_mobilenet_v3_large_fpn", min_size=64, max_size=96),
}


@pytest.mark.parametrize("kind", sorted(TV_EQUIVALENCE))
def test_wrapper_equals_torchvision_own_forward(kind: str) -> None:
    """torchvision's model, with an identity transform (no resize at 64x96, mean 0, std 1), fed the
    labels it expects (class + 1 where class 0 is the background), gives the wrapper's losses and
    detections (labels - 1)."""
    model = TV_EQUIVALENCE[kind]()
    tv = model._tv
    tv.transform.min_size, tv.transform.max_size = (64,), 96
    tv.transform.image_mean, tv.transform.image_std = [0.0] * 3, [1.0] * 3
    offset = 1 if kind in ("ssd", "fasterrcnn") else 0
    x = torch.randn(2, 3, 64, 96)
    tv_targets = [
        {"boxes": TARGETS[0, :2, :4], "labels": TARGETS[0, :2, 4].long() + offset},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    model.train(), tv.train()
    torch.manual_seed(1)  # the RPN and RoI samplers draw; torchvision's transform first draws a min_size
    for _ in x:  # per image (GeneralizedRCNNTransform.torch_choice)
        torch.empty(1).uniform_(0.0, 1.0)
    ours = model.losses(model(x), TARGETS)
    torch.manual_seed(1)
    theirs = tv(list(x), tv_targets)
    assert set(ours) == set(theirs)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], msg=key)

    model.eval(), tv.eval()
    holder = tv.roi_heads if kind == "fasterrcnn" else tv
    with torch.no_grad(), overridden(holder, score_thresh=0.005):
        ours = model.detect(model(x), score_thresh=0.005)
        theirs = tv(list(x))
    assert sum(len(d["boxes"]) for d in ours) > 0
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a["boxes"], b["boxes"])
        torch.testing.assert_close(a["scores"], b["scores"])
        assert a["labels"].tolist() == (b["labels"] - offset).tolist()


@pytest.mark.parametrize("kind", ["fcos", "retinanet", "ssd"])
def test_decode_boxes_are_the_boxes_torchvision_postprocesses(kind: str) -> None:
    """Every box that torchvision's own post-processing keeps (score_thresh 0: the top-scoring anchors of
    each level, then NMS) is the decoded box of one anchor of that image, to float precision."""
    model = TV_EQUIVALENCE[kind]().eval()
    x = torch.randn(2, 3, 64, 96)
    out = model(x)
    decoded = model.decode_boxes(out)
    assert decoded.shape == (*out["box"].shape[:2], 4) and decoded.dtype == torch.float32
    assert decoded.requires_grad  # a function of out["box"]
    assert (decoded[..., 0::2] >= 0).all() and (decoded[..., 0::2] <= 96).all()
    assert (decoded[..., 1::2] >= 0).all() and (decoded[..., 1::2] <= 64).all()
    assert (decoded[..., 2:] >= decoded[..., :2]).all()
    with torch.no_grad():
        found = model.detect(out, score_thresh=0.0)
    for image, detections in enumerate(found):
        assert len(detections["boxes"]) > 10
        distance = (detections["boxes"][:, None] - decoded[image].detach()[None]).abs().amax(-1)
        assert distance.min(-1).values.max() < 1e-4, kind


def test_compact_decode_boxes_hand_case() -> None:
    """FCOS's BoxLinearCoder: ``(l, t, r, b)`` distances in units of the point's stride-sized box around
    its centre, then clipped to the image. At 64x96 the stride-8 level is 8x12 points, the stride-16
    level 4x6, starting at index 96; torchvision puts the point of row y, column x at (x, y) * stride."""
    model = _build("det_compact_student")
    out = model(torch.randn(1, 3, 64, 96))
    box = torch.zeros_like(out["box"])
    box[0, 14] = torch.tensor([0.5, 0.25, 1.0, 2.0])  # row 1, col 2: centre (16, 8), stride 8
    box[0, 1] = torch.tensor([1.0, 0.5, 2.0, 0.25])  # row 0, col 1: centre (8, 0)
    box[0, 96 + 7] = torch.tensor([1.0, 1.0, 1.0, 1.0])  # stride 16, row 1, col 1: centre (16, 16)
    decoded = model.decode_boxes({**out, "box": box})
    # (16 - 4, 8 - 2, 16 + 8, 8 + 16); (8 - 8, 0 - 4 -> 0, 8 + 16, 0 + 2); (16 -+ 16)
    torch.testing.assert_close(decoded[0, 14], torch.tensor([12.0, 6.0, 24.0, 24.0]))
    torch.testing.assert_close(decoded[0, 1], torch.tensor([0.0, 0.0, 24.0, 2.0]))
    torch.testing.assert_close(decoded[0, 96 + 7], torch.tensor([0.0, 0.0, 32.0, 32.0]))
    torch.testing.assert_close(decoded[0, 15], torch.tensor([24.0, 8.0, 24.0, 8.0]))  # zero distances
    assert FasterRCNNDetector.decode_boxes is None and Detector.decode_boxes is None  # optional


def _rig_class(model: Detector, cls: int) -> None:
    """Make the last classifier predict background class 0 + 1 + ``cls`` (torchvision's numbering) with
    probability ~1 everywhere, and zero box deltas."""
    with torch.no_grad():
        if hasattr(model, "roi_heads"):
            predictor = model.roi_heads.box_predictor
            for layer in (predictor.cls_score, predictor.bbox_pred):
                layer.weight.zero_()
                layer.bias.zero_()
            predictor.cls_score.bias[1 + cls] = 20.0
        else:  # SSDlite: one 1x1 conv per level predicts (anchor, class) channels
            for block in model.head.classification_head.module_list:
                conv = block[-1]
                conv.weight.zero_()
                conv.bias.zero_()
                conv.bias.view(-1, K + 1)[:, 1 + cls] = 20.0


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_fpn", "ssdlite320_mobilenet_v3_large"])
def test_background_models_shift_labels(name: str) -> None:
    model = _build(name)
    # in: the RoI heads get class + 1 (a hand case through the wrapper's conversion)
    converted = torchvision_targets(TARGETS, label_offset=1)
    assert converted[0]["labels"].tolist() == [1, 3] and converted[1]["labels"].numel() == 0
    torch.testing.assert_close(converted[0]["boxes"], TARGETS[0, :2, :4])
    if hasattr(model, "roi_heads"):
        seen = []
        forward = model.roi_heads.forward
        model.roi_heads.forward = lambda f, p, s, t=None: (seen.append(t), forward(f, p, s, t))[1]
        model.train().losses(model(torch.randn(2, 3, 64, 64)), TARGETS)
        assert [t["labels"].tolist() for t in seen[0]] == [[1, 3], []]
        model.roi_heads.forward = forward
    # out: a classifier rigged to torchvision's class 2 detects kdkit's class 1 only
    _rig_class(model, 1)
    with torch.no_grad():
        found = model.eval().detect(model(torch.randn(2, 3, 64, 64)))
    assert all(len(d["labels"]) > 0 and (d["labels"] == 1).all() for d in found)


def test_compact_pair_shares_points_and_the_student_is_much_smaller() -> None:
    teacher, student = _build("det_compact_teacher"), _build("det_compact_student")
    x = torch.randn(1, 3, 128, 256)
    with torch.no_grad():
        t_out, s_out = teacher.eval()(x), student.eval()(x)
    t_anchors, t_counts = teacher.anchors(t_out)
    s_anchors, s_counts = student.anchors(s_out)
    assert t_counts == s_counts == [16 * 32, 8 * 16, 4 * 8]
    torch.testing.assert_close(t_anchors[0], s_anchors[0])
    # FCOS points: torchvision puts them at (x, y) * stride, as stride-sized boxes (sizes = strides)
    torch.testing.assert_close(t_anchors[0][1], torch.tensor([4.0, -4.0, 12.0, 4.0]))
    assert t_out["out"].shape == s_out["out"].shape == (1, 672, K)
    assert teacher.feature_strides == student.feature_strides == [8, 16, 32]
    assert teacher.dense and student.dense and teacher.input_size is None
    t_params = sum(p.numel() for p in teacher.parameters())
    s_params = sum(p.numel() for p in student.parameters())
    assert t_params < 3e6 and t_params > 6 * s_params


def test_check_input_sizes_names_the_mismatch() -> None:
    teacher, student = _build("det_compact_teacher"), _build("det_compact_student")
    check_input_sizes(student, teacher, (128, 256))
    check_input_sizes(student, None, None)
    with pytest.raises(KdkitError, match="size_divisible 32") as err:
        check_input_sizes(student, teacher, (120, 256))
    assert "\n" not in str(err.value)
    with pytest.raises(KdkitError, match="needs a detector as teacher"):
        check_input_sizes(student, nn.Conv2d(3, 3, 1), (128, 256))

    fcos = _build("fcos_resnet50_fpn", min_size=128, max_size=256)
    fcos_800 = _build("fcos_resnet50_fpn")
    assert fcos.input_size == (128, 256) and fcos_800.input_size == (800, 1333)
    check_input_sizes(student, fcos, (128, 256))  # the compact student takes any size
    with pytest.raises(KdkitError, match=r"teacher \(800, 1333\), student \(128, 256\)"):
        check_input_sizes(fcos, fcos_800, (128, 256))
    # torchvision would resize 64x128 to 128x256 (scale min(128/64, 256/128) = 2)
    assert resized_size(fcos, (64, 128)) == (128, 256)
    assert resized_size(fcos, (96, 256)) == (96, 256)  # the long side caps: scale 1
    with pytest.raises(KdkitError, match="resized to 128x256.*min_size=64, max_size=128"):
        check_input_sizes(fcos, None, (64, 128))

    ssd = _build("ssdlite320_mobilenet_v3_large")
    assert ssd.input_size == (320, 320) and ssd.fixed_size == (320, 320) and ssd.size_divisible == 1
    with pytest.raises(KdkitError, match=r"resized to 320x320.*size=\[128, 256\]"):
        check_input_sizes(ssd, None, (128, 256))
    ssd_wide = _build("ssdlite320_mobilenet_v3_large", size=(128, 256))
    assert ssd_wide.fixed_size == (128, 256) and ssd_wide._tv.transform.fixed_size == (256, 128)
    check_input_sizes(ssd_wide, None, (128, 256))


def test_targets_convert_and_bad_shapes_are_named() -> None:
    converted = torchvision_targets(TARGETS)
    assert converted[0]["labels"].tolist() == [0, 2] and converted[0]["labels"].dtype == torch.int64
    assert converted[1]["boxes"].shape == (0, 4)
    with pytest.raises(KdkitError, match=r"\[B, M, 5\].*pad_targets"):
        torchvision_targets(TARGETS[..., :4])
    model = _build("det_compact_student")
    with pytest.raises(ValueError, match="another model"):
        out = model(torch.randn(1, 3, 64, 64))
        model.losses({**out, "image_size": torch.tensor([128, 128])}, TARGETS[:1])


def test_detectors_are_registered_with_sizes() -> None:
    from kdkit.registry import MODELS

    for name in DET_MODELS:
        assert name in MODELS
    entry = {e.name: e.description for e in MODELS.entries()}
    assert "GFLOPs at 128x256" in entry["det_compact_teacher"] and "M params" in entry["det_compact_student"]


def test_torchvision_detector_names_build_kdkit_wrappers():
    """``torchvision:<detector>`` builds the zoo wrapper (a Detector); an unwrapped detector is named."""
    from kdkit.errors import KdkitError
    from kdkit.models import build_model
    from kdkit.models.detection import Detector

    model = build_model("torchvision:fcos_resnet50_fpn", num_classes=3)
    assert isinstance(model, Detector) and model.num_classes == 3
    with pytest.raises(KdkitError, match="no kdkit wrapper; wrapped: .*fcos_resnet50_fpn"):
        build_model("torchvision:keypointrcnn_resnet50_fpn", num_classes=3)
