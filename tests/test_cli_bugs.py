"""Bugs a user hit with the `kdkit` command (issue 8, item 13) and `kdkit --version`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from kdkit.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def fails(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output


# ------------------------------------------------------------------ a. list refiners


def test_list_refiners_in_a_fresh_process_as_the_cli_runs():
    """A fresh interpreter imports only what the CLI imports: the refiners must be registered there."""
    script = (
        "from kdkit.cli import app\n"
        "for args in (['list', 'refiners'], ['list']):\n"
        "    print('=== ' + ' '.join(args))\n"
        "    app(args, standalone_mode=False)\n"
    )
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    refiners, every = done.stdout.split("=== list\n")
    assert any(line.strip().startswith("style ") for line in refiners.splitlines()), refiners
    sections = [line.split(" (")[0] for line in every.splitlines() if line and not line[0].isspace()]
    assert {"models", "datasets", "terms", "refiners"} <= set(sections), every
    assert any(line.strip().startswith("style ") for line in every.splitlines()), every


# ------------------------------------------------------------------ b. predict on a segmentation student


def test_predict_segments_images_writes_overlays_and_prints_coverage(tmp_path):
    from kdkit.deploy.export import ModelSpec, export_student, read_spec
    from kdkit.models import build_model
    from kdkit.report.overlay import class_colours

    torch.manual_seed(0)
    classes = ["sky", "road", "car"]
    student = build_model("mini_deeplab_student", num_classes=3)
    with torch.no_grad():  # a non-trivial head: the predicted mask is not a single class everywhere
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    spec = ModelSpec("mini_deeplab_student", 3, classes=classes, image_size=(32, 48))
    run = tmp_path / "run"
    export_student(student.eval(), spec, run)
    assert read_spec(run).task == "classification"  # as older runs wrote it: the output shape decides
    g = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(40, 60), (32, 48)]):
        paths.append(tmp_path / "in" / f"street{i}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    out = tmp_path / "pred"
    output = invoke("predict", str(run), *map(str, paths), "--out", str(out), "--top", "3")
    colours = class_colours(classes)
    assert colours.tolist() == [[70, 130, 180], [128, 64, 128], [0, 0, 142]]  # Cityscapes colours by name
    for path in paths:
        image = np.asarray(Image.open(path))
        mask = np.asarray(Image.open(out / f"{path.stem}_mask.png"))
        overlay = np.asarray(Image.open(out / f"{path.stem}_overlay.png"))
        assert mask.shape == image.shape[:2] and overlay.shape == image.shape
        assert set(np.unique(mask).tolist()) <= {0, 1, 2}
        expect = np.rint(0.5 * image.astype(np.float32) + 0.5 * colours[mask].astype(np.float32))
        assert np.array_equal(overlay, expect.astype(np.uint8))
        # the printed coverage: pixel shares of the classes, largest first
        counts = np.bincount(mask.ravel(), minlength=3)
        order = [i for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
        shown = "  ".join(f"{classes[i]} {100 * counts[i] / mask.size:.1f}%" for i in order)
        line = next(x for x in output.splitlines() if x.startswith(str(path)))
        assert line.startswith(f"{path}: {shown}"), line


# ------------------------------------------------------------------ c. eval precision


@pytest.fixture
def bf16_run(tmp_path):
    config = {
        "name": "bf16",
        "data": {"name": "embedded", "params": {"train_size": 96, "test_size": 64}, "batch_size": 32},
        "student": {"name": "resnet8"},
        "stages": [{"steps": 3, "optimizer": {"lr": 0.05}, "schedule": {"name": "constant"}}],
        "runtime": {"precision": "bf16", "out_dir": str(tmp_path / "runs"), "progress": False},
    }
    path = tmp_path / "bf16.yaml"
    path.write_text(yaml.safe_dump(config))
    invoke("train", str(path))
    return tmp_path / "runs" / "bf16"


def test_eval_reproduces_a_bf16_run_exactly_and_says_which_precision(bf16_run):
    from kdkit.api import evaluate_student

    records = [json.loads(x) for x in (bf16_run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "eval"][-1]
    result = evaluate_student(bf16_run)
    assert result["precision"] == "bf16"
    assert (result["top1"], result["top5"], result["loss"]) == (last["top1"], last["top5"], last["loss"])
    fp32 = evaluate_student(bf16_run, precision="fp32")
    assert fp32["precision"] == "fp32" and fp32["loss"] != last["loss"]
    output = invoke("eval", str(bf16_run))
    assert f"top-1 {last['top1']:.2f}%" in output and "(bf16)" in output
    assert "(fp32)" in invoke("eval", str(bf16_run), "--precision", "fp32")
    assert "precision must be fp32, bf16 or auto" in fails("eval", str(bf16_run), "--precision", "fp16")


# ------------------------------------------------------------------ d. compare


def _fake_run(folder: Path, name: str, metric: str, best: float, best_epoch: float, **extra) -> Path:
    """A finished run's files as a run writes them (summary, config, metrics), without training."""
    folder.mkdir(parents=True)
    task = "segmentation" if metric == "miou" else "classification"
    (folder / "config.yaml").write_text(
        yaml.safe_dump({"name": name, "task": task, "student": {"name": name}})
    )
    (folder / "metrics.jsonl").write_text("{}\n")
    summary = {
        "name": name,
        "metric": metric,
        f"best_{metric}": best,
        f"last_{metric}": best - 1,
        "best_epoch": best_epoch,
        "last_epoch": 12.0,
        **extra,
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_compare_a_demo_glob_skips_non_runs_and_keeps_tasks_apart(tmp_path):
    demo = tmp_path / "demo"
    _fake_run(demo / "kd", "kd", "top1", 57.5, 12.0)
    _fake_run(demo / "dkd", "dkd", "top1", 69.25, 7.5)
    _fake_run(demo / "seg", "seg", "miou", 40.0, 9.0, last_miou_var=2.5, last_hp_acc=10.0)
    unfinished = demo / "broken"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("name: broken\n")
    (unfinished / "metrics.jsonl").write_text("{}\n")
    (demo / "comparison.png").write_bytes(b"\x89PNG")
    (demo / "report.md").write_text("# report\n")
    table = tmp_path / "table.md"
    globbed = sorted(demo.iterdir())  # what the shell makes of runs/demo/*
    result = runner.invoke(app, ["compare", *map(str, globbed), "--out", str(table)])
    assert result.exit_code == 0, result.output
    for skipped in ("comparison.png", "report.md", "broken"):
        assert f"skipped {demo / skipped}" in result.output
    text = table.read_text()
    top1, miou = text.split("### mIoU (%)")
    assert top1.startswith("### top-1 (%)") and "| seg " not in top1 and "| seg " in miou
    cells = [[c.strip() for c in x.strip("|").split("|")] for x in text.splitlines() if x.startswith("| ")]
    rows = {row[0]: row for row in cells if row[0] != "run"}
    header = [
        c.strip() for c in next(x for x in top1.splitlines() if x.startswith("| run")).strip("|").split("|")
    ]
    best_epoch = header.index("best epoch")
    assert rows["kd"][best_epoch] == "12" and rows["dkd"][best_epoch] == "7.50"
    assert rows["kd"][header.index("last epoch")] == "12"
    # a parent folder stands for the runs inside it: the same tables
    parent = tmp_path / "parent.md"
    invoke("compare", str(demo), "--out", str(parent))
    assert parent.read_text() == text


def test_compare_with_nothing_to_compare_is_one_line(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    output = fails("compare", str(tmp_path / "x.png"), str(tmp_path / "missing"))
    assert "no finished run to compare" in output


def test_comparison_table_refuses_to_mix_metrics(tmp_path):
    from kdkit.errors import KdkitError
    from kdkit.report.compare import compare_runs, comparison_table

    rows = compare_runs(
        [_fake_run(tmp_path / "a", "a", "top1", 50.0, 3.0), _fake_run(tmp_path / "b", "b", "miou", 30.0, 3.0)]
    )
    with pytest.raises(KdkitError, match="different metrics"):
        comparison_table(rows)


# ------------------------------------------------------------------ e. --set errors


def test_set_errors_name_the_flag_not_the_config_file(tmp_path):
    from kdkit.config import load_config
    from kdkit.errors import ConfigError

    path = tmp_path / "run.yaml"
    path.write_text("student: {name: resnet8}\nstages:\n  - epochs: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["stages.0.epochs=abc"])
    message = str(info.value)
    assert message.startswith("--set stages.0.epochs=abc: stages[0].epochs: ") and "run.yaml" not in message
    with pytest.raises(ConfigError, match=r"^--set stages.0.steps=3: stages\[0\]: .*exactly one"):
        load_config(path, ["stages.0.steps=3"])
    with pytest.raises(ConfigError, match=r"^--set runtime.precison=bf16: .*did you mean 'precision'"):
        load_config(path, ["runtime.precison=bf16"])
    with pytest.raises(ConfigError, match=r"^--set data=\[1: the value is not valid YAML"):
        load_config(path, ["data=[1"])
    # an error in the file itself still names the file and line
    path.write_text("student: {name: resnet8}\nstages:\n  - epochs: abc\n")
    with pytest.raises(ConfigError, match=r"run.yaml:3: stages\[0\].epochs"):
        load_config(path, ["runtime.seed=1"])
    output = fails("train", str(path), "--set", "stages.0.epochs=[day, fog]")
    assert "--set stages.0.epochs=[day, fog]: stages[0].epochs" in " ".join(output.split())


# ------------------------------------------------------------------ h. .ci/run cleans up


@pytest.mark.parametrize("status", [0, 5])
def test_ci_script_removes_its_environment_and_keeps_the_test_status(tmp_path, status):
    """.ci/run with stand-ins for python3/pip/pytest: its temporary folder (virtual environment,
    caches) is gone afterwards and its exit status is the test command's."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text(
        "#!/usr/bin/env bash\n"
        '[ "$1 $2" = "-m venv" ] || exit 9\n'
        'mkdir -p "$3/bin"\n'
        'echo "export PATH=\\"$3/bin:\\$PATH\\"" > "$3/bin/activate"\n'
        'for t in python pip; do printf "#!/bin/sh\\nexit 0\\n" > "$3/bin/$t"; chmod +x "$3/bin/$t"; done\n'
        'printf "#!/bin/sh\\necho \\"\\$KDKIT_CACHE\\" > \\"$RECORD\\"\\nexit $STATUS\\n" > "$3/bin/pytest"\n'
        'chmod +x "$3/bin/pytest"\n'
    )
    (fake / "python3").chmod(0o755)
    temp = tmp_path / "tmp"
    temp.mkdir()
    record = tmp_path / "record"
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "TMPDIR": str(temp), "RECORD": str(record)}
    env["STATUS"] = str(status)
    done = subprocess.run(
        ["bash", str(REPO / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == status, done.stderr
    cache = Path(record.read_text().strip())
    assert cache.is_relative_to(temp) and not cache.exists()
    assert list(temp.iterdir()) == []  # the environment and kdkit's cache are gone


def test_ci_script_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    command = "pip install --quiet -e '.[dev,timm,diffusion]' && pytest"
    assert command.replace("--quiet ", "") in readme
    assert (REPO / ".ci" / "run").read_text().rstrip().endswith(command)


# ------------------------------------------------------------------ i. --version


def test_version_prints_the_installed_version(monkeypatch):
    import importlib.metadata

    import kdkit
    from kdkit import cli

    assert invoke("--version").strip() == f"kdkit {importlib.metadata.version('kdkit')}"

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert cli.installed_version() == kdkit.__version__


# ------------------------------------------------------------------ f. inspect --dry


def test_inspect_dry_runs_shipped_presets_without_data_or_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # neither data/ nor runs/ nor weights/ exist here
    output = " ".join(
        invoke("inspect", str(REPO / "configs/cifar100/kd/resnet32x4_resnet8x4.yaml"), "--dry").split()
    )
    assert "random input (2, 3, 32, 32) (classification, 100 classes)" in output
    assert (
        "skipped weights file: teacher.weights=runs/cifar100/teachers/resnet32x4/student.safetensors"
        in output
    )
    assert "(2, 100)" in output and "(2, 256, 8, 8)" in output  # resnet8x4's last stage at 32x32
    seg = REPO / "configs/cityscapes/spirit/student.yaml"
    output = " ".join(invoke("inspect", str(seg), "--dry", "--set", "data.augment.crop=[64,64]").split())
    assert "random input (2, 3, 64, 64) (segmentation, 2 classes)" in output  # keep: [road] -> 2 classes
    assert "(2, 2, 64, 64)" in output  # per-pixel scores at the input size
    assert "cityscapes: no folder" in fails("inspect", str(seg))  # without --dry the data is needed


# ------------------------------------------------------------------ g. data.root of generated datasets


def test_generated_datasets_write_to_data_root_and_refuse_a_folder_of_other_files(tmp_path):
    from kdkit.data import build_dataset
    from kdkit.errors import KdkitError

    root = tmp_path / "generated"
    build_dataset("embedded", "test", root=str(root), train_size=20, test_size=10)
    (made,) = root.iterdir()
    assert made.name.startswith("v") and (made / "day" / "test" / "tensors.npz").is_file()
    scans = tmp_path / "scans"
    (scans / "7").mkdir(parents=True)
    Image.new("RGB", (28, 28)).save(scans / "7" / "a.png")
    for name in ("embedded", "road_scenes"):
        with pytest.raises(KdkitError, match=r"holds other files \(7\).*generates its own images"):
            build_dataset(name, "test", root=str(scans), train_size=20, test_size=10)
    assert sorted(p.name for p in scans.iterdir()) == ["7"]  # nothing written into the user's folder
