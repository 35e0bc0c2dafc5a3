"""A run's summary (``summary.json``): best and last value of its headline metric, from its records."""

from __future__ import annotations

import math
from typing import Any

from ..errors import KdkitError


def run_summary(name: str, metric: str, history: list[dict[str, Any]]) -> dict[str, Any]:
    """Best (over the last stage's evaluations) and last value of the task's metric, and the
    teacher's: ``best_top1``/``last_top1``... for classification, ``best_miou``... for segmentation
    (``best_miou_per_image``... when ``evaluation.metric`` makes Eq. 5 the headline). Segmentation
    summaries also carry the last value of both mIoUs (``last_miou``: dataset; ``last_miou_per_image``:
    Spirit Distillation Eq. 5), pixel accuracy, mIoU variance and HP-Acc."""
    evals = [r for r in history if r["kind"] == "eval"]
    teacher = [r for r in history if r["kind"] == "teacher_eval"]
    if not evals:
        return {"name": name, "metric": metric}
    last = evals[-1]
    final_stage = [r for r in evals if r["stage_index"] == last["stage_index"]]
    best = max(final_stage, key=lambda r: r[metric])
    out = {
        "name": name,
        "metric": metric,
        f"last_{metric}": last[metric],
        f"best_{metric}": best[metric],
        "best_epoch": best["epoch"],
        "last_epoch": last["epoch"],
    }
    segmentation = ("miou", "miou_per_image", "pixel_acc", "miou_var", "hp_acc")
    extras = ("top5",) if metric == "top1" else segmentation
    out.update({f"last_{key}": last[key] for key in extras if key in last})
    if teacher:
        out[f"teacher_{metric}"] = teacher[-1][metric]
    if not math.isfinite(out[f"last_{metric}"]):
        raise KdkitError(f"evaluation produced a non-finite {metric}")
    return out
