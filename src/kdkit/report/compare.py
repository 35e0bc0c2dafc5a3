"""``kdkit compare``: one table over runs, seeds grouped as mean ± std with best and last epoch.

:func:`find_runs` turns what a user types (run directories, a parent folder of runs, a shell glob
that also matches reports and plots) into finished run directories plus notes on what was skipped.
Runs of different tasks are never mixed in one table: :func:`comparison_tables` writes one table per
metric (top-1 for classification, mIoU for segmentation).
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

import yaml

from ..config import without_later_defaults
from ..engine.tasks import METRIC_LABELS
from ..errors import KdkitError
from .runreport import markdown_table

SEED_SUFFIX = re.compile(r"[-_](seed|s)\d+$")
TABLE_EXTRAS = {
    "miou": {"miou_var": "last mIoU var (1e-3)", "hp_acc": "last HP-Acc (%)"},
    "map": {"map_50": "last mAP50 (%)", "map_75": "last mAP75 (%)"},
}
"""Per headline metric: the further columns of a comparison table (last evaluation, mean ± std)."""


def read_run(run_dir: Path) -> dict[str, Any]:
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise KdkitError(f"{run_dir} is not a finished run (no summary.json); finish or resume it first")
    summary = json.loads(summary_path.read_text())
    config = (
        yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
    )
    return {"dir": run_dir, "summary": summary, "config": config}


def is_run(path: Path) -> bool:
    """A kdkit run directory (finished or not): it holds the resolved ``config.yaml`` and metrics."""
    return (
        path.is_dir()
        and (path / "config.yaml").is_file()
        and ((path / "summary.json").is_file() or (path / "metrics.jsonl").is_file())
    )


def find_runs(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """Finished run directories among ``paths`` (a folder that is not a run contributes its run
    subdirectories, sorted by name), and one note per path skipped (files, unfinished runs, folders
    without runs). Raises KdkitError when no finished run is left."""
    runs: list[Path] = []
    notes: list[str] = []

    def add(run_dir: Path) -> None:
        if not (run_dir / "summary.json").is_file():
            notes.append(f"skipped {run_dir}: not a finished run (no summary.json)")
        elif run_dir.resolve() not in {r.resolve() for r in runs}:
            runs.append(run_dir)

    for path in map(Path, paths):
        if not path.exists():
            notes.append(f"skipped {path}: no such file or folder")
        elif not path.is_dir():
            notes.append(f"skipped {path}: not a run directory")
        elif is_run(path):
            add(path)
        else:
            children = sorted(c for c in path.iterdir() if is_run(c))
            if not children:
                notes.append(f"skipped {path}: neither a run nor a folder of runs")
            for child in children:
                add(child)
    if not runs:
        shown = "; ".join(notes[:3]) + ("; ..." if len(notes) > 3 else "")
        raise KdkitError(
            f"no finished run to compare ({shown}); give run directories or a folder holding them"
        )
    return runs, notes


def group_key(run: dict[str, Any]) -> str:
    """Runs whose configs differ only in seed, name and output folder form one group (also when one was
    recorded before a later config field existed, :func:`~kdkit.config.without_later_defaults`)."""
    config = without_later_defaults(json.loads(json.dumps(run["config"])))
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
        keys += [f"last_{extra}" for extra in TABLE_EXTRAS.get(metric, {})]
        for key in keys:
            values = [s[key] for s in summaries if key in s]
            if values:
                row[f"{key}_mean"], row[f"{key}_std"] = mean_std(values)
        rows.append(row)
    return rows


def _number(value: float, digits: int) -> str:
    """``value`` with ``digits`` decimals, or as an integer when it is whole (epoch 12, not 12.0)."""
    return str(round(value)) if float(value).is_integer() else f"{value:.{digits}f}"


def _pm(row: dict[str, Any], key: str, digits: int = 2, whole: bool = False) -> str:
    if f"{key}_mean" not in row:
        return "–"
    show = (lambda v: _number(v, digits)) if whole else (lambda v: f"{v:.{digits}f}")
    if row["seeds"] == 1:
        return show(row[f"{key}_mean"])
    return f"{show(row[f'{key}_mean'])} ± {show(row[f'{key}_std'])}"


def comparison_tables(rows: list[dict[str, Any]]) -> str:
    """One Markdown table per metric among ``rows``: a single table when all runs share a task, else
    a ``### <metric>`` heading and a table for each (classification and segmentation are not mixed)."""
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    if len(metrics) <= 1:
        return comparison_table(rows)
    parts = [
        f"### {METRIC_LABELS[m]}\n\n{comparison_table([r for r in rows if r['metric'] == m])}"
        for m in metrics
    ]
    return "\n\n".join(parts)


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`compare_runs` rows of one metric (segmentation adds variance and
    HP-Acc columns, detection mAP50 and mAP75); rows of several metrics are refused (see
    :func:`comparison_tables`)."""
    metric = rows[0]["metric"] if rows else "top1"
    others = sorted({r["metric"] for r in rows} - {metric})
    if others:
        raise KdkitError(
            f"runs with different metrics ({metric}, {', '.join(others)}) cannot share one table; "
            "use comparison_tables (one table per metric)"
        )
    label = METRIC_LABELS[metric]
    extras = TABLE_EXTRAS.get(metric, {})
    header = ["run", "seeds", f"best {label}", f"last {label}", *extras.values()]
    header += ["best epoch", "last epoch", f"teacher {label}"]
    body = [
        [
            r["label"],
            str(r["seeds"]),
            _pm(r, f"best_{metric}"),
            _pm(r, f"last_{metric}"),
            *[_pm(r, f"last_{key}") for key in extras],
            _pm(r, "best_epoch", 2, whole=True),
            _pm(r, "last_epoch", 2, whole=True),
            _pm(r, f"teacher_{metric}"),
        ]
        for r in rows
    ]
    return markdown_table(header, body)
