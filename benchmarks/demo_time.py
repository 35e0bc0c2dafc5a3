"""Wall time of `kdkit demo` from a cold cache (data generation + teacher + students) and a warm one.

Targets: `kdkit demo --quick` under 2 minutes (issue 2) and every full demo under 15 minutes with its
teacher cached (issues 2, 11), on the 2-core CI machine. ``--cached`` times one run against the user's
own cache (``$KDKIT_CACHE``), whose teacher is already trained, instead of a cold and a warm run in a
fresh cache. Rows of other commands already in the results file are kept.
Writes benchmarks/results/demo_time.md.
Run:  python benchmarks/demo_time.py [--task detection] [--full] [--cached]
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

HEADER = "| command | cold cache | teacher cached | target | met |"


def timed_demo(cache: Path | None, out: Path, args: list[str]) -> float:
    env = {**os.environ, **({"KDKIT_CACHE": str(cache)} if cache else {})}
    command = [sys.executable, "-m", "kdkit", "demo", "--out", str(out), *args]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def previous_rows(path: Path) -> dict[str, str]:
    """The rows of ``path``'s table by command."""
    if not path.is_file():
        return {}
    rows = [line for line in path.read_text().splitlines() if line.startswith("| `")]
    return {row.split("`")[1]: row for row in rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--task", default="classification", choices=["classification", "segmentation", "detection"]
    )
    parser.add_argument("--full", action="store_true", help="also time the full demo (up to 15 minutes)")
    parser.add_argument("--cached", action="store_true", help="one run with the teacher in the user's cache")
    parser.add_argument("--out", type=Path, default=RESULTS / "demo_time.md")
    args = parser.parse_args()
    rows = previous_rows(args.out)
    task = [] if args.task == "classification" else ["--task", args.task]
    for quick in (True, False) if args.full else (True,):
        demo = [*task, *(["--quick"] if quick else [])]
        label = " ".join(["kdkit demo", *demo])
        limit = 120 if quick else 900
        with tempfile.TemporaryDirectory() as tmp:
            if args.cached:
                cold, warm = None, timed_demo(None, Path(tmp) / "demo", demo)
            else:
                cache, out = Path(tmp) / "cache", Path(tmp) / "demo"
                cold = timed_demo(cache, out, demo)
                warm = timed_demo(cache, out, demo)
        met = (cold if cold is not None and quick else warm) < limit
        cold_text = "-" if cold is None else f"{cold:.0f} s"
        rows[label] = f"| `{label}` | {cold_text} | {warm:.0f} s | {limit} s | {'yes' if met else 'NO'} |"
    lines = [
        f"# `kdkit demo` wall time ({os.cpu_count()} CPU cores)",
        "",
        "`--quick` targets hold from a cold cache, full demos with the teacher cached; `-`: the teacher",
        "came from the user's cache (`--cached`).",
        "",
        HEADER,
        "|---|---|---|---|---|",
        *rows.values(),
        "",
    ]
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
