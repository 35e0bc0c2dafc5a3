"""``report.md`` of one run: what was trained, how it ended, where the plots are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..engine.checkpoint import atomic_write_text
from ..engine.tasks import METRIC_LABELS


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _describe_terms(config: dict[str, Any]) -> str:
    parts = []
    for stage in config.get("stages", []):
        terms = stage.get("terms") or config.get("terms", [])
        names = " + ".join(f"{t.get('weight', 1.0):g}·{t['name']}" for t in terms)
        length = f"{stage['epochs']} epochs" if stage.get("epochs") else f"{stage['steps']} steps"
        optimizer = stage["optimizer"]
        parts.append(f"{stage['name']}: {names} ({length}, {optimizer['name']} lr {optimizer['lr']:g})")
    return "; ".join(parts)


def _describe_refiner(refiner: dict[str, Any]) -> str:
    """``style (fourier, alpha 1.0; aspects: weather)``: the refiner and what its sources change."""
    details = [str(refiner[k]) for k in ("method",) if k in refiner]
    details += [f"{k} {refiner[k]}" for k in ("alpha", "prompt") if k in refiner]
    aspects = f"; aspects: {', '.join(refiner['aspects'])}" if refiner.get("aspects") else ""
    return f"{refiner['name']} ({', '.join(details)}{aspects})"


def write_run_report(
    run_dir: Path, summary: dict[str, Any], history: list[dict[str, Any]], plots: list[Path]
) -> Path:
    config = (
        yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
    )
    teacher = config.get("teacher") or {}
    metric = summary.get("metric", "top1")
    extras = {"top5": "top-5 (%)"} if metric == "top1" else {
        "pixel_acc": "pixel acc (%)", "miou_var": "mIoU var (1e-3)", "hp_acc": "HP-Acc (%)"
    }
    rows = []
    if f"teacher_{metric}" in summary:
        rows.append(["teacher", teacher.get("name", "?"), f"{summary[f'teacher_{metric}']:.2f}", ""])
        rows[-1] += [""] * len(extras)
    if f"best_{metric}" in summary:
        rows.append(
            [
                "student",
                config.get("student", {}).get("name", "?"),
                f"{summary[f'best_{metric}']:.2f} (epoch {summary['best_epoch']:.0f})",
                f"{summary[f'last_{metric}']:.2f}",
                *[f"{summary[f'last_{key}']:.2f}" for key in extras],
            ]
        )
    label = METRIC_LABELS[metric]
    header = ["model", "network", f"best {label}", f"last {label}", *[f"last {v}" for v in extras.values()]]
    train = [r for r in history if r["kind"] == "train"]
    speed = sum(r["images_per_s"] for r in train) / len(train) if train else 0.0
    text = [
        f"# Run `{summary.get('name', run_dir.name)}`",
        "",
        f"- data: `{config.get('data', {}).get('name', '?')}`; teacher: `{teacher.get('name', 'none')}`; "
        f"student: `{config.get('student', {}).get('name', '?')}`",
        f"- stages: {_describe_terms(config)}",
        *[f"- refiner: {_describe_refiner(r)}" for r in config.get("refiners", [])],
        f"- mean training throughput: {speed:.0f} images/s",
        "",
        markdown_table(header, rows),
        "",
        *[f"![{p.stem}]({p.name})" for p in plots],
        "",
        "Files: `config.yaml` (resolved config), `metrics.jsonl`, `checkpoints/last.pt`, "
        "`student.safetensors` + `student.json` (the exported student).",
        "",
    ]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(text))
    return path
