"""Engine: schedules, parameter selection, checkpoints, exact resume, NaN handling, run outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kdkit.api import train_from_config
from kdkit.config import ScheduleConfig, load_config
from kdkit.engine.callbacks import Callback
from kdkit.engine.checkpoint import atomic_write_text, load_checkpoint
from kdkit.engine.schedule import lr_factor
from kdkit.engine.stages import select_parameters
from kdkit.errors import KdkitError
from kdkit.models import build_model, load_weights

TINY_DATA = {"name": "embedded", "params": {"train_size": 192, "test_size": 64}, "batch_size": 32}


def tiny_config(tmp_path, **changes):
    config = {
        "name": "tiny",
        "data": TINY_DATA,
        "student": {"name": "resnet8"},
        "terms": [{"name": "ce"}],
        "stages": [{"epochs": 2, "optimizer": {"lr": 0.05}, "schedule": {"name": "cosine"}}],
        "runtime": {
            "out_dir": str(tmp_path / "runs"),
            "progress": False,
            "deterministic": True,
            "log_every": 2,
        },
    }
    config.update(changes)
    return load_config(base=config)


def test_schedules_match_hand_values():
    step = ScheduleConfig(name="multistep", milestones=[150, 180, 210], gamma=0.1)
    assert lr_factor(step, 149.9, 240) == 1.0
    assert lr_factor(step, 150, 240) == pytest.approx(0.1)
    assert lr_factor(step, 239, 240) == pytest.approx(1e-3)
    cosine = ScheduleConfig(name="cosine")
    assert lr_factor(cosine, 0, 10) == pytest.approx(1.0)
    assert lr_factor(cosine, 5, 10) == pytest.approx(0.5)
    assert lr_factor(cosine, 10, 10) == pytest.approx(0.0, abs=1e-12)
    poly = ScheduleConfig(name="poly", power=0.9)
    assert lr_factor(poly, 500, 1000) == pytest.approx(0.5**0.9)
    warm = ScheduleConfig(name="cosine", warmup=2)
    assert lr_factor(warm, 1, 12) == pytest.approx(0.5)  # half-way through the linear warm-up
    assert lr_factor(warm, 7, 12) == pytest.approx(0.5)  # cosine mid-point of the 10 epochs after it
    assert lr_factor(ScheduleConfig(name="constant"), 3, 4) == 1.0


def test_select_parameters_by_glob_and_error_names_nearest():
    model = build_model("resnet8", num_classes=10)
    names = select_parameters(model, ["fc.*"], "s")
    assert names == ["fc.weight", "fc.bias"]
    with pytest.raises(KdkitError, match="matches no student parameter.*did you mean"):
        select_parameters(model, ["fcc.weight"], "s")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")

    def broken(handle):
        handle.write(b"half")
        raise OSError("disk full")

    from kdkit.engine.checkpoint import atomic_write

    with pytest.raises(OSError):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


class Crash(Callback):
    """Stops the run at a given step, like a kill in the middle of an epoch."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_step_end(self, trainer, stage, step):
        if step == self.at_step:
            raise KeyboardInterrupt


def _evals(run_dir):
    return [
        r
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "eval"
    ]


def test_resume_mid_epoch_matches_uninterrupted_run(tmp_path):
    # 192 images / batch 32 = 6 steps per epoch; checkpoints every 2 steps; crash at step 9 (epoch 1).
    full = tiny_config(tmp_path, name="full")
    full.runtime.checkpoint_every_steps = 2
    summary_full = train_from_config(full)
    cut = tiny_config(tmp_path, name="cut")
    cut.runtime.checkpoint_every_steps = 2
    with pytest.raises(KeyboardInterrupt):
        train_from_config(cut, callbacks=[Crash(9)])
    run_dir = tmp_path / "runs" / "cut"
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 8
    summary_cut = train_from_config(cut, run_dir=run_dir, resume=True)
    assert _evals(run_dir) == _evals(tmp_path / "runs" / "full")
    assert summary_cut["last_top1"] == summary_full["last_top1"]
    a, b = build_model("resnet8", num_classes=10), build_model("resnet8", num_classes=10)
    load_weights(a, tmp_path / "runs" / "full" / "student.safetensors")
    load_weights(b, run_dir / "student.safetensors")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_run_directory_holds_every_output(tmp_path):
    summary = train_from_config(tiny_config(tmp_path))
    run_dir = tmp_path / "runs" / "tiny"
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "report.md",
        "loss.png",
        "accuracy.png",
        "student.safetensors",
        "student.json",
        "checkpoints/last.pt",
    ):
        assert (run_dir / name).is_file(), name
    assert 0.0 <= summary["best_top1"] <= 100.0 and math.isfinite(summary["last_top1"])
    # the resolved config reproduces the run's settings
    assert load_config(run_dir / "config.yaml").stages[0].epochs == 2


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path):
    config = tiny_config(
        tmp_path, stages=[{"epochs": 3, "optimizer": {"lr": 1e12}, "schedule": {"name": "constant"}}]
    )
    with pytest.raises(KdkitError, match="non-finite loss.*Lower the learning rate"):
        train_from_config(config)


@pytest.mark.slow
def test_compiled_run_trains_and_exports(tmp_path):
    config = tiny_config(tmp_path, name="compiled")
    config.runtime.compile = True
    summary = train_from_config(config)
    model = build_model("resnet8", num_classes=10)
    load_weights(model, tmp_path / "runs" / "compiled" / "student.safetensors")  # no torch.compile prefixes
    assert math.isfinite(summary["last_top1"])
