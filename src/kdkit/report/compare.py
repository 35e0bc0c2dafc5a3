"""``kdkit compare``: one table over runs, seeds grouped as mean ± std with best and last epoch."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

import yaml

from ..engine.tasks import METRIC_LABELS
from ..errors import KdkitError
from .runreport import markdown_table

SEED_SUFFIX = re.compile(r"[-_](seed|s)\d+$")
SEGMENTATION_EXTRAS = {"miou_var": "last mIoU var (1e-3)", "hp_acc": "last HP-Acc (%)"}


def read_run(run_dir: Path) -> dict[str, Any]:
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise KdkitError(f"{run_dir} is not a finished run (no summary.json); finish or resume it first")
    summary = json.loads(summary_path.read_text())
    config = (
        yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
    )
    return {"dir": run_dir, "summary": summary, "config": config}


def group_key(run: dict[str, Any]) -> str:
    """Runs whose configs differ only in seed, name and output folder form one group."""
    config = json.loads(json.dumps(run["config"]))
    config.pop("name", None)
    runtime = config.get("runtime", {})
    for key in ("seed", "out_dir", "progress"):
        runtime.pop(key, None)
    return json.dumps(config, sort_keys=True)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def compare_runs(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """One row per group of runs, in the order the groups first appear."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run_dir in run_dirs:
        run = read_run(Path(run_dir))
        groups.setdefault(group_key(run), []).append(run)
    rows = []
    for runs in groups.values():
        summaries = [r["summary"] for r in runs]
        label = SEED_SUFFIX.sub("", summaries[0].get("name", runs[0]["dir"].name))
        metric = summaries[0].get("metric", "top1")
        row: dict[str, Any] = {"label": label, "seeds": len(runs), "metric": metric}
        keys = [f"best_{metric}", f"last_{metric}", "best_epoch", "last_epoch", f"teacher_{metric}"]
        keys += [f"last_{extra}" for extra in SEGMENTATION_EXTRAS if metric == "miou"]
        for key in keys:
            values = [s[key] for s in summaries if key in s]
            if values:
                row[f"{key}_mean"], row[f"{key}_std"] = mean_std(values)
        rows.append(row)
    return rows


def _pm(row: dict[str, Any], key: str, digits: int = 2) -> str:
    if f"{key}_mean" not in row:
        return "–"
    if row["seeds"] == 1:
        return f"{row[f'{key}_mean']:.{digits}f}"
    return f"{row[f'{key}_mean']:.{digits}f} ± {row[f'{key}_std']:.{digits}f}"


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`compare_runs` rows (segmentation adds variance and HP-Acc columns)."""
    metric = rows[0]["metric"] if rows else "top1"
    label = METRIC_LABELS[metric]
    extras = SEGMENTATION_EXTRAS if metric == "miou" else {}
    header = ["run", "seeds", f"best {label}", f"last {label}", *extras.values()]
    header += ["best epoch", "last epoch", f"teacher {label}"]
    body = [
        [
            r["label"],
            str(r["seeds"]),
            _pm(r, f"best_{metric}"),
            _pm(r, f"last_{metric}"),
            *[_pm(r, f"last_{key}") for key in extras],
            _pm(r, "best_epoch", 1),
            _pm(r, "last_epoch", 0),
            _pm(r, f"teacher_{metric}"),
        ]
        for r in rows
    ]
    return markdown_table(header, body)
