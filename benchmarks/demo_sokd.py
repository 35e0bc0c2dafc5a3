"""SoKD (Shen et al. 2024) as a plug-in on the embedded classification demo, over 3 seeds, with the same
student budget (12 epochs of the demo's ResNet-8 from its cached ResNet-20 teacher):
FitNet, FitNet + SoKD, CRD, ReviewKD, ReviewKD + SoKD (`configs/demo/<method>.yaml`). Finished runs are
reused, so several processes can share the work (``--methods`` / ``--seeds``) and a last call with
everything finished only writes the table.

The extra cost of SoKD is the ratio of wall times of one-epoch runs of each SoKD preset and its base
method, alternated in this process (median of ``--repeats``) so that both see the same load: once in a
search epoch (DAFA updates before every student step) and once after the search (the policy only
sampled: ``update.epochs`` moved past the one-epoch run).
Writes benchmarks/results/demo_sokd.md.
Run:  python benchmarks/demo_sokd.py [--seeds 0 1 2] [--methods ...] [--no-train|--no-table] [--no-cost]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _results import RESULTS, finished_rows, grid_lines, seconds, train_grid, walls_line, write_table
from rich.console import Console

from kdkit.api import train_from_config
from kdkit.config import load_config
from kdkit.demos.common import prepare_teacher, preset

METHODS = {  # run name: (preset, label)
    "fitnet": ("demo/fitnet.yaml", "FitNet"),
    "fitnet_sokd": ("demo/fitnet_sokd.yaml", "FitNet + SoKD"),
    "crd": ("demo/crd.yaml", "CRD"),
    "reviewkd": ("demo/reviewkd.yaml", "ReviewKD"),
    "reviewkd_sokd": ("demo/reviewkd_sokd.yaml", "ReviewKD + SoKD"),
}
PAIRS = [("fitnet", "fitnet_sokd"), ("reviewkd", "reviewkd_sokd")]  # (base, SoKD)


def cost(
    base: str, sokd: str, teacher: list[str], runs: Path, repeats: int, search: bool
) -> tuple[float, list]:
    """Median wall time of a one-epoch SoKD run over a one-epoch run of its base, alternated."""
    times: dict[str, list[float]] = {base: [], sokd: []}
    one_epoch = [*teacher, "stages.0.epochs=1", "runtime.progress=false"]
    for r in range(repeats):
        for name in (base, sokd):
            extra = [] if search or name == base else ["refiners.0.update.epochs=[2]"]
            run = runs / f"cost-{name}-{'search' if search else 'after'}-{r}"
            start = time.perf_counter()
            config = load_config(preset(METHODS[name][0]), [*one_epoch, *extra])
            train_from_config(config, run_dir=run, overwrite=True)
            times[name].append(time.perf_counter() - start)
    return statistics.median(times[sokd]) / statistics.median(times[base]), [times[base], times[sokd]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-train", action="store_true", help="tabulate the runs that finished; train none")
    parser.add_argument("--no-cost", action="store_true", help="no cost runs")
    parser.add_argument("--no-table", action="store_true", help="train only")
    parser.add_argument("--runs", type=Path, default=Path("runs/demo-sokd"))
    parser.add_argument("--out", type=Path, default=RESULTS / "demo_sokd.md")
    args = parser.parse_args()
    teacher_dir, _, warning = prepare_teacher(args.runs, [], Console(), "demo/teacher.yaml", quick=False)
    teacher = [f"teacher.weights={teacher_dir / 'student.safetensors'}"]
    methods = {name: (preset(METHODS[name][0]), teacher) for name in args.methods}
    walls = {} if args.no_train else train_grid(methods, args.seeds, args.runs)
    if args.no_table:
        return
    labels = {n: m[1] for n, m in METHODS.items()}
    rows, done = finished_rows(args.methods, args.seeds, args.runs, labels)
    metric = rows[0]["metric"] if rows else "top1"
    best = {row["name"]: row[f"best_{metric}_mean"] for row in rows}
    title = f"# SoKD as a plug-in on the embedded classification demo, seeds {args.seeds}"
    lines = grid_lines(title, warning, rows, done, labels)
    for base, sokd in PAIRS:
        if base in best and sokd in best:
            lines.append(
                f"{METHODS[sokd][1]} minus {METHODS[base][1]} (best {metric}, mean over seeds): "
                f"{best[sokd] - best[base]:+.2f} points."
            )
    lines.append("")
    for base, sokd in [] if args.no_cost else PAIRS:
        for search in (True, False):
            ratio, times = cost(base, sokd, teacher, args.runs, args.repeats, search)
            when = "a search epoch (a DAFA update before every step)" if search else "an epoch after it"
            lines.append(
                f"- Cost, {when}: one epoch of {METHODS[sokd][1]} takes {ratio:.2f}x one epoch of "
                f"{METHODS[base][1]} (median of {args.repeats} alternated one-epoch runs; "
                f"{seconds(times[0])} vs {seconds(times[1])}; each includes start-up and one evaluation)."
            )
    lines += ["", walls_line(walls), ""] if walls else [""]
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
