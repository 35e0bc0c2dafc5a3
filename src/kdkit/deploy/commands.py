"""What ``kdkit export``, ``kdkit profile RUN --runtime`` and ``kdkit predict MODEL.onnx`` call.

- :func:`export_run`: a run's student to ONNX / TorchScript / exported program (normalisation folded
  in), then the parity check (max |exported - PyTorch| on held-out test images, the task metric of
  both on the test split), optionally ONNX int8; all of it in the metadata JSON beside the file.
- :func:`predict_onnx`: classify, segment or detect in image files with an ONNX file and its metadata
  alone. Detectors export up to their decoded boxes and scores (:mod:`kdkit.deploy.detection`).
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Subset

from ..errors import KdkitError
from .detection import OUTPUT_NAMES, DetectionRunner, output_metadata, predict_detections
from .export import ModelSpec, load_student
from .formats import (
    DEFAULT_OPSET,
    FORMATS,
    INPUT_NAME,
    OUTPUT_NAME,
    check_format,
    check_parity,
    deployable,
    export_module,
    file_size,
    parity,
    read_metadata,
    write_metadata,
)
from .runtime import Runner, load_runtime
from .summary import update_report


def _to01(images: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """uint8 or float images -> float [0, 1], resized (bilinear) to ``size`` when it differs."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        x = torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return x


def run_config(run: Path):
    """The run's resolved ``config.yaml``, or None when the folder has none (an exported student)."""
    from ..config import load_config

    path = run / "config.yaml"
    return load_config(path) if path.is_file() else None


def _dataset(config: Any, split: str):
    from ..data import build_dataset

    data = config.data
    params = {**data.params, **data.eval_params} if split == data.eval_split else dict(data.params)
    return build_dataset(data.name, split, root=data.root, **params)


def _images(dataset: Any, count: int, size: tuple[int, int], seed: int | None = None) -> Tensor:
    """``count`` images of ``dataset`` as float [0, 1] at ``size``: the first ones, or a seeded draw."""
    count = min(count, len(dataset))
    if seed is None:
        order = range(count)
    else:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    return torch.cat([_to01(dataset[i][0][None], size) for i in order])


def task_metric(
    module: nn.Module, config: Any, limit: int | None = None, size: tuple[int, int] | None = None
) -> dict[str, float]:
    """The task metric (``top1``, ``miou`` or ``map``, in %) of ``module`` (float [0, 1] input, normalisation
    folded in) on the run's eval split, or its first ``limit`` images; evaluated as ``kdkit eval`` does
    (the task's own evaluation), in fp32 on the CPU. ``size``: resize the images to the exported input
    size first (segmentation scores are resized back to the mask's size by the evaluation)."""
    from ..engine.batches import Batches
    from ..engine.distributed import DistInfo
    from ..engine.tasks import build_task

    dataset = _dataset(config, config.data.eval_split)
    name = getattr(dataset, "task", "classification")
    detection = name == "detection"  # letterboxed by the task (boxes follow), not resized here
    task = build_task(name, dataset, config.evaluation, size if detection else None)
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    batches = Batches(dataset, config.data.eval_batch_size, DistInfo(), train=False)
    prepare = (lambda x: _to01(x)) if detection else (lambda x: _to01(x, size))
    result = task.evaluate(module, batches, prepare, torch.device("cpu"), "fp32")
    return {"metric": task.metric, "value": float(result[task.metric]), "images": len(dataset)}


def _versions() -> dict[str, str]:
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return versions


def _task_of(module: nn.Module, spec: ModelSpec, size: tuple[int, int]) -> str:
    if spec.task == "detection":
        return spec.task
    with torch.no_grad():
        out = module(torch.zeros(1, 3, *size))
    return "segmentation" if out.dim() == 4 else "classification"


def _metadata(
    spec: ModelSpec,
    fmt: str,
    path: Path,
    module: nn.Module,
    task: str,
    size: tuple[int, int],
    dynamic: bool,
    opset: int,
):
    meta = {
        "format": fmt,
        "file": path.name,
        "model": spec.model,
        "task": task,
        "num_classes": spec.num_classes,
        "classes": spec.classes or [str(i) for i in range(spec.num_classes)],
        "image_size": list(size),
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch" if dynamic else 1, 3, *size],
            "layout": "NCHW",
            "dtype": "float32",
            "range": [0.0, 1.0],
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch" if dynamic else 1, spec.num_classes, *(size if task == "segmentation" else ())],
        },
        "normalization": {"mean": list(spec.mean), "std": list(spec.std), "folded": True},
        "dynamic_batch": dynamic,
        "opset": opset if fmt == "onnx" else None,
        "exporter": {
            "onnx": "torch.onnx.export(dynamo=True)",
            "torchscript": "torch.jit.trace",
            "exported-program": "torch.export.export + torch.export.save",
        }[fmt],
        "versions": _versions(),
    }
    if task == "detection":
        meta["output"], meta["postprocess"] = output_metadata(module, dynamic)
    return meta


def _runner(path: Path, meta: dict[str, Any]) -> nn.Module:
    """The exported file's runner; a detector's selects its boxes as the PyTorch model does."""
    runner = load_runtime(path)
    return DetectionRunner(runner, meta["postprocess"]) if meta["task"] == "detection" else runner


def export_run(
    run: str | Path,
    fmt: str = "onnx",
    out: str | Path | None = None,
    dynamic_batch: bool = False,
    opset: int = DEFAULT_OPSET,
    parity_images: int = 64,
    limit: int | None = None,
    int8: bool = False,
    calibration: int = 256,
    metric: bool = True,
) -> dict[str, Any]:
    """Export a run's student to ``fmt`` in ``out`` (default ``RUN/export``) as ``student.<ext>`` plus
    ``student.<ext>.json`` (the metadata, with ``parity``), check it against PyTorch, and return the
    metadata (``"path"`` added). With ``int8`` (ONNX only), also ``student.int8.onnx`` (+ JSON), its
    metric before and after in ``metadata["int8"]``. ``metric=False`` skips the test-split metric.

    The parity images are the first ``parity_images`` of the run's eval split (random images when the
    run has no ``config.yaml``, which also leaves out the metric); the metric uses the whole split, or
    its first ``limit`` images. Raises :class:`KdkitError` when the difference exceeds the tolerance.
    """
    check_format(fmt, int8)
    run = Path(run)
    if not run.is_dir():
        raise KdkitError(f"{run} is not a run directory: give the folder that holds student.json")
    model, spec = load_student(run)
    config = run_config(run)
    size = tuple(spec.image_size) if spec.image_size else None
    if size is None:
        if config is None:
            raise KdkitError(
                f"{run}/student.json has no image_size and the run has no config.yaml to take it from"
            )
        size = tuple(_dataset(config, config.data.eval_split)[0][0].shape[-2:])
    module = deployable(model, spec, size)
    task = _task_of(module, spec, size)
    out_dir = Path(out) if out is not None else run / "export"
    names = OUTPUT_NAMES if task == "detection" else (OUTPUT_NAME,)
    path = export_module(module, fmt, out_dir / f"student{FORMATS[fmt]}", size, dynamic_batch, opset, names)
    meta = _metadata(spec, fmt, path, module, task, size, dynamic_batch, opset)
    write_metadata(path, meta)
    runner = _runner(path, meta)
    if config is not None:
        test = _dataset(config, config.data.eval_split)
        images, source = _images(test, parity_images, size), f"{config.data.eval_split} split"
    else:
        gen = torch.Generator().manual_seed(0)
        images, source = torch.rand(parity_images, 3, *size, generator=gen), "uniform random images"
    meta["parity"] = {**parity(module, runner, images, batch=32, names=names), "source": source}
    if config is not None and metric:
        pytorch = task_metric(module, config, limit, size)
        meta["parity"].update(
            metric=pytorch["metric"], metric_images=pytorch["images"], pytorch=pytorch["value"]
        )
        meta["parity"]["exported"] = task_metric(runner, config, limit, size)["value"]
    write_metadata(path, meta)
    check_parity(fmt, meta["parity"])
    if int8:
        meta["int8"] = _int8(path, meta, module, config, size, images, calibration, limit, metric)
        write_metadata(path, meta)
    if out_dir == run / "export":
        update_report(run)
    return {**meta, "path": path}


def _int8(path, meta, module, config, size, images, calibration, limit, metric) -> dict[str, Any]:
    from .quantize import quantize_onnx

    if config is not None:
        train = _dataset(config, config.data.train_split)
        calib, source = _images(train, calibration, size, seed=0), f"{config.data.train_split} split"
    else:
        calib, source = images, "uniform random images (no config.yaml)"
    target = path.with_name(path.name.replace(".onnx", ".int8.onnx"))
    batch = 32 if meta["dynamic_batch"] else 1
    quantize_onnx(path, target, calib, batch=batch)
    runner = _runner(target, meta)
    report: dict[str, Any] = {
        "file": target.name,
        "calibration_images": int(calib.shape[0]),
        "calibration_source": source,
        "settings": "QDQ, activations uint8, weights int8 per channel, MinMax calibration",
        **_int8_difference(parity(module, runner, images, batch=32, names=meta["output"].get("names"))),
        "size_bytes": file_size(target),
        "fp32_size_bytes": file_size(path),
    }
    if config is not None and metric:
        report.update(
            metric=meta["parity"]["metric"], fp32=meta["parity"]["exported"],
            int8=task_metric(runner, config, limit, size)["value"],
        )  # fmt: skip
    write_metadata(target, {**meta, "file": target.name, "int8": report, "parity": None})
    return report


def _int8_difference(result: dict[str, Any]) -> dict[str, Any]:
    """``max_abs_diff`` of the int8 file from PyTorch, per output for several (a detector's boxes in
    pixels and its scores)."""
    if "outputs" not in result:
        return {"max_abs_diff": result["max_abs_diff"]}
    return {"max_abs_diff": {name: out["max_abs_diff"] for name, out in result["outputs"].items()}}


def predict_onnx(
    model: str | Path,
    images: Sequence[str | Path],
    top: int = 3,
    out: str | Path = "predictions",
    alpha: float = 0.5,
    min_score: float = 0.3,
) -> tuple[str, list[Any]]:
    """Predict with an exported ONNX file and its metadata JSON alone (no PyTorch model is built).

    Returns ``(task, results)``: for classification, per image the ``top`` (class, probability) pairs
    (the image resized and centre-cropped to the square ``image_size`` as ``kdkit predict`` does); for
    segmentation, per image ``{"image", "overlay", "mask", "coverage"}`` as
    :func:`kdkit.predict.predict_masks` (the image resized to ``image_size``, scores resized back); for
    detection, per image ``{"image", "drawn", "detections"}`` as :func:`kdkit.predict.predict_boxes`
    (the image letterboxed to ``image_size``, boxes of at least ``min_score`` mapped back).
    """

    from ..data.folders import load_image
    from ..report.overlay import write_prediction

    model = Path(model)
    meta = read_metadata(model)
    if meta.get("format") != "onnx":
        raise KdkitError(
            f"{model} is a {meta.get('format')} export; kdkit predict takes .onnx files or run directories"
        )
    runner: Runner = load_runtime(model)
    names, size = meta["classes"], tuple(meta["image_size"])
    if meta["task"] == "detection":
        detector = DetectionRunner(runner, meta["postprocess"])
        return "detection", predict_detections(
            detector, list(map(Path, images)), size, names, Path(out), min_score
        )
    if meta["task"] == "classification":
        if size[0] != size[1]:
            raise KdkitError(
                f"{model} takes {size[0]}x{size[1]} images; classification prediction needs a square size"
            )
        batch = torch.stack([load_image(Path(p), size[0]) for p in images])
        probs = runner(_to01(batch)).softmax(1)
        values, indices = probs.topk(min(top, probs.shape[1]), dim=1)
        return "classification", [
            [(names[i], float(v)) for v, i in zip(vs, ix)]
            for vs, ix in zip(values.tolist(), indices.tolist())
        ]
    results: list[dict] = []
    stems: set[str] = set()
    for path in map(Path, images):
        image = load_image(path)
        scores = runner(_to01(image[None], size))
        results.append(write_prediction(path, image, scores, names, Path(out), stems, alpha))
    return "segmentation", results
