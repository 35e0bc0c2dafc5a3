"""Does style-augmented distillation steady the actuation signal when the style changes (patent [0043],
issue 13 item 6)? The segmentation students of `benchmarks/style_robustness.py` (plain KD and KD + style,
target-city day labels; runs/style-robustness/segmentation/{kd,kd-style}-seed<s>) drive the embedded test
drive (5 drives of 120 frames, day / night / day, pooled) and `drive_stability` measures how much the
signal jumps at the style changes relative to the other frames. Writes benchmarks/results/style_stability.md.
Run:  python benchmarks/style_robustness.py --tasks segmentation  (trains the runs, resumable), then
      python benchmarks/style_stability.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from _results import RESULTS, write_table

from kdkit.deploy.stability import drive_stability
from kdkit.report.runreport import markdown_table

RUNS = {"kd": "KD", "kd-style": "KD + style"}
COLUMNS = [
    ("jolt_speed", "jolt speed"),
    ("jump_speed", "jump speed"),
    ("step_speed", "step speed"),
    ("jolt_steer", "jolt steer"),
    ("jump_steer", "jump steer"),
    ("step_steer", "step steer"),
    ("mae_speed_day", "speed MAE day"),
    ("mae_speed_night", "speed MAE night"),
    ("mae_steer_day", "steer MAE day"),
    ("mae_steer_night", "steer MAE night"),
]


def _pm(values: list[float], digits: int) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", type=Path, default=Path("runs/style-robustness/segmentation"))
    parser.add_argument("--out", type=Path, default=RESULTS / "style_stability.md")
    args = parser.parse_args()
    figures = {
        kind: [drive_stability(args.runs / f"{kind}-seed{s}", args.runs / f"{kind}-seed{s}" / "stability")
               for s in args.seeds]
        for kind in RUNS
    }  # fmt: skip
    digits = {"jolt": 2, "jump": 3, "step": 3, "mae_": 3}
    rows = []
    for kind, label in RUNS.items():
        for seed, fig in zip(args.seeds, figures[kind]):
            rows.append([f"{label} seed {seed}", *[f"{fig[k]:.{digits[k[:4]]}f}" for k, _ in COLUMNS]])
        means = [_pm([f[k] for f in figures[kind]], digits[k[:4]]) for k, _ in COLUMNS]
        rows.append([f"**{label}**", *means])
    ref = figures["kd"][0]
    gain = [b["jolt"] - a["jolt"] for a, b in zip(figures["kd"], figures["kd-style"])]
    lines = [
        f"# Actuation stability under style change, plain KD vs style-augmented KD, seeds {args.seeds}",
        "",
        "Segmentation students of `benchmarks/style_robustness.py` (teacher mini DeepLabV3 from the",
        "source city, students mini DeepLabV3 x0.3 on 128 labelled day images of the target city; KD +",
        "style adds the patent's style-augmented copies). Each drives 5 embedded test drives (120 frames",
        "at 64x128, day / night / day, target city; 10 style changes pooled) with the road-corridor rule",
        "(target speed and steering offset); PyTorch fp32 on this CPU. `jolt` = mean |signal step| at",
        "the style changes (`jump`) / mean |signal step| elsewhere (`step`; 1 = a style change moves the",
        "controller no more than the road does); MAE against the same rule on the ground-truth masks.",
        "Speed in [0, 1] of the maximum, steering offset in [-1, 1].",
        "",
        markdown_table(["run", *[name for _, name in COLUMNS]], rows),
        "",
        f"Ground-truth signal on the same drives: jolt {ref['reference_jolt_speed']:.2f} (speed) / "
        f"{ref['reference_jolt_steer']:.2f} (steer).",
        f"Mean jolt (speed and steer averaged), KD + style minus KD, per seed: "
        f"{', '.join(f'{g:+.2f}' for g in gain)} (mean {statistics.fmean(gain):+.2f}).",
        "",
    ]
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
