"""Paper cuts of a run: the DKD warm-up as the authors count epochs, the trained network named by its
role, the augmentation in the report, plain progress lines off a terminal, a report that survives
being copied, one file mode for every output, and callbacks that do not import the trainer."""

from __future__ import annotations

import ast
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors import safe_open

import kdkit.engine.callbacks as callbacks_module
import kdkit.report.plots as plots
from kdkit.api import train_from_config
from kdkit.config import load_config
from kdkit.engine.callbacks import LogLines, ProgressBar
from kdkit.report.runreport import describe_augment
from kdkit.terms import DKD

pytestmark = pytest.mark.usefixtures("one_thread")

# 192 training images in batches of 32: 6 steps per epoch.
TINY_DATA = {"name": "embedded", "params": {"train_size": 192, "test_size": 64}, "batch_size": 32}


def tiny(tmp_path, name, **changes):
    config = {
        "name": name,
        "data": TINY_DATA,
        "student": {"name": "resnet8"},
        "terms": [{"name": "ce"}],
        "stages": [{"epochs": 2, "optimizer": {"lr": 0.05}, "schedule": {"name": "cosine"}}],
        "runtime": {"out_dir": str(tmp_path / "runs"), "progress": False, "log_every": 2},
    }
    config.update(changes)
    return load_config(base=config)


class Legends:
    """Records the legend labels of every figure the plots module closes."""

    def __init__(self, monkeypatch) -> None:
        self.by_title: dict[str, list[str]] = {}
        close = plots.plt.close

        def recording_close(fig):
            for axis in fig.axes:
                legend = axis.get_legend()
                if legend is not None:
                    self.by_title[axis.get_title()] = [t.get_text() for t in legend.get_texts()]
            close(fig)

        monkeypatch.setattr(plots.plt, "close", recording_close)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A network trained from labels alone (a teacher), then a student distilled from it with DKD
    (warm-up 2 epochs), recording the warm-up factor of every training step."""
    tmp_path = tmp_path_factory.mktemp("cuts")
    monkeypatch = pytest.MonkeyPatch()
    legends = Legends(monkeypatch)
    train_from_config(tiny(tmp_path, "teacher"))
    teacher_dir = tmp_path / "runs" / "teacher"
    factors: list[float] = []
    original = DKD.warmup_factor

    def recording(self, epoch_progress):
        factors.append(original(self, epoch_progress))
        return factors[-1]

    monkeypatch.setattr(DKD, "warmup_factor", recording)
    distilled = tiny(
        tmp_path,
        "dkd",
        teacher={"name": "resnet8", "weights": str(teacher_dir / "student.safetensors")},
        terms=[{"name": "ce"}, {"name": "dkd", "warmup_epochs": 2}],
    )
    train_from_config(distilled)
    monkeypatch.undo()
    return SimpleNamespace(
        root=tmp_path,
        teacher=teacher_dir,
        student=tmp_path / "runs" / "dkd",
        factors=factors,
        legends=legends.by_title,
    )


def test_dkd_warmup_in_a_run_counts_epochs_from_one(runs):
    # mdistiller: min(epoch / warmup, 1), epoch = 1, 2, ... fixed within the epoch. Warm-up 2, 6 steps
    # per epoch: 1/2 for all six steps of the first epoch (its first step included), 2/2 after.
    assert runs.factors == [0.5] * 6 + [1.0] * 6


def test_trained_network_is_named_by_role(runs):
    teacher_spec = json.loads((runs.teacher / "student.json").read_text())
    student_spec = json.loads((runs.student / "student.json").read_text())
    assert teacher_spec["role"] == "network" and student_spec["role"] == "student"
    with safe_open(runs.teacher / "student.safetensors", "pt") as handle:
        assert handle.metadata()["role"] == "network"
    report = (runs.teacher / "report.md").read_text()
    assert "| network | resnet8 |" in report and "| student |" not in report
    assert "a later run can use it as its teacher" in report
    assert "`teacher: {name: resnet8, weights: <this folder>/student.safetensors}`" in report
    distilled = (runs.student / "report.md").read_text()
    assert "| student | resnet8 |" in distilled and "| teacher | resnet8 |" in distilled
    # the accuracy plot's curve: the teacher run's network is not called "student"
    assert runs.legends["teacher: top-1 (%)"] == ["network"]
    assert runs.legends["dkd: top-1 (%)"] == ["student", "teacher"]


def test_report_shows_the_active_augmentation(runs):
    line = "- training augmentation: random crop (zero padding 4) + horizontal flip"
    assert line in (runs.teacher / "report.md").read_text()


def test_describe_augment_by_task():
    both = "random crop (zero padding 4) + horizontal flip"
    assert describe_augment({"crop_padding": 4, "flip": True}) == both
    assert describe_augment({"crop_padding": 0, "flip": False}) == "none"
    assert describe_augment({"crop_padding": 2, "flip": False}) == "random crop (zero padding 2)"
    seg = {"scale": [0.5, 2.0], "crop": [64, 128], "flip": True, "crop_padding": 4}
    assert describe_augment(seg, "segmentation") == (
        "random rescale 0.5-2 + random crop 64x128 (mask padded with 255) + horizontal flip"
    )
    assert describe_augment({"scale": [1.0, 1.0], "crop": None, "flip": False}, "segmentation") == "none"


def test_report_survives_being_copied(runs):
    copy = runs.root / "copied" / "teacher"
    shutil.copytree(runs.teacher, copy)
    report = (copy / "report.md").read_text()
    assert str(runs.root) not in report
    links = [part.split(")")[0] for part in report.split("](")[1:]]
    assert links and all((copy / link).is_file() for link in links), links


def test_run_outputs_share_one_file_mode(runs):
    # every file a run writes gets the mode the user's umask gives a new file (0644 under umask 022),
    # whether written in place (metrics.jsonl) or atomically through a temporary file (config.yaml...)
    umask = os.umask(0)
    os.umask(umask)
    names = ["config.yaml", "metrics.jsonl", "report.md", "summary.json", "student.json"]
    names.append("student.safetensors")
    modes = {name: stat.S_IMODE((runs.teacher / name).stat().st_mode) for name in names}
    assert set(modes.values()) == {0o666 & ~umask}, {k: oct(v) for k, v in modes.items()}


def _trainer(name="kd", metric="top1"):
    return SimpleNamespace(name=name, info=SimpleNamespace(main=True), task=SimpleNamespace(metric=metric))


def test_log_lines_one_per_epoch_and_evaluation():
    out = io.StringIO()
    lines = LogLines(out, every_s=1e9)
    trainer, stage = _trainer(), SimpleNamespace(name="main", epochs=2, steps=None)
    lines.on_log(trainer, {"kind": "teacher_eval", "top1": 78.25})
    lines.on_stage_start(trainer, stage, 12, 0)
    lines.on_log(trainer, {"kind": "train", "step": 2, "epoch": 2 / 6, "loss": 2.5, "images_per_s": 90.0})
    lines.on_log(trainer, {"kind": "train", "step": 6, "epoch": 1.0, "loss": 1.23456, "images_per_s": 812.4})
    lines.on_log(trainer, {"kind": "eval", "step": 6, "epoch": 1.0, "top1": 41.2})
    lines.on_log(trainer, {"kind": "train", "step": 12, "epoch": 2.0, "loss": 0.5, "images_per_s": 800.0})
    lines.on_stage_end(trainer, stage)
    got = _without_time(out)
    assert got == [
        "[kd] teacher top1 78.25",
        "[kd] main: 12 steps",
        "[kd] main epoch 1/2 step 6/12 loss 1.2346 812 img/s",
        "[kd] main epoch 1/2 step 6/12 loss 1.2346 812 img/s top1 41.20 (epoch 1)",
        "[kd] main epoch 2/2 step 12/12 loss 0.5000 800 img/s top1 41.20 (epoch 1)",
    ]
    assert out.getvalue().splitlines()[2].endswith(" 0:00:00")


def _without_time(out: io.StringIO) -> list[str]:
    """The lines with their trailing elapsed time ``h:mm:ss`` removed."""
    return [re.sub(r" \d+:\d\d:\d\d$", "", line) for line in out.getvalue().splitlines()]


def test_log_lines_in_a_step_stage_every_interval():
    out = io.StringIO()
    lines = LogLines(out, every_s=0.0)  # every train record is due
    trainer, stage = _trainer("seg", "miou"), SimpleNamespace(name="s1", epochs=None, steps=40)
    lines.on_stage_start(trainer, stage, 40, 20)
    lines.on_log(trainer, {"kind": "train", "step": 30, "epoch": 3.75, "loss": 0.25, "images_per_s": 10.0})
    lines.on_log(trainer, {"kind": "eval", "step": 30, "epoch": 3.75, "miou": 33.333})
    assert _without_time(out) == [
        "[seg] s1: 40 steps from step 20",
        "[seg] s1 step 30/40 loss 0.2500 10 img/s",
        "[seg] s1 step 30/40 loss 0.2500 10 img/s miou 33.33 (step 30)",
    ]


def test_progress_off_a_terminal_writes_plain_lines(tmp_path, capsys):
    assert ProgressBar(stream=io.StringIO()).lines is not None  # not a terminal: plain lines
    config = tiny(tmp_path, "logged")
    config.runtime.progress = True
    train_from_config(config)  # pytest's captured stdout is not a terminal
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("[logged] main epoch 1/2 step 6/12 loss ") for line in out), out
    last = "[logged] main epoch 2/2 step 12/12 loss "
    assert any(line.startswith(last) and " top1 " in line for line in out), out


def test_callbacks_do_not_import_the_trainer():
    source = Path(callbacks_module.__file__)
    tree = ast.parse(source.read_text())
    imported = [
        (node.module or "", node.level) if isinstance(node, ast.ImportFrom) else (alias.name, 0)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (node.names if isinstance(node, ast.Import) else node.names[:1])
    ]
    assert not [m for m, level in imported if level > 0 or m.startswith("kdkit")], imported
    # loaded alone, outside the kdkit package, it still defines the callbacks and pulls in no trainer
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('callbacks_alone', {str(source)!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "assert module.Callback and module.LogLines and module.ProgressBar\n"
        "assert not [m for m in sys.modules if m.startswith('kdkit')], sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
