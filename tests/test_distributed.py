"""Two CPU processes under torchrun (gloo) train the same model as one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import yaml

from kdkit.models import build_model, load_weights, save_weights

# Tolerance: the two runs differ only in floating-point summation order (gradients averaged over
# processes vs one batch mean; batch-norm statistics all-reduced as sums), so the first losses agree
# to ~1e-7 and the rounding differences grow slowly: measured after 12 SGD steps (lr 0.05), weights
# and BN running statistics differ by at most 1.2e-3 absolute and logged losses by < 1e-4 relative.
# We assert 3e-3 and 3e-4; with per-process batch norm instead (sync_batchnorm=false) the same run is
# off by 0.10 in weights and 1.2e-2 relative in loss (measured), so the test separates the two.
WEIGHT_ATOL = 3e-3
LOSS_RTOL = 3e-4


def _records(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_torchrun_two_processes_match_one_process(tmp_path):
    teacher = tmp_path / "teacher.safetensors"
    torch.manual_seed(0)
    save_weights(build_model("resnet8", num_classes=10), teacher)
    config = {
        "name": "ddp",
        "data": {"name": "embedded", "params": {"train_size": 192, "test_size": 64}, "batch_size": 32},
        "teacher": {"name": "resnet8", "weights": str(teacher)},
        "student": {"name": "resnet8"},
        "terms": [{"name": "ce"}, {"name": "kd", "temperature": 4}],
        "stages": [{"epochs": 2, "optimizer": {"lr": 0.05}, "schedule": {"name": "cosine"}}],
        "runtime": {"progress": False, "deterministic": True, "log_every": 1},
    }
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        [sys.executable, "-m", "kdkit", "train", str(path), "--out", str(one)],
        check=True,
        env=env,
        capture_output=True,
    )
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "kdkit",
    ]
    proc = subprocess.run(
        [*launch, "train", str(path), "--out", str(two)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    a, b = build_model("resnet8", num_classes=10), build_model("resnet8", num_classes=10)
    load_weights(a, one / "student.safetensors")
    load_weights(b, two / "student.safetensors")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p.float(), q.float(), atol=WEIGHT_ATOL, rtol=0), name
    losses_one = [r["loss"] for r in _records(one, "train")]
    losses_two = [r["loss"] for r in _records(two, "train")]
    assert len(losses_one) == len(losses_two) == 12
    for x, y in zip(losses_one, losses_two):
        assert abs(x - y) <= LOSS_RTOL * abs(x)
    assert [r["top1"] for r in _records(one, "eval")] == [r["top1"] for r in _records(two, "eval")]
