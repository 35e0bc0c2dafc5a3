"""``kdkit demo --task segmentation``: embedded road scenes -> teacher -> compact students.

Rows: the teacher (trained on the `source` city), the compact student alone, CWD, I2CKD, Spirit
Distillation's student trained alone, Spirit Distillation (SD) and Enhanced Spirit Distillation (ESD)
at several ratios r, all learning the `target` city from 128 labelled images and evaluated on its
test split: mIoU, per-image mIoU variance, HP-Acc, and the histogram of per-image mIoU (Spirit
Distillation Fig. 5). The runs are the presets in ``configs/demo_segmentation/``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from ..api import train_from_config
from ..config import _read_yaml, load_config
from ..report.compare import compare_runs, comparison_table
from ..report.histogram import plot_miou_histogram
from ..report.plots import plot_comparison, plot_curves
from .common import (
    data_sizes,
    model_costs,
    prepare_teacher,
    preset,
    teacher_warning,
    write_report,
)

ESD_RATIOS = (1.0, 0.5, 0.0)


@dataclass(frozen=True)
class Row:
    key: str
    preset: str
    label: str
    overrides: tuple[str, ...] = ()


ROWS = (
    Row("student", "student", "student alone (mini DeepLabV3 x0.3)"),
    Row("cwd", "cwd", "CWD"),
    Row("i2ckd", "i2ckd", "I2CKD"),
    Row("spirit-student", "spirit_student", "Spirit student alone (S)"),
    Row("sd", "sd", "SD"),
    *(Row(f"esd-r{r:g}", "esd", f"ESD r={r:g}", (f"stages.0.data.mix.ratio={r}",)) for r in ESD_RATIOS),
)
QUICK = [
    "data.params.train_size=32",
    "data.params.test_size=60",
    "data.batch_size=8",
]
QUICK_RUN = {  # per preset: shorter stages
    "teacher": ["data.params.train_size=200", "stages.0.epochs=2", "stages.0.eval_every=2"],
    "single": ["stages.0.epochs=3", "stages.0.eval_every=3"],
    "spirit": [
        "stages.0.steps=8",
        "stages.0.eval_every=8",
        "stages.1.epochs=2",
        "stages.1.eval_every=2",
        "stages.2.epochs=1",
        "stages.2.eval_every=1",
    ],
    "esd": [
        "stages.0.data.params.train_size=32",
        "stages.0.data.params.test_size=60",
        "stages.0.data.batch_size=8",
        "stages.0.data.mix.params.train_size=64",
    ],
}
QUICK_NOTE = [
    "",
    "`--quick` checks the whole pipeline in a few minutes; its runs are far too short to learn the",
    "scenes. `kdkit demo --task segmentation` gives the comparison.",
]


def _quick_overrides(row: Row) -> list[str]:
    if row.preset in ("sd", "esd"):
        return [*QUICK_RUN["spirit"], *(QUICK_RUN["esd"] if row.preset == "esd" else [])]
    return QUICK_RUN["single"]


def run_segmentation_demo(
    out: Path, quick: bool = False, seed: int = 0, overrides: Sequence[str] = ()
) -> Path:
    """Run the segmentation demo into ``out``; returns the path of its ``report.md``."""
    console = Console()
    shared = [*(QUICK if quick else []), *overrides]
    teacher_dir, copied, warning = prepare_teacher(
        out,
        [*shared, *(QUICK_RUN["teacher"] if quick else [])],
        console,
        "demo_segmentation/teacher.yaml",
        quick,
    )
    run_dirs = {"teacher": copied}
    labels = {"teacher": "teacher (mini DeepLabV3)"}
    for row in ROWS:
        run_overrides = [
            *shared,
            *(_quick_overrides(row) if quick else []),
            *row.overrides,
            f"runtime.seed={seed}",
            f"runtime.out_dir={out}",
            f"name={row.key}-seed{seed}",
        ]
        path = preset(f"demo_segmentation/{row.preset}.yaml")
        if "teacher" in _read_yaml(path):
            run_overrides.append(f"teacher.weights={teacher_dir / 'student.safetensors'}")
        config = load_config(path, run_overrides)
        console.print(f"{row.label}: training")
        run_dirs[row.key] = out / f"{row.key}-seed{seed}"
        labels[row.key] = row.label
        train_from_config(config, run_dir=run_dirs[row.key], overwrite=True)
    return write_segmentation_report(out, run_dirs, labels, quick, warning)


def _final_image_miou(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    evals = [r for r in records if r["kind"] == "eval"]
    return [v for v in evals[-1]["image_miou"] if v is not None]


def write_segmentation_report(
    out: Path, run_dirs: dict[str, Path], labels: dict[str, str], quick: bool, warning: str | None = None
) -> Path:
    rows = compare_runs(list(run_dirs.values()))
    for row, key in zip(rows, run_dirs):
        row["label"] = labels[key]
    by_key = dict(zip(run_dirs, rows))
    plot_comparison(rows, out / "comparison.png", "segmentation demo: best mIoU on the target test split")
    plot_curves(
        {labels[k]: d for k, d in run_dirs.items() if k != "teacher"},
        out / "curves.png",
        "target test mIoU during training",
        metric="miou",
    )
    threshold = load_config(run_dirs["student"] / "config.yaml").evaluation.hp_threshold
    series = {labels[k]: _final_image_miou(run_dirs[k]) for k in ("spirit-student", "sd", "esd-r0.5")}
    plot_miou_histogram(series, out / "image_miou.png", threshold)
    alone = {"cwd": "student", "i2ckd": "student", "sd": "spirit-student"}
    alone.update({row.key: "spirit-student" for row in ROWS if row.preset == "esd"})
    gains = [
        f"- {labels[k]}: {by_key[k]['best_miou_mean'] - by_key[base]['best_miou_mean']:+.2f} mIoU points "
        f"over {labels[base]}"
        for k, base in alone.items()
    ]
    teacher_train, _ = data_sizes(run_dirs["teacher"])
    train_size, test_size = data_sizes(run_dirs["student"])
    text = [
        "# kdkit segmentation demo" + (" (quick)" if quick else ""),
        "",
        "Embedded road scenes (procedural, day style). The teacher learned the `source` city from",
        f"{teacher_train} labelled images; every student learns the `target` city from {train_size} labelled",
        f"images and is evaluated on {test_size} target test images. ESD adds unlabelled `proximity`-city",
        "images to Spirit Distillation's feature-imitation stage at ratio r (target : proximity).",
        "",
        *teacher_warning(warning),
        comparison_table(rows),
        "",
        "mIoU var is the population variance of per-image mIoU in units of 1e-3 and HP-Acc the share of",
        f"test images whose mIoU exceeds {threshold:g} (Spirit Distillation Eq. 6-8; the paper's 0.75 is",
        "for road vs background, and 10-class per-image mIoU sits lower), both at the last evaluation.",
        "",
        *([] if warning else gains),
        *(QUICK_NOTE if quick else []),
        "",
        model_costs(run_dirs),
        "",
        "![comparison](comparison.png)",
        "",
        "![per-image mIoU](image_miou.png)",
        "",
        "![curves](curves.png)",
    ]
    return write_report(out, text, run_dirs)
