"""``report.md`` of one run: what was trained, how it ended, where the plots are."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from ..data.mixup import Mixup
from ..engine.checkpoint import atomic_write_text
from ..engine.summary import EXTRAS
from ..engine.tasks import METRIC_LABELS


def _exported(role: str, model: str) -> str:
    """What ``student.safetensors`` is, by the trained network's role."""
    if role == "student":
        return "the exported student, without teacher or connectors"
    return (
        "the network this run trained from labels alone: every run exports its network under this name, "
        f"and a later run can use it as its teacher, `teacher: {{name: {model}, weights: "
        "<this folder>/student.safetensors}`"
    )


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


ENGINE_KEYS = ("name", "stages", "optimizer", "schedule", "update")


def _describe_refiner(refiner: dict[str, Any]) -> str:
    """``style (method fourier, alpha 1.0; aspects: weather)`` or ``tst (num_ops 4, ...; learns with
    adamw lr 0.01, every 8 steps x 1)``: the refiner's arguments, and how a learnable one updates."""
    details = [
        f"{k} {', '.join(str(d.get('name', d)) for d in v) if k == 'sources' else v}"
        for k, v in refiner.items()
        if k not in ENGINE_KEYS and k != "aspects"
    ]
    aspects = f"; aspects: {', '.join(refiner['aspects'])}" if refiner.get("aspects") else ""
    learns = ""
    if refiner.get("optimizer"):
        update = refiner.get("update") or {}
        epochs = f" in epochs {update['epochs']}" if update.get("epochs") else ""
        learns = (
            f"; learns with {refiner['optimizer']['name']} lr {refiner['optimizer']['lr']}, "
            f"{update.get('iterations', 1)} update(s) every {update.get('every', 1)} step(s){epochs}"
        )
    inner = f"{', '.join(details)}{aspects}{learns}".removeprefix("; ")
    return f"{refiner['name']} ({inner})" if inner else refiner["name"]


def describe_augment(augment: dict[str, Any], task: str = "classification") -> str:
    """The training augmentation of a resolved ``data.augment`` in words, e.g. ``random crop (zero
    padding 4) + horizontal flip``; ``none`` when nothing is random."""
    parts = []
    if task in ("segmentation", "detection"):
        padded = "mask padded with 255" if task == "segmentation" else "boxes moved, those leaving it dropped"
        low, high = augment.get("scale", (1.0, 1.0))
        if (low, high) != (1.0, 1.0):
            parts.append(f"random rescale {low:g}-{high:g}")
        if augment.get("crop"):
            parts.append(f"random crop {augment['crop'][0]}x{augment['crop'][1]} ({padded})")
        elif (low, high) != (1.0, 1.0):
            parts.append(f"random crop to the image size ({padded})")
    elif augment.get("resized_crop"):
        rc = augment["resized_crop"]
        low, high = rc.get("scale", (0.08, 1.0))
        parts.append(f"random-resized crop {rc['size']} (area {low:g}-{high:g}, per image at decode)")
    elif augment.get("crop_padding", 0) > 0:
        parts.append(f"random crop (zero padding {augment['crop_padding']})")
    if augment.get("flip", False):
        parts.append("horizontal flip")
    if augment.get("color_jitter"):
        parts.append("colour jitter {:g}/{:g}/{:g}".format(*augment["color_jitter"]))
    if augment.get("randaugment"):
        parts.append("RandAugment ({} ops, magnitude {})".format(*augment["randaugment"]))
    if augment.get("mixup"):
        parts.append(Mixup(0, **augment["mixup"]).describe())
    return " + ".join(parts) or "none"


def _describe_augmentation(config: dict[str, Any]) -> str:
    """One description, or one per stage when stages override the data with other augmentation."""
    task = config.get("task", "classification")
    run_data = config.get("data") or {}
    per_stage = []
    for i, stage in enumerate(config.get("stages", [])):
        augment = (stage.get("data") or run_data).get("augment") or {}
        per_stage.append((stage.get("name", f"stage {i}"), describe_augment(augment, task)))
    if not per_stage:
        return describe_augment(run_data.get("augment") or {}, task)
    if len({text for _, text in per_stage}) == 1:
        return per_stage[0][1]
    return "; ".join(f"{name}: {text}" for name, text in per_stage)


def network_role(config: dict[str, Any]) -> str:
    """``student`` when the run distils from a teacher, ``network`` when it learns from labels alone."""
    return "student" if config.get("teacher") else "network"


def write_run_report(
    run_dir: Path,
    summary: dict[str, Any],
    history: list[dict[str, Any]],
    plots: list[Path],
    role: str | None = None,
    notes: list[str] | None = None,
) -> Path:
    """``report.md`` of a run. Every link in it is relative to ``run_dir`` (the plots sit beside it),
    so a copied run directory keeps a working report. ``role`` labels the trained network (default:
    :func:`network_role` of the saved config); ``notes`` (markdown lines, e.g. a searched refiner
    policy) go under the results table."""
    config = (
        yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
    )
    role = role or network_role(config)
    teacher = config.get("teacher") or {}
    model = (config.get("student") or {}).get("name", "?")
    metric = summary.get("metric", "top1")
    extras = {k: v for k, v in EXTRAS.get(metric, {}).items() if f"last_{k}" in summary}
    rows = []
    if f"teacher_{metric}" in summary:
        rows.append(["teacher", teacher.get("name", "?"), f"{summary[f'teacher_{metric}']:.2f}", ""])
        rows[-1] += [""] * len(extras)
    if f"best_{metric}" in summary:
        rows.append(
            [
                role,
                model,
                f"{summary[f'best_{metric}']:.2f} (epoch {summary['best_epoch']:.0f})",
                f"{summary[f'last_{metric}']:.2f}",
                *[f"{summary[f'last_{key}']:.2f}" for key in extras],
            ]
        )
    label = METRIC_LABELS[metric]
    header = ["role", "network", f"best {label}", f"last {label}", *[f"last {v}" for v in extras.values()]]
    train = [r for r in history if r["kind"] == "train"]
    speed = sum(r["images_per_s"] for r in train) / len(train) if train else 0.0
    text = [
        f"# Run `{summary.get('name', run_dir.name)}`",
        "",
        f"- data: `{config.get('data', {}).get('name', '?')}`; teacher: `{teacher.get('name', 'none')}`; "
        f"{role}: `{model}`",
        f"- stages: {_describe_terms(config)}",
        f"- training augmentation: {_describe_augmentation(config)}",
        *[f"- refiner: {_describe_refiner(r)}" for r in config.get("refiners", [])],
        *[f"- stage '{r['stage']}': {r['text']}" for r in history if r["kind"] == "teacher_cache"],
        f"- mean training throughput: {speed:.0f} images/s",
        "",
        markdown_table(header, rows),
        "",
        *([*notes, ""] if notes else []),
        *[f"![{p.stem}]({Path(os.path.relpath(p, run_dir)).as_posix()})" for p in plots],
        "",
        "Files: `config.yaml` (resolved config), `metrics.jsonl`, `checkpoints/last.pt`, "
        f"`student.safetensors` + `student.json` ({_exported(role, model)}).",
        "",
    ]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(text))
    return path
