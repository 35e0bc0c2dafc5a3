"""Where benchmark tables go, and how they are written."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def random_teacher(folder: Path, name: str) -> Path:
    """``<folder>/<name>.safetensors``: a 10-class ``name`` with random weights (seed 0), for timings."""
    import torch

    from kdkit.models import build_model, save_weights

    torch.manual_seed(0)
    path = folder / f"{name}.safetensors"
    save_weights(build_model(name, num_classes=10), path)
    return path


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
        "Wall time per demo call: "
        + ", ".join(f"seed {s}: {w:.0f} s" for s, w in zip(args.seeds, wall))
        + " (the first call also generates the data and trains the teacher unless they are cached).",
        "",
    ]


def train_or_reuse(config_path: Path, run_dir: Path, overrides: list[str]) -> float:
    """Train ``config_path`` with ``overrides`` into ``run_dir`` unless it finished there or another
    process holds it (a stopped run resumes from its checkpoint); the wall time in seconds, 0 when
    reused or skipped."""
    from kdkit.api import train_from_config
    from kdkit.config import load_config
    from kdkit.engine.rundir import lock_holder

    if (run_dir / "summary.json").is_file():
        return 0.0
    if run_dir.is_dir() and lock_holder(run_dir) is not None:  # another benchmark process trains it
        print(f"{run_dir}: in use by {lock_holder(run_dir)}; skipped")
        return 0.0
    start = time.perf_counter()
    resume = (run_dir / "checkpoints" / "last.pt").is_file()
    config = load_config(run_dir / "config.yaml") if resume else load_config(config_path, overrides)
    train_from_config(config, run_dir=run_dir, overwrite=not resume, resume=resume)
    return time.perf_counter() - start


def seconds(times: list[float]) -> str:
    return ", ".join(f"{t:.0f} s" for t in times)


def walls_line(walls: dict[tuple[str, int], float]) -> str:
    """``Wall time per run: kd seed 0: 512 s, ...`` (``not trained here`` for runs found finished or
    trained by another process)."""
    runs = ", ".join(
        f"{n} seed {s}: {f'{w:.0f} s' if w else 'not trained here'}" for (n, s), w in walls.items()
    )
    return f"Wall time per run: {runs}."


def train_grid(
    methods: dict[str, tuple[Path, list[str]]], seeds: list[int], runs: Path
) -> dict[tuple[str, int], float]:
    """Train (or reuse) ``<runs>/<name>-seed<seed>`` for every method (``name: (preset, overrides)``) and
    seed, seeds outer; the wall times."""
    walls = {}
    for seed in seeds:
        for name, (path, overrides) in methods.items():
            extra = [*overrides, f"runtime.seed={seed}", "runtime.progress=false"]
            walls[(name, seed)] = train_or_reuse(path, runs / f"{name}-seed{seed}", extra)
    return walls


def finished_rows(names: list[str], seeds: list[int], runs: Path, labels: dict[str, str]):
    """(``compare_runs`` rows of the methods with finished seeds, labelled; ``{name: finished seeds}``)."""
    from kdkit.report.compare import compare_runs

    done = {n: [s for s in seeds if (runs / f"{n}-seed{s}" / "summary.json").is_file()] for n in names}
    present = [n for n in names if done[n]]
    rows = compare_runs([runs / f"{n}-seed{s}" for n in present for s in done[n]])
    for row, name in zip(rows, present, strict=True):
        row["label"] = labels[name]
        row["name"] = name
    return rows, done


def grid_lines(title: str, warning: str | None, rows: list, done: dict, labels: dict[str, str]) -> list[str]:
    """The head of a grid benchmark's result: title, the teacher check's warning, the finished runs and
    the comparison table of ``rows`` (from :func:`finished_rows`)."""
    from kdkit.report.compare import comparison_table

    return [
        title,
        "",
        *([f"Teacher check: {warning}", ""] if warning else []),
        "Finished runs: " + "; ".join(f"{labels[n]} seeds {seeds or 'none'}" for n, seeds in done.items()),
        "",
        comparison_table(rows) if rows else "(no finished runs)",
        "",
    ]
