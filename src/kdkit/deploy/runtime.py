"""Run an exported file (ONNX Runtime, TorchScript, exported program); time it with
:func:`kdkit.deploy.profile.latency_stats`.

:func:`load_runtime` gives a callable ``runner(x) -> logits`` on float images in [0, 1] (the
normalisation is folded into the file, see :mod:`kdkit.deploy.formats`). A file exported with a fixed
batch of 1 is fed one image at a time, so every runner takes any batch.

Trust: an ONNX file is a protobuf graph and carries no code. ``.ts`` and ``.pt2`` files are read by
``torch.jit.load`` and ``torch.export.load``, whose formats can carry code or pickled objects (the
exported program's serializer unpickles part of the file): load only files you exported yourself.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import KdkitError
from .formats import FORMATS, metadata_path, read_metadata

RUNTIMES = ("torch", "onnxruntime", "torchscript")


def format_of(path: Path) -> str:
    for fmt, suffix in FORMATS.items():
        if path.name.endswith(suffix):
            return fmt
    raise KdkitError(
        f"cannot tell the format of {path.name}: expected a file ending in {', '.join(FORMATS.values())}"
    )


class Runner(nn.Module):
    """An exported file as a module: ``forward(x01 [B,3,H,W]) -> logits`` (a torch tensor on the CPU;
    a tuple of them for files with several outputs, e.g. a detector's boxes and scores).

    Being an ``nn.Module``, it goes wherever kdkit evaluates a model (``task.evaluate``).
    """

    def __init__(self, call: Callable[[Tensor], Tensor], fixed_batch: int | None, name: str) -> None:
        super().__init__()
        self.call, self.fixed_batch, self.name = call, fixed_batch, name

    def forward(self, x: Tensor) -> Tensor:
        x = x.detach().float().cpu().contiguous()
        if self.fixed_batch is None or x.shape[0] == self.fixed_batch:
            return self.call(x)
        parts = [self.call(chunk) for chunk in torch.split(x, self.fixed_batch)]
        if isinstance(parts[0], tuple):
            return tuple(torch.cat(outputs) for outputs in zip(*parts))
        return torch.cat(parts)


def onnx_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_runtime(path: str | Path, threads: int | None = None) -> Runner:
    """A runner for an exported ``.onnx`` (ONNX Runtime, CPU), ``.ts`` (TorchScript) or ``.pt2`` file."""
    path = Path(path)
    if not path.is_file():
        raise KdkitError(f"no exported model at {path}: run `kdkit export` first")
    fmt = format_of(path)
    if fmt == "onnx":
        session = onnx_session(path, threads)
        feed = session.get_inputs()[0]
        batch = feed.shape[0]

        def call(x: Tensor) -> Tensor | tuple[Tensor, ...]:
            outputs = tuple(torch.from_numpy(o) for o in session.run(None, {feed.name: x.numpy()}))
            return outputs[0] if len(outputs) == 1 else outputs

        return Runner(call, batch if isinstance(batch, int) else None, "onnxruntime")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        module = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()

    def call_torch(x: Tensor) -> Tensor:
        with torch.no_grad():
            return module(x)

    dynamic = read_metadata(path).get("dynamic_batch", True) if metadata_path(path).is_file() else True
    return Runner(call_torch, None if dynamic else 1, fmt)
