"""``kdkit`` subcommands that take a trained student out of kdkit: export, profile, predict, drive."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..engine.tasks import METRIC_LABELS
from ..errors import KdkitError
from .common import app, console, user_errors


@app.command("export")
@user_errors
def export_cmd(
    run: Annotated[Path, typer.Argument(help="run directory (holds student.safetensors + student.json)")],
    format_: Annotated[str, typer.Option("--format", help="onnx, torchscript or exported-program")] = "onnx",
    dynamic_batch: Annotated[bool, typer.Option(help="accept any batch size (default: batch 1)")] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset")] = 18,
    out: Annotated[Path | None, typer.Option(help="output folder (default: RUN/export)")] = None,
    images: Annotated[int, typer.Option(help="test images of the parity check (max abs difference)")] = 64,
    limit: Annotated[
        int | None, typer.Option(help="metric on the first N test images (default: the whole split)")
    ] = None,
    int8: Annotated[bool, typer.Option(help="also write an int8 ONNX file (static quantization)")] = False,
    calibration: Annotated[int, typer.Option(help="training images that calibrate --int8")] = 256,
):
    """Export the student with its normalisation folded in (input: float images in [0, 1], NCHW), check
    it against PyTorch (max abs difference, metric of both) and write <file>.json beside it."""
    from ..deploy.commands import export_run
    from ..deploy.summary import parity_text

    meta = export_run(
        run, format_, out, dynamic_batch, opset, images, limit, int8=int8, calibration=calibration
    )
    check = meta["parity"]
    console.print(f"{meta['path']}: {parity_text(check)}", highlight=False, soft_wrap=True)
    if "metric" in check:
        label = METRIC_LABELS.get(check["metric"], check["metric"])
        console.print(
            f"{label} on {check['metric_images']} test images: PyTorch {check['pytorch']:.2f}, "
            f"{format_} {check['exported']:.2f}",
            highlight=False,
        )
    if "int8" in meta:
        q = meta["int8"]
        line = f"int8: {q['file']} ({q['size_bytes'] / 1e6:.3f} MB, fp32 {q['fp32_size_bytes'] / 1e6:.3f} MB)"
        if "int8" in q:
            label = METRIC_LABELS.get(q["metric"], q["metric"])
            line += f", {label} fp32 {q['fp32']:.2f} -> int8 {q['int8']:.2f}"
        console.print(line, highlight=False, soft_wrap=True)


@app.command("profile")
@user_errors
def profile_cmd(
    model: Annotated[str, typer.Argument(help="run directory, exported student, or model name")],
    size: Annotated[int, typer.Option(help="input height and width for a model name")] = 32,
    num_classes: Annotated[int, typer.Option(help="classes for a model name")] = 100,
    batch: Annotated[
        list[int] | None, typer.Option(help="batch size of the latency measurement (repeatable)")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    runtime: Annotated[
        str | None,
        typer.Option(help="run directories: torch, onnxruntime or torchscript (CPU; exports when missing)"),
    ] = None,
    repeats: Annotated[int, typer.Option(help="timed runs per batch (after 3 warm-up runs)")] = 20,
):
    """Parameters, FLOPs and latency of a trained student or of any registered model; with --runtime,
    the median and p95 latency and the size on disk of the file that runtime loads."""
    from ..api import profile_model

    batches = batch or [1]
    if runtime is not None:
        from ..deploy.latency import profile_run

        if not Path(model).is_dir():
            raise KdkitError(f"--runtime needs a run directory, not {model}")
        for row in profile_run(model, runtime, batches, repeats):
            console.print(
                f"{runtime} batch {row['batch']}: median {row['median_ms']:.2f} ms  "
                f"p95 {row['p95_ms']:.2f} ms  "
                f"({row['repeats']} runs)  {Path(row['file']).name} {row['size_bytes'] / 1e6:.3f} MB",
                highlight=False,
                soft_wrap=True,
            )
        return
    for b in batches:
        result = profile_model(model, size=size, num_classes=num_classes, batch=b, device=device)
        console.print(
            f"{result['params_m']:.3f}M params  {result['gflops']:.4f} GFLOPs/image  "
            f"{result['latency_ms']:.2f} ms/forward, p95 {result['p95_ms']:.2f} ms (batch {b}, {device})",
            highlight=False,
            soft_wrap=True,
        )


@app.command()
@user_errors
def predict(
    run: Annotated[Path, typer.Argument(help="run directory, exported student.safetensors, or MODEL.onnx")],
    images: Annotated[list[Path], typer.Argument(help="image files")],
    top: Annotated[int, typer.Option(help="how many classes to show per image")] = 3,
    out: Annotated[
        Path, typer.Option(help="segmentation/detection: folder for the overlay, mask or boxes PNGs")
    ] = Path("predictions"),
    min_score: Annotated[float, typer.Option(help="detection: lowest score of a box drawn and listed")] = 0.3,
):
    """Classify image files with an exported student, segment them (segmentation students:
    <out>/<name>_overlay.png and <out>/<name>_mask.png per image, and the classes covering most pixels),
    or detect objects (detection students: <out>/<name>_boxes.png and <out>/detections.json).
    An .onnx file from `kdkit export` runs on ONNX Runtime with its metadata JSON, without PyTorch's model."""
    from ..predict import predict_boxes, predict_images, predict_masks, student_task

    if run.suffix == ".onnx":
        from ..deploy.commands import predict_onnx

        task, results = predict_onnx(run, images, top=top, out=out, min_score=min_score)
    else:
        task = student_task(run)
        results = predict_masks(run, images, out) if task == "segmentation" else None
        results = predict_boxes(run, images, out, min_score) if task == "detection" else results
    if task == "detection":
        for result in results:
            shown = "  ".join(f"{d['class']} {d['score']:.2f}" for d in result["detections"][:top])
            found = len(result["detections"])
            line = f"{result['image']}: {found} objects  {shown}  -> {result['drawn']}"
            console.print(line, highlight=False, soft_wrap=True)
        return
    if task == "segmentation":
        for result in results:
            shown = "  ".join(f"{name} {100 * share:.1f}%" for name, share in result["coverage"][:top])
            console.print(
                f"{result['image']}: {shown}  -> {result['overlay']}", highlight=False, soft_wrap=True
            )
        return
    for path, ranked in zip(images, results or predict_images(run, images, top=top)):
        shown = "  ".join(f"{name} {100 * p:.1f}%" for name, p in ranked)
        console.print(f"{path}: {shown}", highlight=False, soft_wrap=True)


@app.command("drive")
@user_errors
def drive_cmd(
    model: Annotated[Path, typer.Argument(help="run directory or a file of `kdkit export` (.onnx/.ts/.pt2)")],
    frames: Annotated[
        Path | None, typer.Argument(help="folder of frames (name order) or a multi-frame image")
    ] = None,
    out: Annotated[Path, typer.Option(help="folder for signal.csv and signal.png")] = Path("drive"),
    actions: Annotated[
        Path | None, typer.Option(help="classifiers: JSON {class: action} or {class: {component: value}}")
    ] = None,
    stability: Annotated[
        bool, typer.Option(help="pool 5 embedded test drives and report the jolt at the style changes")
    ] = False,
):
    """The sensor-to-actuation loop (patent claim 15): run the student on each frame, turn its output
    into an actuation signal (segmentation: speed and steering from the free road in the driving
    corridor; classification: the --actions table) and write it over time. Without FRAMES: the embedded
    test drive (day, night from frame 40, day from frame 80)."""
    import json

    from ..deploy.actuation import ClassActionRule
    from ..deploy.drive import drive, model_classes
    from ..deploy.stability import drive_stability
    from ..deploy.testdrive import test_drive

    rule = None
    if actions is not None:
        rule = ClassActionRule(model_classes(model), json.loads(actions.read_text()))
    if stability:
        figures = drive_stability(model, out, rule=rule)
        jolts = "  ".join(f"{k} {v:.2f}" for k, v in figures.items() if k.startswith(("jolt", "mae")))
        console.print(f"{figures['drives']} test drives: {jolts} -> {out / 'stability.json'}", soft_wrap=True)
        return
    log = drive(model, frames if frames is not None else test_drive(), rule, out)
    files = f"{log.files.get('csv')}, {log.files.get('png')}"
    console.print(f"{len(log.names)} frames: {', '.join(log.components)} -> {files}", soft_wrap=True)
