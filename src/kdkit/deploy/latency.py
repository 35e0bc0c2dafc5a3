"""Latency and size on disk of a run's student per runtime: ``kdkit profile RUN --runtime`` and the
deployment table (teacher, student in PyTorch, ONNX fp32, ONNX int8); exports the files it times
when they are missing (:func:`~kdkit.deploy.commands.export_run`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import KdkitError
from .commands import export_run, run_config
from .export import WEIGHTS, load_student
from .formats import FORMATS, deployable, file_size, read_metadata
from .profile import latency_stats as latency
from .runtime import RUNTIMES, load_runtime
from .summary import record_latency

RUNTIME_FORMAT = {"onnxruntime": "onnx", "torchscript": "torchscript"}


def _exported(run: Path, runtime: str, need_dynamic: bool) -> Path:
    """The run's exported file for ``runtime`` in ``RUN/export``, exported (dynamic batch, with the
    parity check) when missing or when a batch above 1 is asked of a fixed-batch file."""
    fmt = RUNTIME_FORMAT[runtime]
    path = run / "export" / f"student{FORMATS[fmt]}"
    if path.is_file() and (read_metadata(path).get("dynamic_batch") or not need_dynamic):
        return path
    return export_run(run, fmt, dynamic_batch=True)["path"]


def profile_run(
    run: str | Path, runtime: str = "torch", batches: Sequence[int] = (1,), repeats: int = 20
) -> list[dict[str, Any]]:
    """Latency (median and p95 over ``repeats`` timed runs, warm-up excluded) of a run's student on
    ``runtime`` (``torch``, ``onnxruntime`` or ``torchscript``, CPU) at each batch, and the size on disk
    of the file that runtime loads (exported first when missing); recorded in ``RUN/export/latency.json``
    and the run's report (:mod:`kdkit.deploy.summary`)."""
    if runtime not in RUNTIMES:
        raise KdkitError(f"unknown runtime '{runtime}'; choose one of: {', '.join(RUNTIMES)}")
    run = Path(run)
    if runtime == "torch":
        model, spec = load_student(run)
        size = tuple(spec.image_size or (32, 32))
        runner: nn.Module = deployable(model, spec, size)
        path = run / WEIGHTS
    else:
        path = _exported(run, runtime, any(b > 1 for b in batches))
        runner, size = load_runtime(path), tuple(read_metadata(path)["image_size"])
    rows = []
    for batch in batches:
        sample = torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(0))
        rows.append(
            {
                "runtime": runtime,
                "batch": batch,
                **latency(runner, sample, repeats),
                "file": str(path),
                "size_bytes": file_size(path),
            }
        )
    if runtime != "torch" or (run / "export").is_dir():
        record_latency(run, rows)
    return rows


def latency_table(
    run: str | Path, batches: Sequence[int] = (1, 32), repeats: int = 20, int8: bool = True
) -> list[dict[str, Any]]:
    """Rows ``{"model", "batch", "median_ms", "p95_ms", "size_bytes", "params"}`` for the run's teacher
    (fp32 PyTorch; its config entry and weights), the student in fp32 PyTorch, ONNX fp32 and ONNX int8
    (ONNX Runtime, CPU), at each batch. Exports ``RUN/export/student.onnx`` (dynamic batch) and its
    int8 version when missing. ``size_bytes``: the weights file, or the exported file."""
    from ..engine.build import build_network

    run = Path(run)
    model, spec = load_student(run)
    size = tuple(spec.image_size or (32, 32))
    config = run_config(run)
    entries: list[tuple[str, nn.Module, int | None, int]] = []
    if config is not None and config.teacher is not None:
        teacher = build_network(config.teacher, spec.num_classes, "teacher").eval()
        weights = Path(config.teacher.weights) if config.teacher.weights else None
        stored = weights.stat().st_size if weights is not None and weights.is_file() else None
        params = sum(p.numel() for p in teacher.parameters())
        entries.append(
            (
                f"teacher {config.teacher.name} (PyTorch fp32)",
                deployable(teacher, spec, size),
                stored,
                params,
            )
        )
    params = sum(p.numel() for p in model.parameters())
    entries.append(
        (
            f"student {spec.model} (PyTorch fp32)",
            deployable(model, spec, size),
            (run / WEIGHTS).stat().st_size,
            params,
        )
    )
    onnx_path = run / "export" / "student.onnx"
    int8_path = run / "export" / "student.int8.onnx"
    fresh = not onnx_path.is_file() or not read_metadata(onnx_path).get("dynamic_batch")
    if fresh or (int8 and not int8_path.is_file()):
        export_run(run, "onnx", dynamic_batch=True, int8=int8)
    entries.append(("student ONNX fp32 (onnxruntime)", load_runtime(onnx_path), file_size(onnx_path), params))
    if int8:
        entries.append(
            ("student ONNX int8 (onnxruntime)", load_runtime(int8_path), file_size(int8_path), params)
        )
    rows = []
    for name, runner, stored, n in entries:
        for batch in batches:
            sample = torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(0))
            rows.append(
                {
                    "model": name,
                    "batch": batch,
                    **latency(runner, sample, repeats),
                    "size_bytes": stored,
                    "params": n,
                }
            )
    return rows


def latency_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """:func:`latency_table` rows as a markdown table."""
    from ..report.runreport import markdown_table

    def mb(value: int | None) -> str:
        return "-" if value is None else f"{value / 1e6:.3f}"

    return markdown_table(
        ["model", "batch", "median (ms)", "p95 (ms)", "size on disk (MB)", "params (M)"],
        [
            [
                r["model"],
                str(r["batch"]),
                f"{r['median_ms']:.2f}",
                f"{r['p95_ms']:.2f}",
                mb(r["size_bytes"]),
                f"{r['params'] / 1e6:.3f}",
            ]
            for r in rows
        ],
    )
