"""Deployment formats (issue 13, items 1-3 and ONNX prediction of item 4): exports match PyTorch with the
normalisation folded in, int8 reports a metric, ONNX prediction needs only the file and its metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from kdkit.cli import app
from kdkit.data.augment import BatchAugment
from kdkit.deploy import profile as profile_module
from kdkit.deploy.commands import export_run, predict_onnx
from kdkit.deploy.export import ModelSpec, export_student
from kdkit.deploy.formats import (
    TOLERANCE,
    Deployable,
    check_parity,
    export_module,
    parity,
    read_metadata,
    write_metadata,
)
from kdkit.deploy.latency import latency_table
from kdkit.deploy.profile import latency_stats
from kdkit.deploy.runtime import load_runtime
from kdkit.errors import KdkitError
from kdkit.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN, STD = (0.3, 0.5, 0.7), (0.2, 0.25, 0.4)
SPIRIT = {"teacher": "mini_deeplab_teacher", "split": "backbone", "widths": [64, 32], "depths": [3, 4]}
# (zoo name, kwargs, input size): the families the demos use (CIFAR ResNet: resnet8/resnet20; the
# segmentation demo's student, teacher and Spirit Distillation student)
FAMILIES = [
    ("resnet8", {}, (16, 16)),
    ("mini_deeplab_student", {}, (32, 32)),
    ("mini_deeplab_teacher", {}, (32, 32)),
    ("spirit", SPIRIT, (32, 32)),
]


def _reference(model: nn.Module, x01: torch.Tensor) -> torch.Tensor:
    """What PyTorch computes for images in [0, 1]: kdkit's own normalisation, then the network."""
    with torch.no_grad():
        out = model(BatchAugment(0, False, MEAN, STD).normalize(x01))
    return out["out"] if isinstance(out, dict) else out


@pytest.mark.parametrize("name,kwargs,size", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_onnx_and_torchscript_match_pytorch_with_normalisation_folded(tmp_path, name, kwargs, size):
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, **kwargs).eval()
    module = Deployable(model, MEAN, STD)
    x01 = torch.rand(3, 3, *size, generator=torch.Generator().manual_seed(1))
    expected = _reference(model, x01)
    for fmt, suffix in (("onnx", ".onnx"), ("torchscript", ".ts")):
        path = export_module(module, fmt, tmp_path / f"m{suffix}", size)  # fixed batch 1
        got = load_runtime(path)(x01)  # batch 3 fed one image at a time
        assert got.shape == expected.shape
        bound = TOLERANCE * max(1.0, float(expected.abs().max()))
        assert float((got - expected).abs().max()) <= bound, fmt


def test_exported_program_with_dynamic_batch_and_a_dict_output(tmp_path):
    class DictNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return {"out": self.conv(x), "aux": x.mean()}

    torch.manual_seed(0)
    model = DictNet().eval()
    path = export_module(Deployable(model, MEAN, STD), "exported-program", tmp_path / "m.pt2", (8, 8), True)
    x01 = torch.rand(5, 3, 8, 8)
    got = load_runtime(path)(x01)
    # the "out" entry of the dict, computed from the normalised input
    torch.testing.assert_close(got, _reference(model, x01), rtol=0, atol=1e-5)


def test_parity_measures_the_max_abs_difference_and_fails_beyond_tolerance():
    reference = nn.Identity()
    images = torch.zeros(4, 3, 2, 2)
    images[2, 1, 0, 0] = 3.0  # max |PyTorch output| = 3 -> tolerance 3e-4

    def off_by(delta):
        return lambda x: x + delta * (torch.arange(x.numel()).view_as(x) == 0)

    result = parity(reference, off_by(2e-4), images, batch=2)
    assert result["max_abs_diff"] == pytest.approx(2e-4, rel=1e-3)
    assert result["tolerance"] == pytest.approx(3e-4)
    check_parity("onnx", result)
    bad = parity(reference, off_by(5e-4), images, batch=2)
    with pytest.raises(KdkitError, match="onnx export differs from PyTorch by 0.0005"):
        check_parity("onnx", bad)


def test_latency_median_and_p95_exclude_warmup(monkeypatch):
    # warm-up calls read the clock once (untimed); timed call i (i = 3..22) starts at i s and takes i ms
    clock = iter([0.0, 1.0, 2.0] + [t for i in range(3, 23) for t in (float(i), i + i / 1e3)])
    monkeypatch.setattr(profile_module, "perf_counter", lambda: next(clock))
    result = latency_stats(lambda x: x, torch.zeros(1), repeats=20, warmup=3)
    assert result["median_ms"] == pytest.approx(12.5)  # median of 3..22
    assert result["p95_ms"] == pytest.approx(21.0)  # nearest rank: 19th of 20


# ------------------------------------------------------------------ run directories


def _tiny_run(root: Path, with_config: bool = True) -> Path:
    """A run directory holding a random resnet8 on 16x16 embedded images (64 train, 32 test)."""
    run = root / "run"
    torch.manual_seed(0)
    spec = ModelSpec(
        "resnet8", 10, mean=MEAN, std=STD, classes=[f"c{i}" for i in range(10)], image_size=(16, 16)
    )
    export_student(spec.build(), spec, run)
    if with_config:
        params = {"train_size": 64, "test_size": 32, "image_size": 16}
        config = {
            "name": "tiny",
            "data": {"name": "embedded", "root": str(root / "data"), "params": params, "eval_batch_size": 16},
            "student": {"name": "resnet8"},
            "teacher": {"name": "resnet8"},
            "terms": [{"name": "ce"}],
            "stages": [{"epochs": 1}],
        }
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def test_export_run_int8_reports_metrics_and_the_latency_table_covers_four_models(tmp_path):
    run = _tiny_run(tmp_path)
    meta = export_run(run, "onnx", dynamic_batch=True, parity_images=8, int8=True, calibration=16)
    stored = json.loads((run / "export" / "student.onnx.json").read_text())
    assert stored["normalization"] == {"mean": list(MEAN), "std": list(STD), "folded": True}
    assert stored["input"]["shape"] == ["batch", 3, 16, 16] and stored["input"]["range"] == [0.0, 1.0]
    assert stored["task"] == "classification" and stored["opset"] == 18 and "onnx" in stored["versions"]
    check = stored["parity"]
    assert check["images"] == 8 and check["max_abs_diff"] <= check["tolerance"]
    assert check["metric"] == "top1" and check["metric_images"] == 32
    assert abs(check["pytorch"] - check["exported"]) <= 100 / 32  # one image at most may flip
    q = meta["int8"]
    assert q["calibration_images"] == 16 and q["size_bytes"] < q["fp32_size_bytes"]
    assert np.isfinite(q["int8"]) and 0 <= q["int8"] <= 100
    assert (run / "export" / "student.int8.onnx.json").is_file()
    rows = latency_table(run, batches=(1, 2), repeats=2)  # reuses the exports above
    assert [r["model"].split(" (")[0] for r in rows[::2]] == [
        "teacher resnet8", "student resnet8", "student ONNX fp32", "student ONNX int8",
    ]  # fmt: skip
    assert [r["batch"] for r in rows] == [1, 2] * 4
    assert all(r["median_ms"] > 0 and r["p95_ms"] >= r["median_ms"] for r in rows)


def test_cli_export_without_config_checks_parity_on_random_images(tmp_path):
    run = _tiny_run(tmp_path, with_config=False)
    result = CliRunner().invoke(app, ["export", str(run), "--format", "torchscript", "--images", "4"])
    assert result.exit_code == 0, result.output
    meta = read_metadata(run / "export" / "student.ts")
    assert meta["parity"]["source"] == "uniform random images" and "metric" not in meta["parity"]
    assert "max |exported - PyTorch|" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--format", "tflite"], "unknown export format 'tflite'; choose one of: onnx, torchscript"),
        (["--format", "torchscript", "--int8"], "--int8 works with --format onnx only"),
        ([], "no student.json at"),
    ],
    ids=["unknown-format", "int8-torchscript", "no-student-json"],
)
def test_export_errors_are_one_line(tmp_path, args, message):
    run = tmp_path / "run"
    run.mkdir()
    if message != "no student.json at":
        run = _tiny_run(tmp_path, with_config=False)
    result = CliRunner().invoke(app, ["export", str(run), *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert message in result.output
    assert not (run / "export").exists()


# ------------------------------------------------------------------ ONNX prediction from metadata


class RedGreen(nn.Module):
    """Two classes, "red" and "green": logits = 10 * (red, green) channel values (per pixel, or
    averaged over the image for classification)."""

    def __init__(self, dense: bool):
        super().__init__()
        self.dense = dense
        self.pick = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.pick.weight.zero_()
            self.pick.weight[0, 0] = self.pick.weight[1, 1] = 10.0

    def forward(self, x):
        y = self.pick(x)
        return y if self.dense else y.mean((2, 3))


def _onnx_with_metadata(tmp_path: Path, dense: bool, size: tuple[int, int]) -> Path:
    path = export_module(RedGreen(dense), "onnx", tmp_path / "model.onnx", size)
    meta = {
        "format": "onnx",
        "task": "segmentation" if dense else "classification",
        "classes": ["red", "green"],
        "image_size": list(size),
        "dynamic_batch": False,
    }
    write_metadata(path, meta)
    return path


def _no_torch_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("predicting from an ONNX file must not build the PyTorch model")

    monkeypatch.setattr("kdkit.deploy.export.load_student", refuse)
    monkeypatch.setattr("kdkit.deploy.commands.load_student", refuse)
    monkeypatch.setattr("kdkit.models.build_model", refuse)


def test_onnx_predict_classifies_from_the_metadata_alone(tmp_path, monkeypatch):
    model = _onnx_with_metadata(tmp_path, dense=False, size=(8, 8))
    _no_torch_model(monkeypatch)
    images = []
    for name, colour in (("r.png", (200, 20, 0)), ("g.png", (10, 150, 0))):
        Image.new("RGB", (20, 12), colour).save(tmp_path / name)
        images.append(tmp_path / name)
    task, ranked = predict_onnx(model, images, top=2)
    assert task == "classification"
    assert [r[0][0] for r in ranked] == ["red", "green"]
    # softmax of 10 * (200/255, 20/255): p(red) = 1 / (1 + exp(-10 * 180/255))
    assert ranked[0][0][1] == pytest.approx(1 / (1 + np.exp(-10 * 180 / 255)), abs=1e-5)
    result = CliRunner().invoke(app, ["predict", str(model), str(images[1]), "--top", "1"])
    assert result.exit_code == 0, result.output
    assert f"{images[1]}: green" in result.output.replace("\n", "")


def test_onnx_predict_segments_and_writes_overlays(tmp_path, monkeypatch):
    model = _onnx_with_metadata(tmp_path, dense=True, size=(8, 8))
    _no_torch_model(monkeypatch)
    picture = np.zeros((8, 16, 3), np.uint8)
    picture[:, :6, 0] = 200  # left 6 columns red, the rest green
    picture[:, 6:, 1] = 200
    Image.fromarray(picture).save(tmp_path / "scene.png")
    task, results = predict_onnx(model, [tmp_path / "scene.png"], out=tmp_path / "out")
    assert task == "segmentation"
    mask = np.asarray(Image.open(results[0]["mask"]))
    # the model sees the image resized to 8x8 (bilinear); the boundary column may blur into either class
    assert (mask[:, :5] == 0).all() and (mask[:, 7:] == 1).all()
    assert results[0]["coverage"][0][0] == "green"
    assert results[0]["overlay"].is_file()


def test_an_opset_the_exporter_cannot_write_is_a_one_line_error(tmp_path):
    # the dynamo exporter writes opset 18 and cannot convert ReduceMean (axes as an input) down to 13
    with pytest.raises(KdkitError, match="could not convert the model to opset 13 .*use --opset 18"):
        export_module(RedGreen(dense=False), "onnx", tmp_path / "m.onnx", (4, 4), opset=13)


def test_cli_profile_with_a_runtime_exports_a_dynamic_batch_file_and_times_each_batch(tmp_path):
    run = _tiny_run(tmp_path, with_config=False)
    args = ["profile", str(run), "--runtime", "torchscript", "--batch", "1", "--batch", "3", "--repeats", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("torchscript batch")]
    assert [line.split(":")[0] for line in lines] == ["torchscript batch 1", "torchscript batch 3"]
    assert all("(2 runs)" in line and "student.ts" in line for line in lines)
    assert read_metadata(run / "export" / "student.ts")["dynamic_batch"] is True
    # the run's report gets a Deployment section: the export's parity, then the measured latencies
    (run / "report.md").write_text("# Run\n\n| table |\n\nFiles: `config.yaml`\n")
    assert CliRunner().invoke(app, args).exit_code == 0  # a second profile rewrites the section
    report = (run / "report.md").read_text()
    assert report.count("## Deployment") == 1 and report.rstrip().endswith("Files: `config.yaml`")
    assert "- `export/student.ts` (torchscript): max |exported - PyTorch|" in report
    assert "| torchscript | 1 |" in report and "| torchscript | 3 |" in report
    bad = CliRunner().invoke(app, ["profile", str(run), "--runtime", "tensorrt"])
    assert (
        bad.exit_code == 2 and "unknown runtime 'tensorrt'; choose one of: torch, onnxruntime" in bad.output
    )
