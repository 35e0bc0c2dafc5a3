"""Export a trained student to a deployment format, with its input normalisation folded in.

The exported network takes float32 images in [0, 1], NCHW, at the spec's image size, and returns the
logits (classification ``[B, C]``, segmentation ``[B, C, H, W]``; dict outputs are reduced with
:func:`~kdkit.taps.main_output`), or, for a dense detector, every anchor's decoded boxes and class
scores (:mod:`kdkit.deploy.detection`, which also selects the detections after the graph). Formats:

- ``onnx``: ``torch.onnx.export(..., dynamo=True)``, the ``torch.export``-based exporter. The
  TorchScript-based exporter (``dynamo=False``) also exports every demo family correctly, but it is
  deprecated since torch 2.9 and warns that it will be removed; the dynamo exporter is the supported
  path on torch 2.14 (its cost: a few seconds per export).
- ``torchscript``: ``torch.jit.trace`` (loadable without kdkit, from C++ too).
- ``exported-program``: ``torch.export.export`` + ``torch.export.save`` (a ``.pt2`` file).

Each file gets a metadata JSON beside it (``<file>.json``, see :func:`metadata_path`) that says how to
feed it; :func:`parity` measures how far an exported file is from PyTorch.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..engine.checkpoint import atomic_write_json
from ..errors import KdkitError
from ..taps import main_output

FORMATS = {"onnx": ".onnx", "torchscript": ".ts", "exported-program": ".pt2"}
INPUT_NAME, OUTPUT_NAME = "images", "logits"
DEFAULT_OPSET = 18
# Parity tolerance for fp32 exports: max |exported - PyTorch| <= TOLERANCE * max(1, max |PyTorch|).
TOLERANCE = 1e-4


class Deployable(nn.Module):
    """``model`` with its input normalisation folded in:
    ``forward(x01) = main_output(model((x01 - mean) / std))``."""

    def __init__(self, model: nn.Module, mean: Any, std: Any) -> None:
        super().__init__()
        self.model = model.eval()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return main_output(self.model((x - self.mean) / self.std))


def deployable(model: nn.Module, spec: Any, size: tuple[int, int]) -> nn.Module:
    """The module to export for a network of ``spec`` (its :class:`~kdkit.deploy.export.ModelSpec`):
    :class:`Deployable`, or for detectors :class:`~kdkit.deploy.detection.DetectorDeployable` at ``size``."""
    if spec.task == "detection":
        from .detection import DetectorDeployable

        return DetectorDeployable(model, spec.mean, spec.std, size)
    return Deployable(model, spec.mean, spec.std)


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' progress lines (stdout) and log records below errors."""
    import logging

    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "torch.export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def check_format(fmt: str, int8: bool = False) -> str:
    if fmt not in FORMATS:
        raise KdkitError(f"unknown export format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    if int8 and fmt != "onnx":
        raise KdkitError(f"--int8 works with --format onnx only (ONNX Runtime quantization), not {fmt}")
    return fmt


def metadata_path(path: Path) -> Path:
    """``student.onnx`` -> ``student.onnx.json``."""
    return path.with_name(path.name + ".json")


def read_metadata(path: str | Path) -> dict[str, Any]:
    meta = metadata_path(Path(path))
    if not meta.is_file():
        raise KdkitError(f"no metadata {meta.name} beside {path}: export the model with `kdkit export`")
    return json.loads(meta.read_text())


def write_metadata(path: Path, metadata: dict[str, Any]) -> Path:
    atomic_write_json(metadata_path(path), metadata)
    return metadata_path(path)


def file_size(path: Path) -> int:
    """Bytes on disk of an exported file, with an ONNX external-data file beside it."""
    extra = path.with_name(path.name + ".data")
    return path.stat().st_size + (extra.stat().st_size if extra.is_file() else 0)


def export_module(
    module: nn.Module,
    fmt: str,
    path: Path,
    image_size: tuple[int, int],
    dynamic_batch: bool = False,
    opset: int = DEFAULT_OPSET,
    output_names: Sequence[str] = (OUTPUT_NAME,),
) -> Path:
    """Write ``module`` (taking ``[B, 3, H, W]`` float input) to ``path`` in format ``fmt``; ONNX names
    its outputs ``output_names``.

    Without ``dynamic_batch`` the file takes batch 1 only; with it, any batch (the example batch is 2 so
    that ``torch.export`` does not specialise the batch dimension to 1).
    """
    check_format(fmt)
    module = module.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    sample = torch.rand(2 if dynamic_batch else 1, 3, *image_size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=4096)
    shapes = ({0: batch},) if dynamic_batch else None
    try:
        with torch.no_grad(), warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            if fmt == "onnx":
                torch.onnx.export(
                    module,
                    (sample,),
                    str(path),
                    dynamo=True,
                    input_names=[INPUT_NAME],
                    output_names=list(output_names),
                    opset_version=opset,
                    dynamic_shapes=shapes,
                    external_data=False,
                    verbose=False,
                )
            elif fmt == "torchscript":
                torch.jit.save(torch.jit.trace(module, sample, check_trace=False), str(path))
            else:
                torch.export.save(torch.export.export(module, (sample,), dynamic_shapes=shapes), str(path))
    except KdkitError:
        raise
    except Exception as exc:  # the exporters raise many types; the message is what the user needs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KdkitError(
            f"{fmt} export failed ({type(exc).__name__}: {first[:200]}); try another --format"
        ) from None
    if fmt == "onnx":
        written = onnx_opset(path)
        if written != opset:
            raise KdkitError(
                f"the ONNX exporter could not convert the model to opset {opset} (it wrote opset {written}); "
                f"use --opset {written}"
            )
    return path


def onnx_opset(path: Path) -> int:
    """The default-domain opset of an ONNX file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def parity(
    reference: nn.Module,
    runner: Any,
    images: Tensor,
    batch: int | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Max |exported - PyTorch| over ``images`` (float [0, 1]) and the tolerance it is held to.

    ``runner(x)`` runs the exported file (see :mod:`kdkit.deploy.runtime`); ``batch`` is the size of the
    chunks fed to both (default: all at once). With several outputs (a tuple) each is held to its own
    tolerance: ``outputs`` maps their ``names`` (default ``"0"``, ``"1"``...) to their figures, and the
    top-level figures are those of the output furthest from its tolerance.
    """
    worst: list[float] = []
    scale: list[float] = []
    step = batch or images.shape[0]
    with torch.no_grad():
        for chunk in torch.split(images, step):
            expected, got = reference(chunk), runner(chunk)
            expected = expected if isinstance(expected, tuple) else (expected,)
            got = got if isinstance(got, tuple) else (got,)
            if not worst:
                worst, scale = [0.0] * len(expected), [0.0] * len(expected)
            for i, (e, g) in enumerate(zip(expected, got, strict=True)):
                if g.shape != e.shape:
                    raise KdkitError(f"exported output has shape {tuple(g.shape)}, PyTorch {tuple(e.shape)}")
                worst[i] = max(worst[i], float((g.float() - e.float()).abs().max()))
                scale[i] = max(scale[i], float(e.float().abs().max()))
    outputs = [
        {"max_abs_diff": w, "max_abs_output": s, "tolerance": TOLERANCE * max(1.0, s)}
        for w, s in zip(worst, scale)
    ]
    # NaN ranks first: a NaN difference must fail the check
    ratio = [o["max_abs_diff"] / o["tolerance"] for o in outputs]
    first = max(range(len(outputs)), key=lambda i: float("inf") if ratio[i] != ratio[i] else ratio[i])
    result: dict[str, Any] = {"images": int(images.shape[0]), **outputs[first]}
    if len(outputs) > 1:
        keys = list(names) if names is not None else [str(i) for i in range(len(outputs))]
        result["outputs"] = dict(zip(keys, outputs, strict=True))
    return result


def check_parity(fmt: str, result: dict[str, float]) -> None:
    if not result["max_abs_diff"] <= result["tolerance"]:  # also catches NaN
        raise KdkitError(
            f"{fmt} export differs from PyTorch by {result['max_abs_diff']:.3g} (tolerance "
            f"{result['tolerance']:.3g}) on {result['images']} images; try another --format or --opset"
        )
