"""Exported detectors: the graph ends at every anchor's decoded box and class scores; the selection
(score threshold, top-k, class-wise NMS) runs after it, in
:func:`~kdkit.models.detection.postprocess.select_detections`.

Why split there: NMS keeps a data-dependent number of boxes, which ONNX expresses only with
``NonMaxSuppression`` and loops that the exporters and int8 quantization handle poorly, while the
dense part (backbone, FPN, heads, box decoding against the anchors of the fixed input size, stored
in the graph as a constant) exports like any CNN. The selection is a few lines of tensor code that
reproduce the PyTorch detector's own ``detect`` exactly (tested), so a deployed student gives the
boxes the run evaluated. Outputs: ``boxes`` ``[B, A, 4]`` (xyxy, input pixels, clipped) and
``scores`` ``[B, A, C]``; the metadata's ``postprocess`` holds the selection's settings.

Dense detectors (FCOS, RetinaNet, SSD, ``det_compact_*``) export; Faster R-CNN does not: its second
stage crops RoI features for a data-dependent set of proposals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import KdkitError
from ..models.detection.postprocess import select_detections

OUTPUT_NAMES = ("boxes", "scores")


class _Selecting:
    """``detect`` by :func:`select_detections` with ``self.settings``; no training losses."""

    settings: dict[str, Any]

    def detect(self, outputs: tuple[Tensor, Tensor], score_thresh: float | None = None) -> list[dict]:
        settings = self.settings if score_thresh is None else {**self.settings, "score_thresh": score_thresh}
        return select_detections(outputs[0], outputs[1], settings)

    def losses(self, outputs: Any, targets: Tensor) -> dict[str, Tensor]:
        return {}


class DetectorDeployable(_Selecting, nn.Module):
    """A dense detector with its input normalisation folded in, for ``size`` (h, w) images:
    ``forward(x01) -> (boxes [B, A, 4], scores [B, A, C])``; ``detect`` selects as the model does."""

    def __init__(self, model: nn.Module, mean: Any, std: Any, size: tuple[int, int]) -> None:
        super().__init__()
        check_exportable(model)
        self.model = model.eval()
        self.size = tuple(int(v) for v in size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("anchors", model.anchor_boxes(self.size)[0])
        self.settings = model.postprocess_settings(self.size)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        outputs = self.model((x - self.mean) / self.std)
        return self.model.decode(outputs["box"], self.anchors, self.size), self.model.scores(outputs)


class DetectionRunner(_Selecting, nn.Module):
    """An exported detector's runner (:func:`~kdkit.deploy.runtime.load_runtime`) with the selection of
    its metadata's ``postprocess`` settings: it evaluates and predicts like the PyTorch detector."""

    def __init__(self, runner: nn.Module, settings: dict[str, Any]) -> None:
        super().__init__()
        self.runner, self.settings = runner, dict(settings)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.runner(x)


def check_exportable(model: nn.Module) -> None:
    if not getattr(model, "dense", False) or not hasattr(model, "postprocess_settings"):
        raise KdkitError(
            f"{type(model).__name__} cannot be exported: only dense detectors (FCOS, RetinaNet, SSD, "
            "det_compact_*) export, a two-stage detector crops features per proposal inside its graph; "
            "deploy it with its student.safetensors and PyTorch"
        )


def output_metadata(module: DetectorDeployable, dynamic: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The metadata's ``output`` and ``postprocess`` entries of an exported detector."""
    anchors = int(module.anchors.shape[0])
    batch = "batch" if dynamic else 1
    num_classes = int(module.model.num_classes)
    output = {
        "names": list(OUTPUT_NAMES),
        "boxes": {"shape": [batch, anchors, 4], "meaning": "x1, y1, x2, y2 in input pixels, clipped"},
        "scores": {"shape": [batch, anchors, num_classes], "meaning": "class scores as the model ranks them"},
    }
    return output, {**module.settings, "run": "kdkit.models.detection.postprocess.select_detections"}


def write_detections(
    path: Path,
    image: Tensor,
    found: dict[str, Tensor],
    scale: float,
    names: list[str],
    folder: Path,
    min_score: float,
) -> dict[str, Any]:
    """Boxes scoring at least ``min_score`` (found on the image letterboxed by ``scale``) mapped back
    to the image's pixels, clipped to it (the letterbox's padding is not the image), and drawn on it as
    ``<folder>/<stem>_boxes.png``; the image's entry of ``detections.json``."""
    from torchvision.ops import clip_boxes_to_image

    from ..report.boxes import draw_boxes, save_png

    keep = found["scores"] >= min_score
    boxes = clip_boxes_to_image(found["boxes"][keep] / scale, tuple(image.shape[-2:]))
    scores, labels = found["scores"][keep], found["labels"][keep]
    drawn = save_png(draw_boxes(image, boxes, labels, names, scores), folder / f"{path.stem}_boxes.png")
    detections = [
        {"class": names[int(c)], "score": round(float(s), 4), "box": [round(float(v), 2) for v in b]}
        for b, s, c in zip(boxes, scores, labels)
    ]
    return {"image": str(path), "drawn": str(drawn), "detections": detections}


def predict_detections(
    runner: nn.Module,
    images: list[Path],
    size: tuple[int, int] | None,
    names: list[str],
    out: Path,
    min_score: float,
    prepare=lambda x: x,
) -> list[dict[str, Any]]:
    """Detect objects in image files with ``runner`` (anything with ``forward`` and ``detect``): each
    image letterboxed to ``size``, ``prepare`` d (float [0, 1] -> the runner's input), detected, drawn;
    writes ``<out>/detections.json``."""
    import json

    from ..data.det_augment import letterbox
    from ..data.folders import load_image

    results = []
    with torch.no_grad():
        for path in images:
            image = load_image(path)
            boxed, scale = letterbox(image, tuple(size)) if size else (image, 1.0)
            found = runner.detect(runner(prepare(boxed[None].float() / 255)))[0]
            results.append(write_detections(path, image, found, scale, names, out, min_score))
    out.mkdir(parents=True, exist_ok=True)
    (out / "detections.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
