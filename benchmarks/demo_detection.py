"""The detection demo's methods over seeds on the embedded road boxes (compact FCOS x1 teacher -> x0.35
student, 600 day images, 12 epochs, COCO mAP on 200 test images): the student alone, each KD term
(mimic, PKD, FGD, KD + mimic), the patent's style-augmented distillation (mAP per style), SoKD on
mimic, TST on KD + mimic. Runs land in ``runs/demo-detection/<name>-seed<seed>`` (the names of
``kdkit demo --task detection``, so its seed-0 runs are reused); finished runs are reused and a stopped
run resumes, so several processes can share the work (``--methods`` / ``--seeds``).
Writes benchmarks/results/demo_detection_seeds.md.
Run:  python benchmarks/demo_detection.py [--seeds 0 1 2] [--methods ...] [--no-train|--no-table]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from _results import RESULTS, finished_rows, grid_lines, train_grid, walls_line, write_table
from rich.console import Console

from kdkit.api import evaluate_styles
from kdkit.demos.common import prepare_teacher, preset
from kdkit.report.runreport import markdown_table

METHODS = {  # run name: (preset, label)
    "student": ("demo_detection/student.yaml", "student alone"),
    "mimic": ("demo_detection/mimic.yaml", "mimic"),
    "pkd": ("demo_detection/pkd.yaml", "PKD"),
    "fgd": ("demo_detection/fgd.yaml", "FGD"),
    "kd-mimic": ("demo_detection/kd_mimic.yaml", "KD + mimic"),
    "mimic-style": ("demo_detection/mimic_style.yaml", "mimic + style (patent)"),
    "mimic-sokd": ("demo_detection/mimic_sokd.yaml", "mimic + SoKD"),
    "kd-mimic-tst": ("demo_detection/kd_mimic_tst.yaml", "KD + mimic + TST"),
}
PAIRS = [("mimic", "mimic-style"), ("mimic", "mimic-sokd"), ("kd-mimic", "kd-mimic-tst")]  # (base, method)
STYLED = ("mimic", "mimic-style")
STYLES = ("day", "night", "fog")


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def style_table(runs: Path, done: dict[str, list[int]]) -> list[str]:
    """mAP per style of the style pair, mean ± std over their finished seeds."""
    rows = []
    for name in STYLED:
        if not done.get(name):
            continue
        per_style: dict[str, list[float]] = {s: [] for s in STYLES}
        for seed in done[name]:
            result = evaluate_styles(runs / f"{name}-seed{seed}", list(STYLES))
            for row in result["rows"]:
                per_style[row["style"]].append(row[result["metric"]])
        rows.append(
            [f"{METHODS[name][1]} ({len(done[name])} seeds)", *(mean_std(per_style[s]) for s in STYLES)]
        )
    return [markdown_table(["run", *(f"mAP {s}" for s in STYLES)], rows)] if rows else []


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--no-train", action="store_true", help="tabulate the runs that finished; train none")
    parser.add_argument("--no-table", action="store_true", help="train only")
    parser.add_argument("--runs", type=Path, default=Path("runs/demo-detection"))
    parser.add_argument("--out", type=Path, default=RESULTS / "demo_detection_seeds.md")
    args = parser.parse_args()
    teacher_dir, _, warning = prepare_teacher(
        args.runs, [], Console(), "demo_detection/teacher.yaml", quick=False
    )
    teacher = [f"teacher.weights={teacher_dir / 'student.safetensors'}"]
    methods = {n: (preset(METHODS[n][0]), [] if n == "student" else teacher) for n in args.methods}
    walls = {} if args.no_train else train_grid(methods, args.seeds, args.runs)
    if args.no_table:
        return
    labels = {n: m[1] for n, m in METHODS.items()}
    rows, done = finished_rows(args.methods, args.seeds, args.runs, labels)
    best = {row["name"]: row["best_map_mean"] for row in rows}
    title = f"# Detection demo methods over seeds {args.seeds} (compact FCOS, embedded road boxes)"
    lines = grid_lines(title, warning, rows, done, labels)
    if "student" in best:
        alone = best["student"]
        lines += [
            f"- {labels[n]}: {best[n] - alone:+.2f} mAP over the student alone"
            for n in best
            if n != "student"
        ]
    lines += [
        f"- {labels[m]} minus {labels[b]}: {best[m] - best[b]:+.2f} mAP"
        for b, m in PAIRS
        if b in best and m in best
    ]
    lines += ["", "mAP per style (the same test images and boxes rendered in each style):", ""]
    lines += style_table(args.runs, done)
    lines += ["", walls_line(walls), ""] if walls else [""]
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
