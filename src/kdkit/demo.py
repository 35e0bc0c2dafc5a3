"""``kdkit demo``: embedded data -> teacher -> student alone, KD, DKD -> one report.

The runs are the presets in ``configs/demo/`` (packaged with kdkit). The teacher is cached under
``$KDKIT_CACHE/teachers/<hash of its config>`` and reused by later calls; ``--quick`` shrinks the
data and the schedules to fit in about two minutes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from rich.console import Console

from .api import train_from_config
from .config import RunConfig, load_config
from .data.base import cache_dir
from .engine.checkpoint import atomic_write_text
from .report.compare import compare_runs, comparison_table
from .report.plots import plot_comparison, plot_curves

STUDENTS = ("student", "kd", "dkd")
LABELS = {"teacher": "teacher (ResNet-20)", "student": "student alone (ResNet-8)", "kd": "KD", "dkd": "DKD"}
QUICK = [
    "data.params.train_size=2000",
    "data.params.test_size=1000",
    "stages.0.epochs=6",
    "stages.0.eval_every=2",
]
QUICK_TEACHER = ["stages.0.epochs=10"]
QUICK_DKD = ["terms.1.warmup_epochs=1"]
QUICK_NOTE = [
    "",
    "`--quick` checks the whole pipeline in about a minute; its runs are too short to learn this dataset",
    "(accuracies stay near chance). `kdkit demo` (about 12 minutes on 2 CPU cores) gives the comparison.",
]


def preset(name: str) -> Path:
    """Path of a packaged preset, e.g. ``preset("demo/kd.yaml")``."""
    return Path(str(resources.files("kdkit") / "configs" / name))


def _fingerprint(config: RunConfig) -> str:
    data = config.model_dump(mode="json")
    data.pop("name")
    for key in ("out_dir", "progress"):
        data["runtime"].pop(key)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def cached_teacher(overrides: list[str], console: Console, teacher_preset: str = "demo/teacher.yaml") -> Path:
    """Train a demo teacher once per configuration; later calls reuse it from the cache."""
    config = load_config(preset(teacher_preset), overrides)
    run_dir = cache_dir("teachers", _fingerprint(config))
    if (run_dir / "summary.json").is_file() and (run_dir / "student.safetensors").is_file():
        console.print(f"teacher: reusing {run_dir}")
        return run_dir
    console.print(f"teacher: training {config.student.name} (cached in {run_dir})")
    shutil.rmtree(run_dir, ignore_errors=True)
    train_from_config(config, run_dir=run_dir)
    return run_dir


def link_teacher(out: Path, teacher_dir: Path) -> Path:
    """``<out>/teacher`` -> the cached teacher, so the presets and the README's examples find it."""
    out.mkdir(parents=True, exist_ok=True)
    link = out / "teacher"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(teacher_dir.resolve(), target_is_directory=True)
    return link


def run_demo(out: Path, quick: bool = False, seed: int = 0, overrides: Sequence[str] = ()) -> Path:
    """Run the whole demo into ``out``; returns the path of its ``report.md``.

    ``overrides`` (``--set`` assignments) apply to every run, the teacher's included.
    """
    console = Console()
    shared = [*(QUICK if quick else []), *overrides]
    teacher_dir = cached_teacher([*shared, *(QUICK_TEACHER if quick else [])], console)
    run_dirs = {"teacher": link_teacher(out, teacher_dir)}
    for name in STUDENTS:
        overrides = [
            *shared,
            f"runtime.seed={seed}",
            f"runtime.out_dir={out}",
            f"name={name}-seed{seed}",
        ]
        if name != "student":
            overrides.append(f"teacher.weights={teacher_dir / 'student.safetensors'}")
        if quick and name == "dkd":
            overrides += QUICK_DKD
        console.print(f"{LABELS[name]}: training")
        run_dirs[name] = out / f"{name}-seed{seed}"
        train_from_config(load_config(preset(f"demo/{name}.yaml"), overrides), run_dir=run_dirs[name])
    return write_demo_report(out, run_dirs, quick)


def write_demo_report(out: Path, run_dirs: dict[str, Path], quick: bool) -> Path:
    rows = compare_runs(list(run_dirs.values()))
    for row, key in zip(rows, run_dirs):
        row["label"] = LABELS[key]
    by_key = dict(zip(run_dirs, rows))
    alone = by_key["student"]["best_top1_mean"]
    gains = [
        f"- {LABELS[k]}: {by_key[k]['best_top1_mean'] - alone:+.2f} points top-1 over the student alone"
        for k in ("teacher", "kd", "dkd")
    ]
    plot_comparison(rows, out / "comparison.png", "kdkit demo: best top-1 on the embedded test split")
    plot_curves({LABELS[k]: d for k, d in run_dirs.items()}, out / "curves.png", "test top-1 during training")
    text = [
        "# kdkit demo" + (" (quick)" if quick else ""),
        "",
        "Embedded dataset (procedural shapes and textures, day style); teacher ResNet-20 trained",
        "from labels, student ResNet-8 trained alone, with KD (Hinton et al. 2015) and with DKD",
        "(Zhao et al. 2022).",
        "",
        comparison_table(rows),
        "",
        *gains,
        *(QUICK_NOTE if quick else []),
        "",
        "![comparison](comparison.png)",
        "",
        "![curves](curves.png)",
    ]
    return write_report(out, text, run_dirs)


def write_report(out: Path, lines: list[str], run_dirs: dict[str, Path]) -> Path:
    """``<out>/report.md``: ``lines`` and a link to each run's own report."""
    runs = "Runs: " + ", ".join(f"[{k}]({_link(out, d)}/report.md)" for k, d in run_dirs.items())
    path = out / "report.md"
    atomic_write_text(path, "\n".join([*lines, "", runs, ""]))
    return path


def _link(out: Path, run_dir: Path) -> str:
    try:
        return str(run_dir.resolve().relative_to(out.resolve()))
    except ValueError:
        return str(run_dir.resolve())
