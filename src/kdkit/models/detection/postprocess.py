"""Detections from a dense detector's decoded outputs, without the model: what runs after an exported
detector (:mod:`kdkit.deploy.detection`), whose graph ends at every anchor's box and class scores.

:func:`select_detections` repeats the selection of torchvision's post-processing step by step, so
that it gives what the PyTorch detector's own ``detect`` gives (a test holds them equal):

- ``kind: levels`` (RetinaNet, FCOS: ``postprocess_detections``): per level, the (anchor, class)
  scores above ``score_thresh``, the best ``topk_candidates`` of them; then class-wise NMS
  (``torchvision.ops.batched_nms``, IoU ``nms_thresh``) over all levels, the best
  ``detections_per_img`` kept.
- ``kind: classes`` (SSD): per class, the anchors scoring above ``score_thresh``, the best
  ``topk_candidates``; then the same NMS and cap.

Labels are 0-based foreground classes, as ``Detector.detect`` returns them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchvision.ops import batched_nms

SETTINGS = ("kind", "score_thresh", "nms_thresh", "topk_candidates", "detections_per_img")


def _best(scores: Tensor, threshold: float, topk: int) -> tuple[Tensor, Tensor]:
    """(scores, positions) of the entries of 1-D ``scores`` above ``threshold``, the best ``topk``."""
    positions = torch.where(scores > threshold)[0]
    kept, order = scores[positions].topk(min(topk, positions.numel()))
    return kept, positions[order]


def select_detections(boxes: Tensor, scores: Tensor, settings: dict[str, Any]) -> list[dict[str, Tensor]]:
    """``boxes`` ``[B, A, 4]`` (decoded, clipped, xyxy) and ``scores`` ``[B, A, C]`` -> per image
    ``{"boxes" [n, 4], "scores" [n], "labels" [n]}`` best first (see the module docstring)."""
    kind, threshold = settings["kind"], float(settings["score_thresh"])
    topk = int(settings["topk_candidates"])
    if kind not in ("levels", "classes"):
        raise ValueError(f"unknown post-processing kind '{kind}' (expected 'levels' or 'classes')")
    num_classes = scores.shape[-1]
    found = []
    for image_boxes, image_scores in zip(boxes.float(), scores.float()):
        picked: list[tuple[Tensor, Tensor, Tensor]] = []
        if kind == "levels":
            counts = [int(c) for c in settings["level_counts"]]
            for level_boxes, level_scores in zip(image_boxes.split(counts), image_scores.split(counts)):
                kept, flat = _best(level_scores.flatten(), threshold, topk)
                anchor = torch.div(flat, num_classes, rounding_mode="floor")
                picked.append((level_boxes[anchor], kept, flat % num_classes))
        else:
            for label in range(num_classes):
                kept, anchor = _best(image_scores[:, label], threshold, topk)
                picked.append((image_boxes[anchor], kept, torch.full_like(anchor, label)))
        all_boxes, all_scores, labels = (torch.cat(parts) for parts in zip(*picked))
        keep = batched_nms(all_boxes, all_scores, labels, float(settings["nms_thresh"]))
        keep = keep[: int(settings["detections_per_img"])]
        found.append({"boxes": all_boxes[keep], "scores": all_scores[keep], "labels": labels[keep]})
    return found
