"""Latency and size of a demo student as it would be deployed: the teacher and the student in fp32 PyTorch,
the student as ONNX fp32 and ONNX int8 (ONNX Runtime static quantization), at batch 1 and 32, median and
p95 over repeated runs on this machine's CPU; plus the export's parity figures (max |ONNX - PyTorch| and
top-1 of PyTorch, ONNX fp32 and int8 on the test split). The run directory is copied first, so the
export lands in the copy. Writes benchmarks/results/deploy_latency.md.
Run:  python benchmarks/deploy_latency.py [--run runs/demo-quality/kd-seed0] [--repeats 50]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from _results import RESULTS, write_table

from kdkit.deploy.commands import export_run
from kdkit.deploy.latency import latency_markdown, latency_table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, default=Path("runs/demo-quality/kd-seed0"))
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS / "deploy_latency.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / args.run.name
        shutil.copytree(args.run, run, ignore=shutil.ignore_patterns("checkpoints", "export"))
        export_run(run, fmt="onnx", dynamic_batch=True, int8=True)
        rows = latency_table(run, batches=(1, 32), repeats=args.repeats)
        meta = json.loads((run / "export" / "student.onnx.json").read_text())
    load = os.getloadavg()[0]
    lines = [
        f"# Deployed latency and size of `{args.run}` (CPU)",
        "",
        f"CPU only, {os.cpu_count()} cores, PyTorch with {torch.get_num_threads()} thread(s), ONNX Runtime "
        f"with its default threads; load average {load:.1f} when the table was made (other jobs make every "
        f"p95 noisier); {args.repeats} timed runs after 3 warm-ups.",
        "",
        latency_markdown(rows),
        "",
        "Export check: " + json.dumps({k: meta[k] for k in ("parity", "int8") if k in meta}),
        "",
    ]
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
