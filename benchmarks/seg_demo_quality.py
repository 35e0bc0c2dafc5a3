"""Quality of `kdkit demo --task segmentation` over 3 seeds: mIoU, per-image mIoU variance and HP-Acc
of every row (teacher, student alone, CWD, I2CKD, Spirit student alone, SD, ESD at each r), mean ± std.

The teacher is trained once (cached); the student runs repeat for seeds 0, 1, 2. Every figure is
reported as measured, including rows that do not beat their baseline. Writes
benchmarks/results/seg_demo_quality.md.
Run:  python benchmarks/seg_demo_quality.py [--quick] [--seeds 0 1 2]
"""

from __future__ import annotations

from _results import quality_args, run_seeds, write_table

from kdkit.demos.segmentation import ROWS, run_segmentation_demo
from kdkit.report.compare import compare_runs, comparison_table


def main() -> None:
    args = quality_args("runs/seg-demo-quality", "seg_demo_quality.md")
    wall = run_seeds(run_segmentation_demo, args)
    groups = [sorted(args.runs / f"{row.key}-seed{s}" for s in args.seeds) for row in ROWS]
    rows = compare_runs([args.runs / "teacher", *(d for group in groups for d in group)])
    for row, label in zip(rows, ["teacher (mini DeepLabV3, trained once)", *(r.label for r in ROWS)]):
        row["label"] = label
    lines = [
        f"# `kdkit demo --task segmentation{' --quick' if args.quick else ''}` over seeds {args.seeds}",
        "",
        "Target-city test split (300 images). mIoU var: population variance of per-image mIoU in units",
        "of 1e-3; HP-Acc: share of images with mIoU > 0.4 (Spirit Distillation Eq. 6-8 with the demo's",
        "threshold, configs/demo_segmentation/base.yaml), at the last evaluation.",
        "",
        comparison_table(rows),
        "",
        *wall,
    ]
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
