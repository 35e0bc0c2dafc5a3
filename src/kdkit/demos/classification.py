"""``kdkit demo``: embedded data -> teacher -> student alone, KD, DKD -> one report.

The runs are the presets in ``configs/demo/`` (packaged with kdkit); the teacher is cached
(:mod:`kdkit.demos.common`). ``--quick`` shrinks the data and the schedules to fit in about two minutes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from ..api import train_from_config
from ..config import load_config
from ..report.compare import compare_runs, comparison_table
from ..report.plots import plot_comparison, plot_curves
from .common import data_sizes, prepare_teacher, preset, teacher_warning, write_report

STUDENTS = ("student", "kd", "dkd")
LABELS = {"teacher": "teacher (ResNet-20)", "student": "student alone (ResNet-8)", "kd": "KD", "dkd": "DKD"}
QUICK = [
    "data.params.train_size=2000",
    "data.params.test_size=1000",
    "stages.0.epochs=6",
    "stages.0.eval_every=2",
]
QUICK_TEACHER = ["stages.0.epochs=10"]
QUICK_DKD = ["terms.1.warmup_epochs=1"]
QUICK_NOTE = [
    "",
    "`--quick` only checks the whole pipeline; its runs are too short to learn this dataset (accuracies",
    "stay near chance). `kdkit demo` gives the comparison.",
]


def run_demo(out: Path, quick: bool = False, seed: int = 0, overrides: Sequence[str] = ()) -> Path:
    """Run the whole demo into ``out``; returns the path of its ``report.md``.

    ``overrides`` (``--set`` assignments) apply to every run, the teacher's included.
    """
    console = Console()
    shared = [*(QUICK if quick else []), *overrides]
    teacher_dir, copied, warning = prepare_teacher(
        out, [*shared, *(QUICK_TEACHER if quick else [])], console, "demo/teacher.yaml", quick
    )
    run_dirs = {"teacher": copied}
    for name in STUDENTS:
        overrides = [
            *shared,
            f"runtime.seed={seed}",
            f"runtime.out_dir={out}",
            f"name={name}-seed{seed}",
        ]
        if name != "student":
            overrides.append(f"teacher.weights={teacher_dir / 'student.safetensors'}")
        if quick and name == "dkd":
            overrides += QUICK_DKD
        console.print(f"{LABELS[name]}: training")
        run_dirs[name] = out / f"{name}-seed{seed}"
        train_from_config(
            load_config(preset(f"demo/{name}.yaml"), overrides), run_dir=run_dirs[name], overwrite=True
        )
    return write_demo_report(out, run_dirs, quick, warning)


def write_demo_report(out: Path, run_dirs: dict[str, Path], quick: bool, warning: str | None = None) -> Path:
    rows = compare_runs(list(run_dirs.values()))
    for row, key in zip(rows, run_dirs):
        row["label"] = LABELS[key]
    by_key = dict(zip(run_dirs, rows))
    alone = by_key["student"]["best_top1_mean"]
    gains = [
        f"- {LABELS[k]}: {by_key[k]['best_top1_mean'] - alone:+.2f} points top-1 over the student alone"
        for k in ("teacher", "kd", "dkd")
    ]
    plot_comparison(rows, out / "comparison.png", "kdkit demo: best top-1 on the embedded test split")
    plot_curves({LABELS[k]: d for k, d in run_dirs.items()}, out / "curves.png", "test top-1 during training")
    train_size, test_size = data_sizes(run_dirs["student"])
    epochs = {k: load_config(d / "config.yaml").stages[0].epochs for k, d in run_dirs.items()}
    text = [
        "# kdkit demo" + (" (quick)" if quick else ""),
        "",
        f"Embedded dataset (procedural shapes and textures, day style, {train_size} training and {test_size}",
        f"test images); teacher ResNet-20 trained from labels ({epochs['teacher']} epochs), student ResNet-8",
        f"({epochs['student']} epochs) trained alone, with KD (Hinton et al. 2015) and with DKD (Zhao et al.",
        "2022).",
        "",
        *teacher_warning(warning),
        comparison_table(rows),
        "",
        *([] if warning else gains),
        *(QUICK_NOTE if quick else []),
        "",
        "![comparison](comparison.png)",
        "",
        "![curves](curves.png)",
    ]
    return write_report(out, text, run_dirs)
