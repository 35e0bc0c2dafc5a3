"""Runs that never lose work: finite checkpoints that resume, one run per directory, no silent
overwrite, one-line errors for a full disk, empty term lists, negative weights and empty class folders."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from kdkit.api import train_from_config
from kdkit.cli import app
from kdkit.config import load_config
from kdkit.data import build_dataset
from kdkit.engine.callbacks import Callback
from kdkit.engine.checkpoint import load_checkpoint
from kdkit.engine.rundir import claim_run_dir, lock_holder
from kdkit.errors import ConfigError, KdkitError

pytestmark = pytest.mark.usefixtures("one_thread")

# 64 images / batch 16 = 4 steps per epoch
BASE = {
    "name": "tiny",
    "data": {"name": "embedded", "params": {"train_size": 64, "test_size": 32}, "batch_size": 16},
    "student": {"name": "resnet8"},
    "terms": [{"name": "ce"}],
    "stages": [{"epochs": 2, "optimizer": {"lr": 0.05}, "schedule": {"name": "constant"}}],
    "runtime": {"progress": False, "deterministic": True, "log_every": 1},
}


def config(tmp_path, lr=0.05, epochs=2, every=0, **changes):
    data = json.loads(json.dumps(BASE))
    data["stages"][0].update({"epochs": epochs, "optimizer": {"lr": lr}})
    data["runtime"].update({"out_dir": str(tmp_path / "runs"), "checkpoint_every_steps": every})
    data.update(changes)
    return load_config(base=data)


def records(run_dir, kind="train"):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def tensors_in(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)


def all_finite(path) -> bool:
    """Every floating-point tensor of the checkpoint (student, terms, optimizer state) is finite."""
    tensors = list(tensors_in(load_checkpoint(path)))
    assert len(tensors) > 30  # resnet8's parameters and buffers at least
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


class At(Callback):
    """Calls ``action(trainer)`` at the end of step ``step``."""

    def __init__(self, step: int, action) -> None:
        self.step, self.action = step, action

    def on_step_end(self, trainer, stage, step):
        if step == self.step:
            self.action(trainer)


def crash(trainer):
    raise KeyboardInterrupt


# ------------------------------------------------------------------ item 1: finite checkpoints


GOOD = re.compile(r"last good checkpoint is (\S+) \(stage 'main', step (\d+)\)")


def test_blow_up_names_a_finite_checkpoint_that_resumes_with_a_lower_lr(tmp_path):
    # lr 1000: the loss stays finite while batch-norm running variances overflow (issue 8, item 1)
    run_dir = tmp_path / "runs" / "tiny"
    with pytest.raises(KdkitError) as info:
        train_from_config(config(tmp_path, lr=1000.0, epochs=3, every=1))
    message = str(info.value)
    assert "\n" not in message and "running_var" in message, message
    path, good = GOOD.search(message).groups()
    good = int(good)
    failed = int(re.search(r"forward pass of step (\d+)", message).group(1))
    # the checkpoint after step good+1 was finite but its next forward pass was not: it was deleted
    assert failed == good + 2 and f"step {good + 1}) was deleted" in message
    assert path == str(run_dir / "checkpoints" / "last.pt")
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == good
    assert all_finite(run_dir / "checkpoints" / "last.pt")
    assert not (run_dir / "checkpoints" / "pending.pt").exists()
    assert f"--resume {run_dir}" in message and "stages.0.optimizer.lr" in message
    # metrics.jsonl counts as the message does: it holds steps 1..failed-1
    assert [r["step"] for r in records(run_dir)] == list(range(1, failed))
    summary = train_from_config(
        run_dir / "config.yaml", ["stages.0.optimizer.lr=0.01"], run_dir=run_dir, resume=True
    )
    assert summary["last_epoch"] == 3.0
    assert [r["step"] for r in records(run_dir)] == list(
        range(1, 13)
    )  # truncated to the checkpoint, then 12 steps


def _set_inf(label):
    def action(trainer):
        with torch.no_grad():
            if label == "buffer":
                trainer.distiller.student.get_buffer("layer1.0.conv1.1.running_var")[0] = float("inf")
            elif label == "parameter":
                trainer.distiller.student.get_parameter("fc.bias")[1] = float("nan")
            else:
                optimizer_state = next(iter(trainer.optimizer.state.values()))
                optimizer_state["momentum_buffer"].fill_(float("inf"))

    return action


@pytest.mark.parametrize(
    ("label", "named"),
    [
        ("buffer", "student buffer layer1.0.conv1.1.running_var"),
        ("parameter", "student parameter fc.bias"),
        ("optimizer", "optimizer momentum_buffer of student parameter stem.0.weight"),
    ],
)
def test_save_point_refuses_a_nonfinite_state_and_names_it(tmp_path, label, named):
    run_dir = tmp_path / "runs" / "tiny"
    with pytest.raises(KdkitError) as info:
        train_from_config(config(tmp_path, every=2), callbacks=[At(4, _set_inf(label))])
    message = str(info.value)
    assert message.startswith(f"non-finite {named} after step 4 of stage 'main' (epoch 1.00)"), message
    # checkpoints every 2 steps: the one after step 2 was verified by step 3's forward pass
    assert f"last good checkpoint is {run_dir / 'checkpoints' / 'last.pt'} (stage 'main', step 2)" in message
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 2
    assert all_finite(run_dir / "checkpoints" / "last.pt")
    assert records(run_dir)[-1]["step"] == 4  # the metrics' step and the message's agree
    assert records(run_dir, "eval") == []  # checked before the epoch-end evaluation


def test_nonfinite_loss_at_step_n_follows_metrics_step_n_minus_1(tmp_path):
    def poison(trainer):
        with torch.no_grad():
            trainer.distiller.student.get_parameter("fc.weight").fill_(float("nan"))

    run_dir = tmp_path / "runs" / "tiny"
    with pytest.raises(KdkitError) as info:
        train_from_config(config(tmp_path), callbacks=[At(5, poison)])
    message = str(info.value)
    assert "non-finite loss nan at step 6 of stage 'main' (epoch 1.50" in message, message
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3, 4, 5]
    # the epoch-end checkpoint (step 4) was verified by step 5's forward pass
    assert "last good checkpoint" in message and "(stage 'main', step 4)" in message


def test_overflowing_term_weight_shows_weighted_values(tmp_path):
    with pytest.raises(KdkitError) as info:
        train_from_config(config(tmp_path, terms=[{"name": "ce", "weight": 1e39}]))
    message = str(info.value)
    value = float(re.search(r"ce (\S+) x 1e\+39 = (\S+)", message).group(1))
    weighted = float(re.search(r"ce \S+ x 1e\+39 = (\S+)[,)]", message).group(1))
    assert value == pytest.approx(2.3, abs=0.2)  # cross-entropy of 10 near-uniform classes: ln 10
    assert weighted == pytest.approx(value * 1e39, rel=1e-3)
    assert "at step 1 of stage 'main'" in message and "There is no checkpoint to resume from" in message


def test_resume_refuses_a_checkpoint_with_nonfinite_values(tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    with pytest.raises(KeyboardInterrupt):
        train_from_config(config(tmp_path, every=2), callbacks=[At(3, crash)])
    path = run_dir / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    state["student"]["stem.1.running_var"][0] = float("nan")  # as an older kdkit could write it
    torch.save(state, path)
    with pytest.raises(KdkitError, match=r"holds non-finite values \(student.stem.1.running_var\)"):
        train_from_config(run_dir / "config.yaml", run_dir=run_dir, resume=True)


# ------------------------------------------------------------------ item 3: one run per directory


def test_a_finished_run_is_never_overwritten_silently(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    data = json.loads(json.dumps(BASE))
    data["stages"][0]["epochs"] = 1
    data["runtime"]["out_dir"] = str(tmp_path / "runs")
    cfg.write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "runs" / "tiny"
    assert cli("train", str(cfg)).exit_code == 0
    before = (run_dir / "metrics.jsonl").read_bytes()
    (run_dir / "notes.txt").write_text("mine")
    # a second run into it, even one that would fail at once (lr 1e12), changes nothing
    again = cli("train", str(cfg), "--set", "stages.0.optimizer.lr=1e12")
    assert again.exit_code == 2
    line = again.output.strip()
    assert "\n" not in line
    assert (
        f"{run_dir} already holds a finished run" in line
        and "--overwrite" in line
        and "another --out" in line
    )
    assert (run_dir / "metrics.jsonl").read_bytes() == before
    # the Python API refuses too, before building anything
    with pytest.raises(KdkitError, match="already holds a finished run"):
        train_from_config(cfg)
    replaced = cli("train", str(cfg), "--overwrite", "--set", "runtime.seed=1")
    assert replaced.exit_code == 0, replaced.output
    assert len(records(run_dir, "eval")) == 1 and (run_dir / "metrics.jsonl").read_bytes() != before
    assert load_config(run_dir / "config.yaml").runtime.seed == 1
    assert (run_dir / "notes.txt").read_text() == "mine"  # only the run's own files are replaced


def test_a_stopped_run_is_refused_then_resumed_and_stale_tmp_files_go(tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    with pytest.raises(KeyboardInterrupt):
        train_from_config(config(tmp_path, every=2), callbacks=[At(5, crash)])
    with pytest.raises(KdkitError) as info:
        train_from_config(config(tmp_path, every=2))
    message = str(info.value)
    assert f"{run_dir} already holds a stopped run (last checkpoint at stage 'main', step 4)" in message
    assert f"`kdkit train --resume {run_dir}`" in message and "--overwrite" in message
    # zero-byte temporary files of killed writes
    stale = [run_dir / "checkpoints" / ".last.pt.k1ll3d.tmp", run_dir / ".summary.json.abc123.tmp"]
    for path in stale:
        path.write_bytes(b"")
    result = cli("train", "--resume", str(run_dir))
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in stale)
    assert [r["step"] for r in records(run_dir)] == list(range(1, 9))


def test_tmp_files_are_removed_when_a_fresh_run_starts(tmp_path):
    run_dir = tmp_path / "fresh"
    (run_dir / "checkpoints").mkdir(parents=True)
    stale = run_dir / "checkpoints" / ".pending.pt.x7y8z9.tmp"
    stale.write_bytes(b"")
    claim_run_dir(run_dir).release()
    assert not stale.exists() and (run_dir / "checkpoints").is_dir()


def test_a_running_run_holds_its_directory(tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    seen = []

    def second_run(trainer):
        assert lock_holder(run_dir) == f"pid {os.getpid()} on {socket.gethostname()}"
        with pytest.raises(KdkitError) as info:
            claim_run_dir(run_dir, overwrite=True)
        seen.append(str(info.value))

    train_from_config(config(tmp_path, epochs=1), callbacks=[At(2, second_run)])
    assert seen == [
        f"run directory {run_dir} is in use by another kdkit run (pid {os.getpid()} on "
        f"{socket.gethostname()}); wait for it to finish, or choose another --out"
    ]
    assert lock_holder(run_dir) is None  # released at the end
    with pytest.raises(KeyboardInterrupt):
        train_from_config(config(tmp_path, epochs=1), callbacks=[At(1, crash)], overwrite=True)
    assert lock_holder(run_dir) is None  # and when the run stops with an exception


def test_a_second_process_cannot_train_into_a_locked_directory(tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(run_dir / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, f'pid {os.getpid()} on elsewhere'.encode())\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = tmp_path / "tiny.yaml"
        cfg.write_text(
            yaml.safe_dump({**BASE, "runtime": {**BASE["runtime"], "out_dir": str(tmp_path / "runs")}})
        )
        started = time.perf_counter()
        result = cli("train", str(cfg))
        assert result.exit_code == 2
        assert result.output.strip() == (
            f"error: run directory {run_dir} is in use by another kdkit run (pid {holder.pid} on "
            "elsewhere); wait for it to finish, or choose another --out"
        )
        assert time.perf_counter() - started < 10  # refused at once, not after building the run
        assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    assert lock_holder(run_dir) is None  # the kernel drops a dead process's lock


# ------------------------------------------------------------------ item 4: tracebacks -> one line


def test_disk_full_during_a_checkpoint_write_is_one_line_and_keeps_the_previous_one(tmp_path, monkeypatch):
    import kdkit.engine.checkpoint as checkpoint

    real_save = torch.save
    calls = []

    def full_disk(obj, handle, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint: half written, then no space left
            handle.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    run_dir = tmp_path / "runs" / "tiny"
    with pytest.raises(KdkitError) as info:
        train_from_config(config(tmp_path, every=2))
    message = str(info.value)
    assert "\n" not in message
    assert message == (
        f"the disk is full: could not write {run_dir / 'checkpoints' / 'pending.pt'} (no space or quota "
        "left); its previous version, if any, is intact; the previous checkpoint "
        f"{run_dir / 'checkpoints' / 'last.pt'} is intact (stage 'main', step 2); free space, then continue "
        f"with `kdkit train --resume {run_dir}`"
    )
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.pt"]  # no .tmp left
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 2
    monkeypatch.setattr(checkpoint.torch, "save", real_save)  # space freed
    summary = train_from_config(run_dir / "config.yaml", run_dir=run_dir, resume=True)
    assert summary["last_epoch"] == 2.0


def test_empty_terms_and_negative_weights_are_config_errors(tmp_path):
    with pytest.raises(
        ConfigError, match=r"^config: terms: empty list; stage 'main' needs at least one term"
    ):
        load_config(base={**BASE, "terms": []})
    with pytest.raises(ConfigError, match=r"stages\[0\]\.terms: empty list"):
        load_config(base={**BASE, "stages": [{"epochs": 1, "terms": []}]})
    # unused run-level terms may be empty when every stage has its own
    assert load_config(base={**BASE, "terms": [], "stages": [{"epochs": 1, "terms": [{"name": "ce"}]}]})
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**BASE, "terms": [{"name": "ce"}, {"name": "ce", "weight": -0.5}]}))
    result = cli("train", str(bad))
    assert result.exit_code == 2
    assert re.fullmatch(
        rf"error: {re.escape(str(bad))}:\d+: terms\[1\]\.weight: term 'ce' has weight -0\.5; "
        r"a weight must be a finite number >= 0 \(0 switches the term off\)",
        result.output.strip(),
    ), result.output
    empty = tmp_path / "empty.yaml"
    empty.write_text(yaml.safe_dump({**BASE, "terms": []}))
    result = cli("train", str(empty))
    assert result.exit_code == 2 and "terms: empty list" in result.output and "Traceback" not in result.output


def test_out_naming_an_existing_file_is_one_line(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(BASE))
    target = tmp_path / "model.bin"
    target.write_bytes(b"keep me")
    result = cli("train", str(cfg), "--out", str(target))
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: run directory {target} is an existing file, not a folder; choose another --out"
    )
    assert target.read_bytes() == b"keep me"


# ------------------------------------------------------------------ item 5: silently accepted input


def test_an_empty_class_folder_is_an_error_naming_it(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "train" / name).mkdir(parents=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "train" / "cat" / "a.png")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(
        KdkitError, match=rf"class folder '{re.escape(str(tmp_path / 'train' / 'dog'))}' has no images"
    ):
        build_dataset("image_folder", "train", root=str(tmp_path))
