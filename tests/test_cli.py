"""The `kdkit` command as a user runs it: list, inspect, train, eval, compare."""

from __future__ import annotations

import json
import statistics

import pytest
import yaml
from typer.testing import CliRunner

from kdkit.cli import app
from kdkit.models import build_model, save_weights

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def tiny(tmp_path):
    """A tiny distillation config (resnet20 teacher with random weights -> resnet8) and its folder."""
    teacher = tmp_path / "teacher.safetensors"
    save_weights(build_model("resnet20", num_classes=10), teacher)
    config = {
        "name": "tiny",
        "data": {"name": "embedded", "params": {"train_size": 128, "test_size": 64}, "batch_size": 32},
        "teacher": {"name": "resnet20", "weights": str(teacher)},
        "student": {"name": "resnet8"},
        "terms": [{"name": "ce"}, {"name": "fitnet", "weight": 2.0}],
        "stages": [{"epochs": 1, "optimizer": {"lr": 0.05}, "schedule": {"name": "constant"}}],
        "runtime": {"out_dir": str(tmp_path / "runs"), "progress": False},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_list_terms_shows_every_term_with_a_description():
    output = invoke("list", "terms")
    for name in ("ce", "kd", "dkd", "kd_ls", "dkd_ls", "dist", "fitnet", "at", "sp", "rkd"):
        line = next(line for line in output.splitlines() if line.strip().startswith(name + " "))
        assert len(line.split(maxsplit=1)[1]) > 10, line


def test_list_rejects_unknown_kind():
    result = runner.invoke(app, ["list", "term"])
    assert result.exit_code == 2 and "did you mean 'terms'" in result.output


def test_inspect_reports_taps_and_the_connector(tiny):
    output = invoke("inspect", str(tiny))
    # fitnet defaults to the middle stage: layer2 of both CIFAR ResNets (32 channels at 16x16)
    assert "layer2" in output and "(2, 32, 16, 16)" in output
    assert "connector" in output and "params" in output
    assert "student modules" in output and "fc" in output


def test_train_then_eval_reproduces_the_final_accuracy(tiny, tmp_path):
    invoke("train", str(tiny))
    run_dir = tmp_path / "runs" / "tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    output = invoke("eval", str(run_dir))
    assert f"top-1 {summary['last_top1']:.2f}%" in output


def test_compare_groups_seeds_as_mean_and_std(tiny, tmp_path):
    for seed in (0, 1):
        invoke("train", str(tiny), "--set", f"runtime.seed={seed}", "--set", f"name=tiny-seed{seed}")
    runs = [tmp_path / "runs" / f"tiny-seed{seed}" for seed in (0, 1)]
    best = [json.loads((r / "summary.json").read_text())["best_top1"] for r in runs]
    table = tmp_path / "table.md"
    invoke("compare", *map(str, runs), "--out", str(table))
    row = next(line for line in table.read_text().splitlines() if line.startswith("| tiny "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2"
    assert cells[2] == f"{statistics.fmean(best):.2f} ± {statistics.stdev(best):.2f}"


def test_profile_counts_flops_by_hand_and_prints_a_model(tmp_path):
    from torch import nn

    from kdkit.deploy.profile import count_flops, count_parameters

    layer = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    import torch

    assert count_flops(layer, torch.zeros(1, 3, 4, 4)) == 2 * 48 * 10  # one multiply-add per weight
    assert count_parameters(layer) == 48 * 10 + 10
    output = invoke("profile", "resnet8", "--num-classes", "100")
    assert "0.084M params" in output and "GFLOPs/image" in output


def test_predict_names_classes_of_image_files(tiny, tmp_path):
    from PIL import Image

    invoke("train", str(tiny))
    paths = []
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        paths.append(tmp_path / f"img{i}.png")
        Image.new("RGB", (40, 48), colour).save(paths[-1])
    output = invoke("predict", str(tmp_path / "runs" / "tiny"), *map(str, paths), "--top", "2")
    lines = [line for line in output.splitlines() if line.startswith(str(tmp_path))]
    assert len(lines) == 2 and all(line.count("%") == 2 for line in lines)
