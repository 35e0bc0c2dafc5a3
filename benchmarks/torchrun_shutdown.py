"""Start/stop loop: a tiny 2-process ``torchrun ... -m kdkit train`` on the CPU, N times (issue 8, item 2).

Alternates fp32 and bf16 runs and counts, per precision, runs that exit non-zero, processes that abort
(``terminate called ...``, SIGABRT) and runs without ``report.md`` or plots. Not timed: the
result is the count of unclean endings, written to ``benchmarks/results/torchrun_shutdown.md``.

    python benchmarks/torchrun_shutdown.py --runs 20
    python benchmarks/torchrun_shutdown.py --runs 20 --src /tmp/old/src --precision fp32   # another tree
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _results import RESULTS, write_table

ABORT_MARKS = ("terminate called", "SIGABRT", "Signal 6", "Aborted (core dumped)")
OUTPUTS = ("report.md", "loss.png", "accuracy.png", "summary.json", "student.safetensors")


def tiny_config(precision: str) -> dict:
    return {
        "name": f"shutdown-{precision}",
        "data": {"name": "embedded", "params": {"train_size": 64, "test_size": 32}, "batch_size": 16},
        "student": {"name": "resnet8"},
        "terms": [{"name": "ce"}],
        "stages": [{"epochs": 1, "optimizer": {"lr": 0.05}}],
        "runtime": {"progress": False, "precision": precision, "log_every": 1},
    }


def one_run(work: Path, index: int, precision: str, env: dict[str, str], timeout: float) -> dict:
    config = work / f"run{index}.yaml"
    config.write_text(yaml.safe_dump(tiny_config(precision)))
    out = work / f"run{index}"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "kdkit", "train", str(config), "--out", str(out)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        code, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, log = "timeout", f"{exc.stdout or ''}{exc.stderr or ''}"
    missing = [name for name in OUTPUTS if not (out / name).is_file()]
    return {
        "index": index,
        "precision": precision,
        "code": code,
        "abort": any(mark in log for mark in ABORT_MARKS),
        "missing": missing,
        "seconds": time.perf_counter() - start,
        "tail": log[-1500:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--precision", choices=["alternate", "fp32", "bf16"], default="alternate")
    parser.add_argument("--src", type=Path, help="put this source tree first on PYTHONPATH (compare trees)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--out", type=Path, default=RESULTS / "torchrun_shutdown.md")
    args = parser.parse_args()

    env = dict(os.environ)
    if args.src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(args.src.resolve()), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="kdkit-shutdown-") as tmp:
        for i in range(args.runs):
            precision = args.precision if args.precision != "alternate" else ("fp32", "bf16")[i % 2]
            result = one_run(Path(tmp), i, precision, env, args.timeout)
            results.append(result)
            bad = result["code"] != 0 or result["abort"] or result["missing"]
            print(
                f"run {i + 1}/{args.runs} {precision}: exit {result['code']}, abort {result['abort']}, "
                f"missing {result['missing'] or '-'}, {result['seconds']:.0f} s",
                flush=True,
            )
            if bad:
                print(result["tail"], flush=True)
    load_after = os.getloadavg()

    import torch

    lines = [
        "# torchrun start/stop loop",
        "",
        f"`python benchmarks/torchrun_shutdown.py --runs {args.runs} --precision {args.precision}"
        + (f" --src {args.src}" if args.src else "")
        + "`: a tiny 2-process CPU (gloo) `torchrun --standalone --nproc_per_node=2 -m kdkit train` "
        "(ResNet-8, embedded data, 64 training images, global batch 16, 1 epoch: 4 steps), repeated.",
        "",
        f"torch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} cores, "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after.",
        "",
        "| precision | runs | exit 0 | non-zero exit | aborted (`terminate called` / SIGABRT) "
        "| report.md or plots missing | wall time per run (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for precision in sorted({r["precision"] for r in results}):
        rows = [r for r in results if r["precision"] == precision]
        times = sorted(r["seconds"] for r in rows)
        lines.append(
            f"| {precision} | {len(rows)} | {sum(r['code'] == 0 for r in rows)} "
            f"| {sum(r['code'] != 0 for r in rows)} | {sum(r['abort'] for r in rows)} "
            f"| {sum(bool(r['missing']) for r in rows)} | {times[0]:.0f} to {times[-1]:.0f} |"
        )
    failed = [r for r in results if r["code"] != 0 or r["abort"] or r["missing"]]
    lines += ["", f"Unclean endings: {len(failed)} of {len(results)}."]
    for r in failed:
        last = [line for line in r["tail"].splitlines() if line.strip()][-3:]
        lines.append(
            f"- run {r['index'] + 1} ({r['precision']}): exit {r['code']}, missing "
            f"{', '.join(r['missing']) or 'nothing'}; last lines: `{' / '.join(last)[:300]}`"
        )
    lines.append("")
    write_table(args.out, lines)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
