"""Wall time of `kdkit demo` from a cold cache (data generation + teacher + students) and a warm one.

Targets (issue 2): `kdkit demo --quick` under 2 minutes, `kdkit demo` under 15 minutes, on the
2-core CI machine. Writes benchmarks/results/demo_time.md.
Run:  python benchmarks/demo_time.py [--full]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import RESULTS, write_table


def timed_demo(cache: Path, out: Path, quick: bool) -> float:
    env = {**os.environ, "KDKIT_CACHE": str(cache)}
    command = [sys.executable, "-m", "kdkit", "demo", "--out", str(out), *(["--quick"] if quick else [])]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true", help="also time the full demo (about 15 minutes)")
    parser.add_argument("--out", type=Path, default=RESULTS / "demo_time.md")
    args = parser.parse_args()
    rows = []
    for quick in (True, False) if args.full else (True,):
        with tempfile.TemporaryDirectory() as tmp:
            cache, out = Path(tmp) / "cache", Path(tmp) / "demo"
            cold = timed_demo(cache, out, quick)
            warm = timed_demo(cache, out, quick)
        limit = 120 if quick else 900
        label = "kdkit demo --quick" if quick else "kdkit demo"
        rows.append(
            f"| `{label}` | {cold:.0f} s | {warm:.0f} s | {limit} s | {'yes' if cold < limit else 'NO'} |"
        )
    lines = [
        f"# `kdkit demo` wall time ({os.cpu_count()} CPU cores)",
        "",
        "| command | cold cache | teacher cached | target | met (cold) |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
