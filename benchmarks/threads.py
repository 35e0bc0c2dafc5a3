"""Intra-op threads on a shared CPU (issue 8, item 12): 1 vs 2 threads, with and without competing load.

The demo's student step (ResNet-8, batch 128, 32x32, bf16 autocast, SGD) timed with 1 and 2 threads
back to back in one process, as the machine was found and with 1 and 2 extra busy processes (pure
Python loops) competing for the cores; also what kdkit's default (``runtime.threads: auto``) picks.
Writes benchmarks/results/threads.md.  Run:  python benchmarks/threads.py [--steps 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _results import RESULTS, write_table

from kdkit.engine.distributed import available_cpus, busy_cpus, default_threads
from kdkit.models import build_model


def make_step():
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=10)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def rate(step, threads: int, steps: int) -> float:
    """Images per second over ``steps`` steps with ``threads`` intra-op threads (after 2 warm-up steps)."""
    torch.set_num_threads(threads)
    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return 128 * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="1-thread/2-thread pairs per condition")
    parser.add_argument("--out", default=str(RESULTS / "threads.md"))
    args = parser.parse_args()
    os.environ.pop("OMP_NUM_THREADS", None)  # default_threads() below: the load-based choice
    torch.set_flush_denormal(True)
    step = make_step()
    rows = []
    for extra in (0, 1, 2):
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(extra)]
        try:
            time.sleep(1.0 if extra else 0.0)
            busy = busy_cpus(1.0)
            auto = default_threads()
            rates: dict[int, list[float]] = {1: [], 2: []}
            for _ in range(args.repeats):
                for threads in (1, 2):
                    rates[threads].append(rate(step, threads, args.steps))
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
        rows.append((extra, busy, auto, rates))
        print(extra, f"{busy:.2f}", auto, {k: [round(v) for v in r] for k, r in rates.items()}, flush=True)

    def cell(values: list[float]) -> str:
        return f"{sorted(values)[len(values) // 2]:.0f} ({min(values):.0f}-{max(values):.0f})"

    lines = [
        "# Intra-op threads on a shared CPU",
        "",
        f"`python benchmarks/threads.py --steps {args.steps} --repeats {args.repeats}`: torch "
        f"{torch.__version__}, {available_cpus()} CPUs available, {os.cpu_count()} on the machine. "
        "ResNet-8 training step (the demo's student), batch 128, 32x32, bf16 autocast, SGD; "
        f"{args.steps} timed steps per figure, 1 and 2 threads alternating back to back, "
        f"{args.repeats} pairs per condition; images/s, median (min-max). 'Busy cores' is other work's "
        "CPU use measured just before (the machine is shared: it is not idle even without extra load).",
        "",
        "| extra busy processes | busy cores before | `threads: auto` picks | 1 thread | 2 threads "
        "| 2 threads / 1 thread |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for extra, busy, auto, rates in rows:
        med = {k: sorted(v)[len(v) // 2] for k, v in rates.items()}
        lines.append(
            f"| {extra} | {busy:.2f} | {auto} | {cell(rates[1])} | {cell(rates[2])} | {med[2] / med[1]:.2f} |"
        )
    lines.append("")
    write_table(Path(args.out), lines)


if __name__ == "__main__":
    main()
