"""Export of detection students: the selection after the graph, parity of each exported format, the
metric of the exported file, and prediction from an ONNX file without the PyTorch model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNet
from typer.testing import CliRunner

from kdkit.cli import app
from kdkit.deploy.commands import export_run, predict_onnx
from kdkit.deploy.detection import DetectionRunner, DetectorDeployable
from kdkit.deploy.export import ModelSpec, export_student
from kdkit.deploy.formats import export_module, parity
from kdkit.deploy.runtime import load_runtime
from kdkit.deploy.summary import parity_text
from kdkit.errors import KdkitError
from kdkit.models import build_model
from kdkit.models.detection.compact import CompactBackbone
from kdkit.models.detection.postprocess import select_detections
from kdkit.models.detection.wrappers import RetinaNetDetector

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = (64, 128)
LOW = 0.001  # random heads score about 0.01 (focal-loss prior): a low threshold keeps boxes to compare


def _same(found, expected, atol=0.0):
    for f, e in zip(found, expected, strict=True):
        assert torch.equal(f["labels"], e["labels"]) and f["boxes"].shape[0] > 0
        torch.testing.assert_close(f["boxes"], e["boxes"], atol=atol, rtol=0)
        torch.testing.assert_close(f["scores"], e["scores"], atol=atol, rtol=0)


def test_select_detections_by_hand_levels_and_classes():
    boxes = torch.tensor(
        [[[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 10]]], dtype=torch.float32
    )  # anchors 0-2 on level 0, anchor 3 on level 1; IoU(0, 1) = 90 / 110
    scores = torch.tensor([[[0.9, 0.1], [0.8, 0.7], [0.03, 0.6], [0.2, 0.95]]])
    settings = {
        "kind": "levels", "score_thresh": 0.05, "nms_thresh": 0.5, "topk_candidates": 2,
        "detections_per_img": 3, "level_counts": [3, 1],
    }  # fmt: skip
    # level 0 keeps its best 2 of 5 entries above 0.05: (0, c0) .9, (1, c0) .8; level 1: (3, c1) .95,
    # (3, c0) .2. Class-wise NMS: (1, c0) and (3, c0) overlap (0, c0) above 0.5 -> gone.
    (found,) = select_detections(boxes, scores, settings)
    assert found["scores"].tolist() == pytest.approx([0.95, 0.9])
    assert found["labels"].tolist() == [1, 0]
    assert found["boxes"].tolist() == [[0, 0, 10, 10]] * 2
    (capped,) = select_detections(boxes, scores, {**settings, "detections_per_img": 1})
    assert capped["scores"].tolist() == pytest.approx([0.95])
    # per class (SSD), best 2 each: c0 .9 (0), .8 (1); c1 .95 (3), .7 (1); NMS drops anchor 1 in both
    (per_class,) = select_detections(boxes, scores, {**settings, "kind": "classes"})
    assert per_class["scores"].tolist() == pytest.approx([0.95, 0.9])
    assert per_class["labels"].tolist() == [1, 0]


def _tiny_retinanet() -> RetinaNetDetector:
    anchors = AnchorGenerator(((16,), (32,), (64,)), ((0.5, 1.0, 2.0),) * 3)
    tv = RetinaNet(CompactBackbone(0.35), 3, anchor_generator=anchors, score_thresh=LOW)
    return RetinaNetDetector(tv, 3, (("p3", "p4", "p5"), (8, 16, 32))).eval()


@pytest.mark.parametrize("family", ["fcos", "retinanet", "ssd"])
def test_select_detections_reproduces_each_dense_detector_s_own_detect(family):
    torch.manual_seed(0)
    if family == "fcos":
        model, size = build_model("det_compact_student", num_classes=3, score_thresh=LOW).eval(), SIZE
    elif family == "retinanet":
        model, size = _tiny_retinanet(), SIZE
    else:
        model, size = build_model("ssdlite320_mobilenet_v3_large", num_classes=3).eval(), (320, 320)
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, *size))
        expected = model.detect(outputs)
        module_boxes = model.decode(outputs["box"], model.anchor_boxes(size)[0], size)
        found = select_detections(module_boxes, model.scores(outputs), model.postprocess_settings(size))
    _same(found, expected)
    assert model.postprocess_settings(size)["kind"] == ("classes" if family == "ssd" else "levels")


def test_torchscript_detector_matches_pytorch_boxes_scores_and_detections(tmp_path):
    """(ONNX: the export_run test below, which checks the same parity and the mAP of both.)"""
    torch.manual_seed(0)
    model = build_model("det_compact_student", num_classes=3, score_thresh=LOW).eval()
    module = DetectorDeployable(model, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), SIZE)
    path = export_module(
        module, "torchscript", tmp_path / "m.ts", SIZE, True, output_names=("boxes", "scores")
    )
    runner = load_runtime(path)
    x01 = torch.rand(3, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    result = parity(module, runner, x01, names=("boxes", "scores"))
    boxes, scores = result["outputs"]["boxes"], result["outputs"]["scores"]
    assert boxes["max_abs_diff"] <= boxes["tolerance"] and scores["max_abs_diff"] <= scores["tolerance"]
    assert boxes["max_abs_output"] > 50  # pixels of a 64x128 input, held to 1e-4 of their scale
    exported = DetectionRunner(runner, module.settings)
    with torch.no_grad():
        normalised = (x01 - module.mean) / module.std
        _same(exported.detect(exported(x01)), model.detect(model(normalised)), atol=1e-4)


def _tiny_detection_run(root) -> object:
    """A run directory with a random det_compact_student and a road_boxes config (16 test images)."""
    run = root / "run"
    torch.manual_seed(0)
    spec = ModelSpec(
        "det_compact_student", 3, kwargs={"score_thresh": LOW}, image_size=SIZE, task="detection",
        classes=["car", "person", "traffic_sign"], mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
    )  # fmt: skip
    export_student(spec.build(), spec, run)
    params = {"train_size": 16, "test_size": 16, "image_size": list(SIZE), "city": "target"}
    config = {
        "name": "tiny", "task": "detection",
        "data": {"name": "road_boxes", "root": str(root / "data"), "params": params, "eval_batch_size": 8},
        "student": {"name": "det_compact_student"}, "terms": [{"name": "det"}], "stages": [{"epochs": 1}],
    }  # fmt: skip
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def test_export_run_of_a_detector_reports_map_of_both_and_predicts_from_onnx_alone(tmp_path, monkeypatch):
    run = _tiny_detection_run(tmp_path)
    meta = export_run(run, "onnx", parity_images=4, int8=True, calibration=8)
    stored = json.loads((run / "export" / "student.onnx.json").read_text())
    assert stored["task"] == "detection" and stored["output"]["names"] == ["boxes", "scores"]
    assert stored["output"]["boxes"]["shape"] == [1, 8 * 16 + 4 * 8 + 2 * 4, 4]  # points at strides 8/16/32
    assert stored["postprocess"]["level_counts"] == [128, 32, 8]
    assert stored["postprocess"]["score_thresh"] == LOW
    check = stored["parity"]
    assert set(check["outputs"]) == {"boxes", "scores"} and check["metric"] == "map"
    assert check["pytorch"] == pytest.approx(check["exported"], abs=0.01)
    assert set(meta["int8"]["max_abs_diff"]) == {"boxes", "scores"} and 0 <= meta["int8"]["int8"] <= 100
    assert ": boxes " in parity_text(check) and ", scores " in parity_text(check)
    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 120, 3), dtype=np.uint8)).save(image)
    monkeypatch.setattr("kdkit.deploy.commands.load_student", _refuse)
    monkeypatch.setattr("kdkit.models.build_model", _refuse)
    task, results = predict_onnx(
        run / "export" / "student.onnx", [image], out=tmp_path / "out", min_score=0.0
    )
    assert task == "detection" and results[0]["detections"]
    assert (tmp_path / "out" / "scene_boxes.png").is_file()
    listed = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert listed[0]["detections"] == results[0]["detections"]
    x1, y1, x2, y2 = zip(*(d["box"] for d in listed[0]["detections"]))
    # letterboxed by 128/120 into 64x128 (padded below): boxes map back, clipped to the 50x120 image
    assert min(x1) >= 0 and min(y1) >= 0 and max(x2) <= 120 and max(y2) <= 50


def _refuse(*args, **kwargs):
    raise AssertionError("predicting from an ONNX file must not build the PyTorch model")


def test_a_two_stage_detector_is_refused_in_one_line(tmp_path):
    spec = ModelSpec("fasterrcnn_mobilenet_v3_large_fpn", 3, image_size=(320, 320), task="detection")
    export_student(build_model("fasterrcnn_mobilenet_v3_large_fpn", num_classes=3), spec, tmp_path)
    result = CliRunner().invoke(app, ["export", str(tmp_path), "--format", "onnx"])
    assert result.exit_code == 2
    assert "only dense detectors (FCOS, RetinaNet, SSD, det_compact_*) export" in result.output
    with pytest.raises(KdkitError, match="two-stage detector"):
        DetectorDeployable(
            build_model("fasterrcnn_mobilenet_v3_large_fpn", num_classes=3), (0,) * 3, (1,) * 3, SIZE
        )
