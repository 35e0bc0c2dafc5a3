"""``kdkit demo --style``: does style-augmented distillation make a student robust to unseen styles?

Teacher and students learn from day images only (the teacher of ``kdkit demo``, or of ``kdkit demo
--task segmentation``). One student is distilled with plain KD, one with style-augmented KD (the
patent's method: a Fourier-styled copy x' of every image, styles from a handful of unlabelled night,
fog and snow images of other scenes). Both are then evaluated on the same test set rendered in every
style; the report gives the metric per style and the gain of the styled run. The runs are the presets
in ``configs/demo_style/``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from ..api import evaluate_styles, train_from_config
from ..config import _read_yaml, load_config
from ..engine.tasks import METRIC_LABELS
from ..report.plots import plot_style_comparison
from ..report.runreport import markdown_table
from . import classification, segmentation
from .common import (
    _link,
    data_sizes,
    prepare_teacher,
    preset,
    teacher_warning,
    write_report,
)

STYLES = ("day", "dusk", "night", "fog", "rain", "snow")
QUICK_NOTE = [
    "",
    "`--quick` only checks the pipeline: its runs are far too short for the figures to mean anything.",
]


@dataclass(frozen=True)
class StyleDemo:
    teacher: str  # teacher preset
    runs: dict[str, tuple[str, str]]  # key -> (preset, label)
    quick_shared: tuple[str, ...]
    quick_teacher: tuple[str, ...]
    quick_run: tuple[str, ...]
    data: str  # what the students learn from, for the report ({train_size} is filled in)


DEMOS = {
    "classification": StyleDemo(
        "demo/teacher.yaml",
        {"kd": ("demo_style/kd.yaml", "KD"), "kd-style": ("demo_style/kd_style.yaml", "KD + style")},
        tuple(classification.QUICK),
        tuple(classification.QUICK_TEACHER),
        (),
        "embedded shapes (day, {train_size} training images); teacher ResNet-20, students ResNet-8",
    ),
    "segmentation": StyleDemo(
        "demo_segmentation/teacher.yaml",
        {"kd": ("demo_style/seg_kd.yaml", "KD"), "kd-style": ("demo_style/seg_kd_style.yaml", "KD + style")},
        tuple(segmentation.QUICK),
        tuple(segmentation.QUICK_RUN["teacher"]),
        tuple(segmentation.QUICK_RUN["single"]),
        "road scenes of the target city (day, {train_size} labelled images); teacher mini DeepLabV3 "
        "trained on the source city (day), students mini DeepLabV3 x0.3",
    ),
}


def run_style_demo(
    out: Path, task: str = "classification", quick: bool = False, seed: int = 0, overrides: Sequence[str] = ()
) -> Path:
    """Run the style demo of ``task`` into ``out``; returns the path of its ``report.md``."""
    spec = DEMOS[task]
    console = Console()
    shared = [*(spec.quick_shared if quick else ()), *overrides]
    teacher_dir, _, warning = prepare_teacher(
        out, [*shared, *(spec.quick_teacher if quick else ())], console, spec.teacher, quick
    )
    run_dirs = {}
    for key, (path, label) in spec.runs.items():
        run_overrides = [
            *shared,
            *(spec.quick_run if quick else ()),
            f"runtime.seed={seed}",
            f"runtime.out_dir={out}",
            f"name={key}-seed{seed}",
        ]
        if "teacher" in _read_yaml(preset(path)):
            run_overrides.append(f"teacher.weights={teacher_dir / 'student.safetensors'}")
        console.print(f"{label}: training")
        run_dirs[key] = out / f"{key}-seed{seed}"
        train_from_config(load_config(preset(path), run_overrides), run_dir=run_dirs[key], overwrite=True)
        console.print(f"{label}: evaluating on {', '.join(STYLES)}")
        evaluate_styles(run_dirs[key], styles=STYLES)
    return write_style_report(out, task, run_dirs, quick, warning)


def style_results(run_dir: Path) -> dict[str, float]:
    """``{style: metric}`` that :func:`kdkit.api.evaluate_styles` stored in ``styles.json``."""
    report = json.loads((run_dir / "styles.json").read_text())
    return {row["style"]: row[report["metric"]] for row in report["rows"]}


def write_style_report(
    out: Path, task: str, run_dirs: dict[str, Path], quick: bool, warning: str | None = None
) -> Path:
    spec = DEMOS[task]
    metric = "top1" if task == "classification" else "miou"
    label = METRIC_LABELS[metric]
    results = {key: style_results(d) for key, d in run_dirs.items()}
    names = {key: spec.runs[key][1] for key in run_dirs}
    rows = [
        [
            style,
            *[f"{results[k][style]:.2f}" for k in run_dirs],
            f"{results['kd-style'][style] - results['kd'][style]:+.2f}",
        ]
        for style in STYLES
    ]
    plot_style_comparison(
        {names[k]: [results[k][s] for s in STYLES] for k in run_dirs},
        list(STYLES),
        metric,
        out / "styles.png",
        f"{task}: {label} per style (trained on day only)",
    )
    unseen = [s for s in STYLES if s != "day"]
    gain = sum(results["kd-style"][s] - results["kd"][s] for s in unseen) / len(unseen)
    data = spec.data.format(train_size=data_sizes(run_dirs["kd"])[0])
    text = [
        f"# kdkit style demo, {task}" + (" (quick)" if quick else ""),
        "",
        f"Data: {data}. Every style of the test set shares the day test set's content and labels;",
        "only day was seen with labels. KD + style adds a Fourier-styled copy of every training image",
        "(styles of 24 unlabelled night/fog/snow images of other scenes, alpha ~ U(0.3, 1)).",
        "",
        *teacher_warning(warning),
        markdown_table(["style", *[f"{names[k]} {label}" for k in run_dirs], "style − plain"], rows),
        "",
        f"Mean gain of KD + style over plain KD on the styles not seen with labels: {gain:+.2f} points.",
        *(QUICK_NOTE if quick else []),
        "",
        "![per style](styles.png)",
        "",
        f"![style preview]({_link(out, run_dirs['kd-style'])}/style_preview.png)",
    ]
    return write_report(out, text, run_dirs)
