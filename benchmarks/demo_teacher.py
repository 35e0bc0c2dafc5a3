"""Robustness of the `kdkit demo` teacher recipe: its top-1 over training seeds and CPU thread counts.

bf16 reductions differ with the number of threads, so one recipe can follow different trajectories on
different machines. This trains the demo's teacher preset (``configs/demo/teacher.yaml``) once per
(seed, threads) pair, each in its own process with ``OMP_NUM_THREADS`` set, and reports the best and
last top-1, the epoch at which the training loss first fell below 90 % of chance (ln of the class
count: a late value means the run sat on the plateau), and mean ± std. Finished runs are kept and
reused (the benchmark resumes). The precision is the preset's (`auto`: bf16 where the CPU computes it
natively, else fp32) as the run recorded it. Writes benchmarks/results/demo_teacher.md.
Run:  python benchmarks/demo_teacher.py [--seeds 0 1 2] [--threads 1 2] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _results import RESULTS, write_table

from kdkit.config import load_config
from kdkit.demos.common import preset


def train(run: Path, seed: int, threads: int, overrides: list[str]) -> float:
    """Train the teacher preset into ``run`` (skipped when finished); returns the wall time (0 if reused)."""
    if (run / "summary.json").is_file():
        return 0.0
    sets = [f"runtime.seed={seed}", "runtime.progress=false", *overrides]
    command = [sys.executable, "-m", "kdkit", "train", str(preset("demo/teacher.yaml")), "--out", str(run)]
    command += [arg for item in sets for arg in ("--set", item)]
    if run.exists():
        command.append("--overwrite")  # an unfinished earlier attempt
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def plateau_epoch(run: Path, classes: int) -> float | None:
    """First epoch at which the logged training loss is below 90 % of chance (ln classes)."""
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train" and record["loss"] < 0.9 * math.log(classes):
            return record["epoch"]
    return None


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--runs", type=Path, default=Path("runs/demo-teacher"))
    parser.add_argument("--out", type=Path, default=RESULTS / "demo_teacher.md")
    args = parser.parse_args()
    rows, best, last = [], [], []
    for threads in args.threads:
        for seed in args.seeds:
            run = args.runs / f"seed{seed}-threads{threads}"
            wall = train(run, seed, threads, args.overrides)
            summary = json.loads((run / "summary.json").read_text())
            best.append(summary["best_top1"])
            last.append(summary["last_top1"])
            left = plateau_epoch(run, 10)
            precision = load_config(run / "config.yaml").runtime.precision
            rows.append(
                f"| {seed} | {threads} | {precision} | {summary['best_top1']:.2f} | "
                f"{summary['last_top1']:.2f} | "
                f"{'never' if left is None else f'{left:.2f}'} | {f'{wall:.0f} s' if wall else 'reused'} |"
            )
            print(rows[-1], flush=True)
    extra = " with " + ", ".join(args.overrides) if args.overrides else ""
    lines = [
        "# `kdkit demo` teacher (ResNet-20) over seeds and thread counts",
        "",
        f"Preset `configs/demo/teacher.yaml`{extra}; "
        "each run in its own process with `OMP_NUM_THREADS` = threads.",
        "",
        "| seed | threads | precision | best top-1 (%) | last top-1 (%) | epoch loss < 0.9 ln 10 "
        "| wall time |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Best top-1 {mean_std(best)} (min {min(best):.2f}), last top-1 {mean_std(last)} "
        f"(min {min(last):.2f}) over {len(best)} runs.",
        "",
    ]
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
