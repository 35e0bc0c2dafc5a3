"""Post-training int8 quantization of an exported ONNX student (ONNX Runtime static quantization).

Why ONNX Runtime's flow and not PyTorch's: the deployed artefact is the ONNX file, so quantizing that
file is quantizing what ships, and the int8 file runs where ONNX Runtime runs; PyTorch's eager/FX
quantization (``torch.ao.quantization``) is deprecated in favour of the pt2e flow, whose int8 models
still need a backend-specific lowering before they run fast.

Settings: QDQ format (QuantizeLinear/DequantizeLinear pairs around each op, the format ORT's CPU
kernels are optimised for), unsigned 8-bit activations and signed 8-bit weights (U8S8, ORT's
recommendation for x86 CPUs), per-channel weight scales (convolutions of ResNet-style nets vary a lot
per output channel), MinMax calibration on images of the training split.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from torch import Tensor

from ..errors import KdkitError
from .formats import INPUT_NAME


def _reader(images: Tensor, batch: int):
    from onnxruntime.quantization import CalibrationDataReader

    class ImageReader(CalibrationDataReader):
        """Feeds ``images`` (float [0, 1], NCHW) to the calibration in chunks of ``batch``."""

        def __init__(self) -> None:
            self.chunks: Iterator[np.ndarray] = (
                images[i : i + batch].float().numpy() for i in range(0, images.shape[0], batch)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            chunk = next(self.chunks, None)
            return None if chunk is None else {INPUT_NAME: chunk}

    return ImageReader()


def quantize_onnx(
    source: Path, target: Path, calibration: Tensor, batch: int = 1, reduce_range: bool = False
) -> Path:
    """Write the int8 version of ONNX file ``source`` to ``target``, calibrated on ``calibration``
    (float [0, 1] images ``[K, 3, H, W]``, fed ``batch`` at a time; ``batch`` must suit the file:
    1 for a fixed-batch export). ``reduce_range`` (7-bit weights) helps x86 CPUs without VNNI."""
    if calibration.shape[0] == 0:
        raise KdkitError("int8 calibration needs at least one training image; raise --calibration")
    # the quantizer logs one warning per rank-1 constant it leaves per-tensor (a detector's anchors)
    logging.disable(logging.WARNING)
    try:
        return _quantize(source, target, calibration, batch, reduce_range)
    finally:
        logging.disable(logging.NOTSET)


def _quantize(source: Path, target: Path, calibration: Tensor, batch: int, reduce_range: bool) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        prepared = Path(tmp) / "prepared.onnx"
        # shape inference + graph optimisation before quantization, as ORT recommends
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(target),
            _reader(calibration, batch),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    return target
