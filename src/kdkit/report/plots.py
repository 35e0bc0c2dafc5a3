"""PNG plots of a run's metrics (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..engine.tasks import METRIC_LABELS  # noqa: E402

NON_LOSS_KEYS = {"kind", "stage", "stage_index", "step", "epoch", "lr", "images_per_s"}


def _finish(fig, axis, path: Path, title: str, ylabel: str) -> Path:
    """Label an epoch-axis plot, save it as PNG and free the figure."""
    axis.set_xlabel("epoch")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _run_epochs(records: list[dict[str, Any]]) -> list[float]:
    """Epochs counted over the whole run (stages placed one after another)."""
    offset, last_stage, last_epoch, out = 0.0, None, 0.0, []
    for record in records:
        if last_stage is not None and record["stage_index"] != last_stage:
            offset += last_epoch
        last_stage, last_epoch = record["stage_index"], record["epoch"]
        out.append(offset + record["epoch"])
    return out


def plot_losses(history: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Training loss and each term's value against the epoch."""
    train = [r for r in history if r["kind"] == "train"]
    if not train:
        return None
    epochs = _run_epochs(train)
    keys = [k for k in train[-1] if k not in NON_LOSS_KEYS and "/" not in k]  # "<term>/<stat>": not losses
    fig, axis = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for key in keys:
        axis.plot(
            epochs,
            [r.get(key, float("nan")) for r in train],
            label=key,
            linewidth=1.6 if key == "loss" else 1.0,
        )
    axis.set_yscale("log")
    return _finish(fig, axis, path, title, "training loss (term values unweighted)")


def plot_accuracy(
    history: list[dict[str, Any]], path: Path, title: str, metric: str = "top1", label: str = "student"
) -> Path | None:
    """The trained network's ``metric`` (top-1 or mIoU) on the evaluation split against the epoch, with
    the teacher's as a line. ``label`` names the curve by the network's role: ``student`` when
    distilled, ``network`` for a run without a teacher (e.g. one training a teacher)."""
    evals = [r for r in history if r["kind"] == "eval"]
    if not evals:
        return None
    fig, axis = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    axis.plot(_run_epochs(evals), [r[metric] for r in evals], marker="o", markersize=3, label=label)
    teacher = [r for r in history if r["kind"] == "teacher_eval"]
    if teacher:
        axis.axhline(teacher[-1][metric], color="black", linestyle="--", linewidth=1, label="teacher")
    return _finish(fig, axis, path, title, METRIC_LABELS[metric])


def plot_comparison(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Bar chart of the mean best metric (± std) per method (rows of :func:`compare_runs`)."""
    metric = rows[0].get("metric", "top1")
    crowded = len(rows) > 5  # long labels then go under the bars at an angle
    fig, axis = plt.subplots(figsize=(max(6.4, 0.85 * len(rows)), 4.2 if crowded else 3.6), dpi=110)
    labels = [r["label"] if crowded else r["label"].replace(" (", "\n(") for r in rows]
    means = [r[f"best_{metric}_mean"] for r in rows]
    stds = [r[f"best_{metric}_std"] for r in rows]
    bars = axis.bar(labels, means, yerr=stds, capsize=4, color="#4c72b0")
    if crowded:
        axis.tick_params(axis="x", labelrotation=30, labelsize=8)
        for tick in axis.get_xticklabels():
            tick.set_horizontalalignment("right")
    low = min(means) - max(5.0, 2 * max(stds + [0.0]))
    axis.set_ylim(max(0.0, low), min(100.0, max(means) + 5.0))
    return _finish_bars(fig, axis, bars, means, path, title, f"best {METRIC_LABELS[metric]}")


def _finish_bars(fig, axis, bars, values: list[float], path: Path, title: str, ylabel: str) -> Path:
    """Value labels on the bars, axis labels and grid; save and close."""
    for bar, value in zip(bars, values):
        axis.text(
            bar.get_x() + bar.get_width() / 2, value, f"{value:.1f}", ha="center", va="bottom", fontsize=8
        )
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_curves(run_dirs: dict[str, Path], path: Path, title: str, metric: str = "top1") -> Path:
    """``metric`` against the epoch for several runs (read from their ``metrics.jsonl``)."""
    fig, axis = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for label, run_dir in run_dirs.items():
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        evals = [r for r in records if r["kind"] == "eval"]
        axis.plot(_run_epochs(evals), [r[metric] for r in evals], marker="o", markersize=3, label=label)
    return _finish(fig, axis, path, title, METRIC_LABELS[metric])


def plot_styles(rows: list[dict[str, Any]], metric: str, path: Path, title: str) -> Path:
    """Bar chart of a model's ``metric`` per style (rows of :func:`kdkit.api.evaluate_styles`)."""
    fig, axis = plt.subplots(figsize=(max(5.0, 0.9 * len(rows)), 3.6), dpi=110)
    values = [r[metric] for r in rows]
    bars = axis.bar([r["style"] for r in rows], values, color="#55a868")
    return _finish_bars(fig, axis, bars, values, path, title, METRIC_LABELS[metric])


def plot_style_comparison(
    series: dict[str, list[float]], styles: list[str], metric: str, path: Path, title: str
) -> Path:
    """Grouped bars: each run's ``metric`` per style (the style demo's plot)."""
    fig, axis = plt.subplots(figsize=(max(6.4, 1.1 * len(styles)), 3.8), dpi=110)
    width = 0.8 / len(series)
    for k, (label, values) in enumerate(series.items()):
        positions = [i + (k - (len(series) - 1) / 2) * width for i in range(len(styles))]
        axis.bar(positions, values, width, label=label)
    axis.set_xticks(range(len(styles)), styles)
    axis.set_ylabel(METRIC_LABELS[metric])
    axis.set_title(title)
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
