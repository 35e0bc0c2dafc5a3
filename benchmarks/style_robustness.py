"""Does style-augmented distillation (patent US 2025/0265822) make a student robust to styles it never
saw with labels? `kdkit demo --style` for classification and segmentation over 3 seeds: the metric of
plain KD and of KD + style on the test set rendered in each style, mean ± std, as measured.
Writes benchmarks/results/style_robustness.md.
Run:  python benchmarks/style_robustness.py [--quick] [--seeds 0 1 2] [--tasks classification segmentation]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from _results import RESULTS, write_table

from kdkit.demos.common import data_sizes
from kdkit.demos.style import DEMOS, STYLES, run_style_demo, style_results
from kdkit.report.runreport import markdown_table


def _pm(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {std:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=["classification", "segmentation"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=Path, default=Path("runs/style-robustness"))
    parser.add_argument("--out", type=Path, default=RESULTS / "style_robustness.md")
    args = parser.parse_args()
    lines = [f"# Style robustness over seeds {args.seeds}" + (" (--quick)" if args.quick else ""), ""]
    for task in args.tasks:
        out = args.runs / task
        runs = DEMOS[task].runs
        for seed in args.seeds:  # a seed whose runs were all evaluated already is kept (resumable)
            if not all((out / f"{k}-seed{seed}" / "styles.json").is_file() for k in runs):
                run_style_demo(out, task=task, quick=args.quick, seed=seed)
        results = {k: [style_results(out / f"{k}-seed{s}") for s in args.seeds] for k in runs}
        metric = "top-1 (%)" if task == "classification" else "mIoU (%)"
        rows = []
        for style in STYLES:
            gains = [b[style] - a[style] for a, b in zip(results["kd"], results["kd-style"])]
            rows.append([style, *[_pm([r[style] for r in results[k]]) for k in runs], _pm(gains)])
        unseen = [s for s in STYLES if s != "day"]
        mean_gain = statistics.fmean(
            b[s] - a[s] for a, b in zip(results["kd"], results["kd-style"]) for s in unseen
        )
        train_size = data_sizes(out / f"kd-seed{args.seeds[0]}")[0]
        lines += [
            f"## {task}: {DEMOS[task].data.format(train_size=train_size)}",
            "",
            markdown_table(["style", *[f"{label} {metric}" for _, label in runs.values()], "gain"], rows),
            "",
            f"Mean gain of KD + style over plain KD on the {len(unseen)} styles not seen with labels: "
            f"{mean_gain:+.2f} points.",
            "",
        ]
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
