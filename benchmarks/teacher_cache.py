"""The teacher-output cache (issue 12): epoch-time ratios measured in one run, and the effect of top-k.

Timing, per pair (ResNet-20 -> ResNet-8, the demo's; ResNet-32x4 -> ResNet-8x4, the CIFAR-100 pair),
one epoch of 2,560 embedded 32x32 images in batches of 128, KD (0.1 CE + 0.9 KD, T 4), runtime
precision ``auto`` (bf16 on CPUs that have it): the student alone, KD with the live teacher (no cache),
KD filling an empty cache (cold), KD replaying it (warm). Epoch time = the training windows' wall time
(evaluation excluded). ``--rounds`` interleaved rounds, each with a fresh cache; ratios of the medians.
Goals: warm KD within 1.15x of the student alone; cold within 1.1x of KD without a cache.

Top-k: the demo's KD run (cached demo teacher, 12 epochs on 10,000 images) with the full logits and
with top-k storage, best top-1 over ``--seeds`` (``--topk`` values; ``--no-topk`` skips it).
Writes benchmarks/results/teacher_cache.md (timing) and teacher_cache_topk.md (top-k).
Run:  python benchmarks/teacher_cache.py [--rounds 3] [--topk 1 3 5] [--seeds 0 1 2] [--no-topk] [--no-timing]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from _results import RESULTS, random_teacher, write_table

from kdkit.api import train_from_config
from kdkit.config import load_config
from kdkit.demos.common import cached_teacher, preset

PAIRS = {
    "ResNet-20 -> ResNet-8": ("resnet20", "resnet8"),
    "ResNet-32x4 -> ResNet-8x4": ("resnet32x4", "resnet8x4"),
}
MODES = ("student", "live", "cold", "warm")


def epoch_seconds(run_dir: Path, batch: int = 128) -> float:
    """Training wall time: the sum of each train record's window (images / images_per_s)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if r["kind"] == "train"]
    steps = [r["step"] for r in windows]
    images = [(b - a) * batch for a, b in zip([0, *steps[:-1]], steps)]
    return sum(n / r["images_per_s"] for n, r in zip(images, windows))


def timing_config(tmp: Path, teacher: str, student: str, weights: Path, mode: str, cache: Path, name: str):
    config = {
        "name": name,
        "data": {"name": "embedded", "params": {"train_size": 2560, "test_size": 128}, "batch_size": 128},
        "student": {"name": student},
        "terms": [{"name": "ce"}],
        "stages": [{"epochs": 1, "optimizer": {"lr": 0.05}}],
        "runtime": {
            "out_dir": str(tmp / "runs"),
            "progress": False,
            "precision": "auto",
            "log_every": 5,
            "teacher_cache": {"enabled": mode in ("cold", "warm"), "dir": str(cache)},
        },
    }
    if mode != "student":
        config["teacher"] = {"name": teacher, "weights": str(weights)}
        config["terms"] = [{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9, "temperature": 4}]
    return load_config(base=config)


def timing(rounds: int) -> list[str]:
    lines = [
        "## Epoch time with and without the cache",
        "",
        "| pair | student alone (s) | KD, no cache (s) | KD, filling (s) | KD, replayed (s) "
        "| replayed / student (goal <= 1.15) | filling / no cache (goal <= 1.1) |",
        "|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for label, (teacher, student) in PAIRS.items():
            weights = random_teacher(tmp, teacher)
            times: dict[str, list[float]] = {m: [] for m in MODES}
            for r in range(rounds):
                cache = tmp / f"cache-{teacher}-{r}"
                for mode in MODES:
                    name = f"{teacher}-{mode}-{r}"
                    train_from_config(timing_config(tmp, teacher, student, weights, mode, cache, name))
                    times[mode].append(epoch_seconds(tmp / "runs" / name))
            med = {m: statistics.median(v) for m, v in times.items()}
            lines.append(
                f"| {label} | {' | '.join(f'{med[m]:.2f}' for m in MODES)} "
                f"| {med['warm'] / med['student']:.2f} | {med['cold'] / med['live']:.2f} |"
            )
            print(lines[-1], {m: [round(t, 2) for t in v] for m, v in times.items()}, flush=True)
    return [*lines, ""]


def topk_effect(ks: list[int], seeds: list[int]) -> list[str]:
    """Best top-1 of the demo's KD run with full and top-k storage, per seed (mean ± std over seeds)."""
    from rich.console import Console

    teacher = cached_teacher([], Console()) / "student.safetensors"
    rows, per_seed = [], []
    with tempfile.TemporaryDirectory() as tmp_name:
        for k in [0, *ks]:
            label = "full (fp32)" if k == 0 else f"top-{k}"
            best = []
            for seed in seeds:
                overrides = [
                    f"teacher.weights={teacher}",
                    f"runtime.out_dir={tmp_name}",
                    f"runtime.teacher_cache.dir={tmp_name}/cache",
                    f"runtime.teacher_cache.topk={k}",
                    f"runtime.seed={seed}",
                    f"name=kd-top{k}-seed{seed}",
                    "runtime.progress=false",
                ]
                best.append(train_from_config(load_config(preset("demo/kd.yaml"), overrides))["best_top1"])
                print(label, seed, best[-1], flush=True)
            spread = f" ± {statistics.stdev(best):.2f}" if len(best) > 1 else ""
            rows.append(f"| {label} | {statistics.mean(best):.2f}{spread} |")
            per_seed.append(f"- {label}: {' / '.join(f'{b:.2f}' for b in best)}")
    return [
        f"# Teacher-output cache, top-k storage: the demo's KD run (seeds {', '.join(map(str, seeds))})",
        "",
        "`python benchmarks/teacher_cache.py --no-timing`: ResNet-20 -> ResNet-8, 0.1 CE + 0.9 KD (T 4), "
        "12 epochs, the demo's cached teacher; each run fills its own cache, so it trains on the decoded "
        "top-k logits.",
        "",
        "| teacher logits | best top-1 (%, mean ± std) |",
        "|---|---|",
        *rows,
        "",
        "Per seed:",
        "",
        *per_seed,
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--topk", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-topk", action="store_true")
    parser.add_argument("--no-timing", action="store_true")
    args = parser.parse_args()
    if not args.no_timing:
        lines = [f"# Teacher-output cache ({torch.get_num_threads()} threads)", ""]
        write_table(RESULTS / "teacher_cache.md", lines + timing(args.rounds))
    if not args.no_topk:
        write_table(RESULTS / "teacher_cache_topk.md", topk_effect(args.topk, args.seeds))


if __name__ == "__main__":
    main()
