"""``kdkit demo --task detection``: embedded road scenes with boxes -> compact FCOS teacher -> students.

Rows: the teacher, the compact student alone, feature imitation on the FPN levels (mimic), PKD, and
the patent's style-augmented distillation (claim 14: mimic on x and on a styled copy x' that keeps
x's boxes), all learning the `target` city's day images and evaluated on its test split with COCO mAP
(and per style for the style row). The runs are the presets in ``configs/demo_detection/``; FGD, KD +
mimic, SoKD and TST have presets there too and run in ``benchmarks/demo_detection.py`` (the demo keeps
to five runs so that it takes under 15 minutes with its teacher cached).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from ..api import evaluate_styles, train_from_config
from ..config import load_config
from ..report.compare import compare_runs, comparison_table
from ..report.plots import plot_comparison, plot_curves
from ..report.runreport import markdown_table
from .common import data_sizes, model_costs, prepare_teacher, preset, teacher_warning, write_report

ROWS = {
    "student": "student alone (compact FCOS x0.35)",
    "mimic": "mimic (FPN feature imitation)",
    "pkd": "PKD",
    "mimic-style": "mimic + style (patent)",
}
STYLES = ("day", "night", "fog")
QUICK = ["data.params.train_size=48", "data.params.test_size=24", "data.eval_batch_size=24"]
QUICK_RUN = {
    "teacher": ["data.params.train_size=96", "stages.0.epochs=2", "stages.0.eval_every=2"],
    "single": ["stages.0.epochs=1", "stages.0.eval_every=1"],
}
QUICK_NOTE = [
    "",
    "`--quick` checks the whole pipeline in a few minutes; its runs are far too short to learn the",
    "scenes (mAP near 0). `kdkit demo --task detection` gives the comparison.",
]


def run_detection_demo(out: Path, quick: bool = False, seed: int = 0, overrides: Sequence[str] = ()) -> Path:
    """Run the detection demo into ``out``; returns the path of its ``report.md``."""
    console = Console()
    shared = [*(QUICK if quick else []), *overrides]
    teacher_overrides = [*shared, *(QUICK_RUN["teacher"] if quick else [])]
    teacher_dir, copied, warning = prepare_teacher(
        out, teacher_overrides, console, "demo_detection/teacher.yaml", quick
    )
    run_dirs = {"teacher": copied}
    for key, label in ROWS.items():
        path = preset(f"demo_detection/{key.replace('-', '_')}.yaml")
        run_overrides = [
            *shared,
            *(QUICK_RUN["single"] if quick else []),
            f"runtime.seed={seed}",
            f"runtime.out_dir={out}",
            f"name={key}-seed{seed}",
        ]
        if key != "student":  # every other row distils from the demo teacher
            run_overrides.append(f"teacher.weights={teacher_dir / 'student.safetensors'}")
        console.print(f"{label}: training")
        run_dirs[key] = out / f"{key}-seed{seed}"
        train_from_config(load_config(path, run_overrides), run_dir=run_dirs[key], overwrite=True)
    styles = {}
    for key in ("mimic", "mimic-style"):
        result = evaluate_styles(run_dirs[key], list(STYLES))
        styles[key] = {row["style"]: row[result["metric"]] for row in result["rows"]}
    return write_detection_report(out, run_dirs, styles, quick, warning)


def write_detection_report(
    out: Path,
    run_dirs: dict[str, Path],
    styles: dict[str, dict[str, float]],
    quick: bool,
    warning: str | None = None,
) -> Path:
    labels = {"teacher": "teacher (compact FCOS x1)", **ROWS}
    rows = compare_runs(list(run_dirs.values()))
    for row, key in zip(rows, run_dirs):
        row["label"] = labels[key]
    by_key = dict(zip(run_dirs, rows))
    plot_comparison(rows, out / "comparison.png", "detection demo: best mAP on the target test split")
    plot_curves(
        {labels[k]: d for k, d in run_dirs.items() if k != "teacher"},
        out / "curves.png",
        "target test mAP during training",
        metric="map",
    )
    alone = by_key["student"]["best_map_mean"]
    gains = [
        f"- {labels[k]}: {by_key[k]['best_map_mean'] - alone:+.2f} mAP points over the student alone"
        for k in run_dirs
        if k != "student"
    ]
    style_rows = [[labels[k], *(f"{v[s]:.2f}" for s in STYLES)] for k, v in styles.items()]
    teacher_train, _ = data_sizes(run_dirs["teacher"])
    train_size, test_size = data_sizes(run_dirs["student"])
    text = [
        "# kdkit detection demo" + (" (quick)" if quick else ""),
        "",
        "Embedded road scenes with boxes (`road_boxes`: car, person, traffic sign at 128x256, `target`",
        f"city, day). The teacher learned from {teacher_train} labelled images; every student learns from",
        f"{train_size} and is evaluated on {test_size} test images (COCO mAP over IoU 0.50:0.95).",
        "",
        *teacher_warning(warning),
        comparison_table(rows),
        "",
        *([] if warning else gains),
        "",
        "mAP (%) of the last student on the test split rendered in each style (`kdkit eval --styles`; the",
        "styled row saw night / fog / snow copies of its day images, with the day images' boxes):",
        "",
        markdown_table(["run", *STYLES], style_rows),
        *(QUICK_NOTE if quick else []),
        "",
        model_costs(run_dirs),
        "",
        "![comparison](comparison.png)",
        "",
        "![curves](curves.png)",
        "",
        f"![detections]({run_dirs['mimic'].name}/detections.png)",
    ]
    return write_report(out, text, run_dirs)
