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


def train_or_reuse(config_path: Path, run_dir: Path, overrides: list[str]) -> float:
    """Train ``config_path`` with ``overrides`` into ``run_dir`` unless it finished there (a stopped run
    resumes from its checkpoint); the wall time in seconds, 0 when reused."""
    from kdkit.api import train_from_config
    from kdkit.config import load_config

    if (run_dir / "summary.json").is_file():
        return 0.0
    start = time.perf_counter()
    resume = (run_dir / "checkpoints" / "last.pt").is_file()
    config = load_config(run_dir / "config.yaml") if resume else load_config(config_path, overrides)
    train_from_config(config, run_dir=run_dir, overwrite=not resume, resume=resume)
    return time.perf_counter() - start


def seconds(times: list[float]) -> str:
    return ", ".join(f"{t:.0f} s" for t in times)


def walls_line(walls: dict[tuple[str, int], float]) -> str:
    """``Wall time per run: kd seed 0: 512 s, ...`` (``reused`` for runs found finished)."""
    runs = ", ".join(f"{n} seed {s}: {f'{w:.0f} s' if w else 'reused'}" for (n, s), w in walls.items())
    return f"Wall time per run: {runs}."
