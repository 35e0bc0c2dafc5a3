"""TST (Shao et al. 2023) against KD on the embedded demo data, over 3 seeds, with the same student steps.

Classification: `configs/demo/kd.yaml` vs `configs/demo/tst.yaml` (the same terms; TST adds the `tst`
refiner, so its student steps see [x; x_hat]). Segmentation: `configs/demo_segmentation/pixel_kd.yaml`
vs `configs/demo_segmentation/tst.yaml`. Each uses the demo's cached teacher (trained once, as
`kdkit demo` does). Finished runs are reused. The extra cost of TST is measured separately as the ratio
of wall times of one-epoch KD and TST runs, alternated in this process (median of ``--repeats``), so
both see the same load; stage I (fitting the meta-encoders, once per image size, cached) is done before.
Writes benchmarks/results/demo_tst.md.
Run:  python benchmarks/demo_tst.py [--seeds 0 1 2] [--tasks classification segmentation]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _results import RESULTS, seconds, train_or_reuse, walls_line, write_table
from rich.console import Console

from kdkit.api import train_from_config
from kdkit.config import load_config
from kdkit.demos.common import prepare_teacher, preset
from kdkit.report.compare import compare_runs, comparison_table

TASKS = {  # task: (teacher preset, baseline preset, TST preset, label of the baseline)
    "classification": ("demo/teacher.yaml", "demo/kd.yaml", "demo/tst.yaml", "KD"),
    "segmentation": (
        "demo_segmentation/teacher.yaml",
        "demo_segmentation/pixel_kd.yaml",
        "demo_segmentation/tst.yaml",
        "pixel KD",
    ),
}


def cost_ratio(baseline: Path, tst: Path, teacher: list[str], runs: Path, repeats: int) -> tuple[float, list]:
    """Median wall time of a one-epoch TST run over a one-epoch baseline run, alternated."""
    times: dict[str, list[float]] = {"base": [], "tst": []}
    one_epoch = [*teacher, "stages.0.epochs=1", "runtime.progress=false"]
    for r in range(repeats):
        for key, path in (("base", baseline), ("tst", tst)):
            run = runs / f"cost-{key}-{r}"
            start = time.perf_counter()
            train_from_config(load_config(path, one_epoch), run_dir=run, overwrite=True)
            times[key].append(time.perf_counter() - start)
    ratio = statistics.median(times["tst"]) / statistics.median(times["base"])
    return ratio, [times["base"], times["tst"]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--runs", type=Path, default=Path("runs/demo-tst"))
    parser.add_argument("--out", type=Path, default=RESULTS / "demo_tst.md")
    args = parser.parse_args()
    console = Console()
    lines = [f"# TST vs its baseline on the embedded demo data, seeds {args.seeds}", ""]
    for task in args.tasks:
        teacher_preset, base_preset, tst_preset, label = TASKS[task]
        runs = args.runs / task
        teacher_dir, _, warning = prepare_teacher(runs, [], console, teacher_preset, quick=False)
        teacher = [f"teacher.weights={teacher_dir / 'student.safetensors'}"]
        walls = {}
        for seed in args.seeds:
            for name, path in (("base", base_preset), ("tst", tst_preset)):
                overrides = [*teacher, f"runtime.seed={seed}", "runtime.progress=false"]
                walls[(name, seed)] = train_or_reuse(preset(path), runs / f"{name}-seed{seed}", overrides)
        rows = compare_runs([runs / f"{n}-seed{s}" for n in ("base", "tst") for s in args.seeds])
        rows[0]["label"], rows[1]["label"] = label, "TST"
        metric = rows[0]["metric"]
        gain = rows[1][f"best_{metric}_mean"] - rows[0][f"best_{metric}_mean"]
        ratio, times = cost_ratio(preset(base_preset), preset(tst_preset), teacher, runs, args.repeats)
        lines += [
            f"## {task}",
            "",
            *([f"Teacher check: {warning}", ""] if warning else []),
            comparison_table(rows),
            "",
            f"TST minus {label} (best {metric}, mean over seeds): {gain:+.2f} points.",
            "",
            f"Cost: one epoch of TST takes {ratio:.2f}x the wall time of one epoch of {label} (median of "
            f"{args.repeats} alternated one-epoch runs; {label}: "
            f"{seconds(times[0])}; TST: {seconds(times[1])}; each includes start-up and one evaluation).",
            "",
            walls_line(walls),
            "",
        ]
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
