"""Where benchmark tables go, and how they are written."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def write_table(path: Path, lines: list[str]) -> None:
    """Write a Markdown result to ``path`` and echo it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print("\n".join(lines))


def quality_args(runs: str, out: str) -> argparse.Namespace:
    """``--seeds``, ``--quick``, ``--runs`` and ``--out`` of the demo quality benchmarks."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=Path, default=Path(runs))
    parser.add_argument("--out", type=Path, default=RESULTS / out)
    return parser.parse_args()


def run_seeds(demo: Callable[..., Path], args: argparse.Namespace) -> list[str]:
    """Run ``demo(runs, quick=, seed=)`` once per seed; the wall-time line of the result table."""
    wall = []
    for seed in args.seeds:
        start = time.perf_counter()
        demo(args.runs, quick=args.quick, seed=seed)
        wall.append(time.perf_counter() - start)
    return [
        "Wall time per demo call: " + ", ".join(f"seed {s}: {w:.0f} s" for s, w in zip(args.seeds, wall))
        + " (the first call also generates the data and trains the teacher unless they are cached).",
        "",
    ]
