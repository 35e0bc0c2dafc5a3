"""Size and CPU training speed of the compact detector pair (det_compact_teacher / det_compact_student).

Params, forward GFLOPs on 1x3x128x256 (``torch.utils.flop_counter``, multiply-add = 2) and training
throughput: forward + the detector's own losses + backward + an SGD step on batches of random
128x256 images with 4 random boxes each (3 classes), fp32, ``--threads`` intra-op threads. Two
throughputs: wall clock (what this machine gave, shared or not) and images per CPU-second of this
process times ``--threads`` (what as many free cores would give at perfect thread scaling; an
estimate that other processes on the cores disturb much less).
Writes benchmarks/results/det_compact_speed.md (with the student/teacher speed ratio of the same run).
Run:  python benchmarks/det_compact_speed.py [--batch 16] [--steps 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from _results import RESULTS, write_table
from torch.utils.flop_counter import FlopCounterMode

from kdkit.models import build_model

SIZE = (128, 256)


def random_targets(batch: int, boxes: int, generator: torch.Generator) -> torch.Tensor:
    h, w = SIZE
    xy = torch.rand(batch, boxes, 2, generator=generator) * torch.tensor([w - 64, h - 48])
    wh = 8 + torch.rand(batch, boxes, 2, generator=generator) * torch.tensor([56.0, 40.0])
    cls = torch.randint(0, 3, (batch, boxes, 1), generator=generator).float()
    return torch.cat([xy, xy + wh, cls], dim=-1)


def measure(name: str, batch: int, steps: int, threads: int) -> tuple[float, float, float, float]:
    torch.manual_seed(0)
    model = build_model(name, num_classes=3)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.randn(1, 3, *SIZE))
    gflops = counter.get_total_flops() / 1e9
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, *SIZE, generator=gen)
    targets = random_targets(batch, 4, gen)
    for step in range(steps + 2):  # two warm-up steps
        if step == 2:
            start, cpu = time.perf_counter(), time.process_time()
        loss = sum(model.losses(model(x), targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    images = batch * steps
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return params, gflops, images / wall, images / cpu * threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    free = f"images/s ({args.threads} free cores)"
    lines = [
        "# Compact detector pair: size and CPU training speed",
        "",
        f"`python benchmarks/det_compact_speed.py --batch {args.batch} --steps {args.steps} --threads "
        f"{args.threads}`: fp32, random 128x256 images with 4 boxes each, forward + losses + backward + SGD;",
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the start (shared cores).",
        "",
        f"| model | params (M) | GFLOPs @128x256 | train images/s (wall) | {free} |",
        "| --- | --- | --- | --- | --- |",
    ]
    speeds = {}
    for name in ("det_compact_teacher", "det_compact_student"):
        params, gflops, wall, cpu = measure(name, args.batch, args.steps, args.threads)
        speeds[name] = cpu
        lines.append(f"| {name} | {params:.3f} | {gflops:.3f} | {wall:.1f} | {cpu:.1f} |")
    ratio = speeds["det_compact_student"] / speeds["det_compact_teacher"]
    lines += ["", f"Student / teacher training speed (per CPU-second, same run): {ratio:.2f}x.", ""]
    write_table(RESULTS / "det_compact_speed.md", lines)


if __name__ == "__main__":
    main()
