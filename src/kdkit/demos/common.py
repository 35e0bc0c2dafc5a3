"""What every ``kdkit demo`` pipeline shares: packaged presets, the cached demo teacher (trained once per
configuration under ``$KDKIT_CACHE/teachers/<hash of its config>``, copied to ``<out>/teacher`` and
checked against the metric its recipe reaches), and the demo report's frame."""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib import resources
from pathlib import Path

from rich.console import Console

from ..api import profile_model, train_from_config
from ..config import RunConfig, load_config, without_later_defaults
from ..data.base import cache_dir
from ..engine.checkpoint import atomic_write_text
from ..engine.tasks import METRIC_LABELS
from ..report.runreport import markdown_table

# The best metric each demo teacher's recipe reaches (benchmarks/results/demo_teacher.md and
# seg_demo_quality.md; the detection teacher: 22.59 mAP after its 16 epochs, one run, 2026-11-26); a
# teacher below TEACHER_FLOOR times it is reported as failed.
EXPECTED_TEACHER = {
    "demo/teacher.yaml": ("top1", 80.0),
    "demo_segmentation/teacher.yaml": ("miou", 47.0),
    "demo_detection/teacher.yaml": ("map", 22.6),
}
TEACHER_FLOOR = 0.8


def preset(name: str) -> Path:
    """Path of a packaged preset, e.g. ``preset("demo/kd.yaml")``."""
    return Path(str(resources.files("kdkit") / "configs" / name))


def _fingerprint(config: RunConfig) -> str:
    data = config.model_dump(mode="json")
    data.pop("name")
    for key in ("out_dir", "progress", "teacher_cache"):  # none of them changes what the teacher learns
        data["runtime"].pop(key, None)
    without_later_defaults(data)  # a new config field does not make every cached teacher a stranger
    data["runtime"]["channels_last"] = False  # the memory layout moves float rounding only (and its
    # default changed): teachers cached under either layout stay found
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def cached_teacher(overrides: list[str], console: Console, teacher_preset: str = "demo/teacher.yaml") -> Path:
    """Train a demo teacher once per configuration; later calls reuse it from the cache, and a call
    after an interrupted training resumes it from its last checkpoint."""
    config = load_config(preset(teacher_preset), overrides)
    run_dir = cache_dir("teachers", _fingerprint(config))
    if (run_dir / "summary.json").is_file() and (run_dir / "student.safetensors").is_file():
        console.print(f"teacher: reusing {run_dir}")
        return run_dir
    if (run_dir / "checkpoints" / "last.pt").is_file():
        console.print(f"teacher: resuming {config.student.name} in {run_dir}")
        train_from_config(load_config(run_dir / "config.yaml"), run_dir=run_dir, resume=True)
        return run_dir
    console.print(f"teacher: training {config.student.name} (cached in {run_dir})")
    shutil.rmtree(run_dir, ignore_errors=True)
    train_from_config(config, run_dir=run_dir)
    return run_dir


def check_teacher(teacher_dir: Path, teacher_preset: str, console: Console) -> str | None:
    """A warning when the teacher is far below the accuracy its recipe reaches (None when it is not).

    A teacher stuck on a plateau (seen once: 50 % top-1 where the recipe gives about 80 %) makes every
    distilled row meaningless, so the demo says so instead of presenting the comparison.
    """
    if teacher_preset not in EXPECTED_TEACHER:  # a recipe not measured yet: nothing to compare with
        return None
    metric, expected = EXPECTED_TEACHER[teacher_preset]
    reached = json.loads((teacher_dir / "summary.json").read_text())[f"best_{metric}"]
    if reached >= TEACHER_FLOOR * expected:
        return None
    warning = (
        f"the teacher reached {reached:.2f} {METRIC_LABELS[metric]}, far below the {expected:.0f} its "
        f"recipe gives (floor {TEACHER_FLOOR * expected:.0f}), so the students' comparison is not "
        "meaningful. Train another teacher (--set runtime.seed=1 changes only the teacher's seed) or "
        f"delete {teacher_dir} and run again."
    )
    console.print(f"[bold red]warning:[/] {warning}", highlight=False, soft_wrap=True)
    return warning


def copy_teacher(out: Path, teacher_dir: Path) -> Path:
    """``<out>/teacher``: a copy of the cached teacher's run (no checkpoints), so the report and the
    presets' ``runs/demo/teacher/student.safetensors`` still work when ``out`` is copied elsewhere."""
    target = out / "teacher"
    if target.is_symlink() or target.is_file():
        target.unlink()
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(teacher_dir, target, ignore=shutil.ignore_patterns("checkpoints", ".*"))
    return target


def prepare_teacher(
    out: Path, overrides: list[str], console: Console, teacher_preset: str, quick: bool
) -> tuple[Path, Path, str | None]:
    """The cached teacher (trained if needed), its copy in ``<out>/teacher`` and the check's warning
    (none in ``--quick``, whose teacher is meant to be weak)."""
    teacher_dir = cached_teacher(overrides, console, teacher_preset)
    warning = None if quick else check_teacher(teacher_dir, teacher_preset, console)
    return teacher_dir, copy_teacher(out, teacher_dir), warning


def data_sizes(run_dir: Path) -> tuple[int | None, int | None]:
    """(train_size, test_size) of the embedded dataset a run used, from its resolved config."""
    params = load_config(run_dir / "config.yaml").data.params
    return params.get("train_size"), params.get("test_size")


def teacher_warning(warning: str | None) -> list[str]:
    """Report lines that put a failed teacher check above the table (none when the teacher is fine)."""
    return [] if warning is None else [f"**Warning: {warning}** The table is shown for diagnosis only.", ""]


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


def model_costs(run_dirs: dict[str, Path]) -> str:
    """Params, FLOPs and CPU latency of each exported network of the demo (one image)."""
    rows, seen = [], set()
    for key, run_dir in run_dirs.items():
        spec = json.loads((run_dir / "student.json").read_text())
        name = f"{spec['model']} {json.dumps(spec.get('kwargs', {}), sort_keys=True)}"
        if name in seen:
            continue
        seen.add(name)
        cost = profile_model(run_dir / "student.safetensors")
        rows.append(
            [
                key,
                f"`{spec['model']}`",
                f"{cost['params_m']:.3f}",
                f"{cost['gflops']:.3f}",
                f"{cost['latency_ms']:.1f}",
            ]
        )
    return markdown_table(["run", "network", "params (M)", "GFLOPs", "latency (ms, batch 1)"], rows)
