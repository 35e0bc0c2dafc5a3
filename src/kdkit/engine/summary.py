"""A run's summary (``summary.json``): best and last value of its headline metric, from its records."""

from __future__ import annotations

import math
from typing import Any

from ..errors import KdkitError

_SEGMENTATION = {"pixel_acc": "pixel acc (%)", "miou_var": "mIoU var (1e-3)", "hp_acc": "HP-Acc (%)"}
EXTRAS: dict[str, dict[str, str]] = {
    "top1": {"top5": "top-5 (%)"},
    "miou": _SEGMENTATION,
    "miou_per_image": _SEGMENTATION,
    "map": {"map_50": "mAP50 (%)", "map_75": "mAP75 (%)", "map_small": "AP small (%)"},
}
"""Per headline metric: the other figures of the last evaluation a summary and a run report show."""


def run_summary(name: str, metric: str, history: list[dict[str, Any]]) -> dict[str, Any]:
    """Best (over the last stage's evaluations) and last value of the task's metric, and the
    teacher's: ``best_top1``/``last_top1``... for classification, ``best_miou``... for segmentation
    (``best_miou_per_image``... when ``evaluation.metric`` makes Eq. 5 the headline). Segmentation
    summaries also carry the last value of both mIoUs (``last_miou``: dataset; ``last_miou_per_image``:
    Spirit Distillation Eq. 5), pixel accuracy, mIoU variance and HP-Acc; detection summaries mAP50,
    mAP75 and AP of small boxes (:data:`EXTRAS`)."""
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
    extras = [*(("miou", "miou_per_image") if metric.startswith("miou") else ()), *EXTRAS.get(metric, {})]
    out.update({f"last_{key}": last[key] for key in extras if key in last})
    if teacher:
        out[f"teacher_{metric}"] = teacher[-1][metric]
    if not math.isfinite(out[f"last_{metric}"]):
        raise KdkitError(f"evaluation produced a non-finite {metric}")
    return out
