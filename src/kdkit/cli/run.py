"""``kdkit`` subcommands that train and compare: list, train, eval, inspect, prepare, cache-teacher,
train-style, compare, demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..engine.tasks import METRIC_LABELS
from ..errors import KdkitError
from .common import SetOption, app, console, user_errors


@app.command("list")
@user_errors
def list_registered(
    kind: Annotated[str | None, typer.Argument(help="models, datasets, terms or refiners")] = None,
):
    """List registered models, datasets, terms and refiners with one-line descriptions."""
    from ..api import registries
    from ..registry import did_you_mean

    found = registries()
    if kind is not None and kind not in found:
        raise KdkitError(f"unknown kind '{kind}'{did_you_mean(kind, list(found))}")
    for name, registry in found.items():
        if kind is not None and name != kind:
            continue
        table = Table(title=f"{name} ({len(registry)})", title_justify="left", show_header=False, box=None)
        for entry in registry.entries():
            table.add_row(f"[bold]{entry.name}[/]", entry.description)
        console.print(table)


@app.command()
@user_errors
def train(
    config: Annotated[Path | None, typer.Argument(help="YAML config")] = None,
    set_: SetOption = None,
    resume: Annotated[Path | None, typer.Option(help="continue the run in this directory")] = None,
    out: Annotated[Path | None, typer.Option(help="run directory (default: runtime.out_dir/name)")] = None,
    overwrite: Annotated[
        bool, typer.Option(help="replace the run already in the run directory (its files are deleted)")
    ] = False,
):
    """Train (or distill) a student as the config says; `--resume RUN_DIR` continues a stopped run.

    A run directory that already holds a run is refused unless --resume continues it or --overwrite
    replaces it; a directory another run is using is refused.
    """
    from ..api import train_from_config

    if resume is not None:
        if config is not None:
            raise KdkitError("give either a CONFIG or --resume RUN_DIR, not both (the run keeps its config)")
        if out is not None or overwrite:
            raise KdkitError("--resume RUN_DIR continues the run in RUN_DIR: leave out --out and --overwrite")
        config_path = resume / "config.yaml"
        if not config_path.is_file():
            raise KdkitError(f"{resume} holds no config.yaml: not a kdkit run directory")
        summary = train_from_config(config_path, set_ or [], run_dir=resume, resume=True)
    else:
        if config is None:
            raise KdkitError("give a CONFIG file (see configs/) or --resume RUN_DIR")
        summary = train_from_config(config, set_ or [], run_dir=out, overwrite=overwrite)
    metric = summary.get("metric", "top1")
    if summary.get(f"best_{metric}") is not None:
        label = METRIC_LABELS[metric]
        best, last = summary[f"best_{metric}"], summary[f"last_{metric}"]
        console.print(f"best {label} {best:.2f}  last {label} {last:.2f}")


@app.command("eval")
@user_errors
def evaluate_cmd(
    run: Annotated[Path, typer.Argument(help="run directory or exported student.safetensors")],
    data: Annotated[str | None, typer.Option(help="dataset name (default: the run's)")] = None,
    split: Annotated[str | None, typer.Option(help="split (default: the run's eval split)")] = None,
    styles: Annotated[
        str | None, typer.Option(help="comma-separated styles, e.g. day,night,fog: metric per style")
    ] = None,
    folders: Annotated[list[Path] | None, typer.Option("--folder", help="a test folder (repeat)")] = None,
    precision: Annotated[
        str | None, typer.Option(help="fp32 or bf16 (default: the run's runtime.precision, as it evaluated)")
    ] = None,
    set_: SetOption = None,
):
    """Evaluate an exported student on a dataset split (top-1/top-5, or mIoU, variance, HP-Acc).

    With --styles (or --folder ...): the metric per style and its change from the training style
    (negative for a drop), written to styles.md and styles.png in the run directory.
    """
    from ..api import evaluate_student, evaluate_styles

    if styles or folders:
        report = evaluate_styles(
            run,
            styles=[s for s in (styles or "").split(",") if s],
            folders=folders or [],
            overrides=set_ or [],
            precision=precision,
        )
        table = Table("style", METRIC_LABELS[report["metric"]], f"change from {report['train_style']}")
        for row in report["rows"]:
            table.add_row(row["style"], f"{row[report['metric']]:.2f}", f"{row['change']:+.2f}")
        console.print(table)
        console.print(f"precision: {report['precision']}", highlight=False)
        return
    result = evaluate_student(run, data=data, split=split, overrides=set_ or [], precision=precision)
    if "top1" in result:
        line = f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}"
    else:
        line = (
            f"mIoU {result['miou']:.2f}%  pixel acc {result['pixel_acc']:.2f}%  per-image mIoU var "
            f"{result['miou_var']:.2f}e-3  HP-Acc {result['hp_acc']:.2f}%  loss {result['loss']:.4f}"
        )
    console.print(f"{line}  ({result['precision']})", highlight=False)


@app.command()
@user_errors
def inspect(
    config: Annotated[Path, typer.Argument(help="YAML config")],
    set_: SetOption = None,
    dry: Annotated[
        bool, typer.Option(help="random weights and random input of the dataset's shape: no data, no weights")
    ] = False,
):
    """Dry-run one batch: every tap's shape, the connectors built, parameter counts.

    --dry checks a preset without its data and weights files: models get random weights and the
    batch is two random images of the dataset's training size (its crop for segmentation).
    """
    from ..api import inspect_config

    report = inspect_config(config, set_ or [], dry=dry)
    if dry:
        info = report["dry"]
        console.print(
            f"dry run: random weights, random input {tuple(info['input'])} ({info['task']}, "
            f"{info['num_classes']} classes)",
            highlight=False,
        )
        for skipped in info["skipped_weights"]:
            console.print(f"skipped weights file: {skipped}", highlight=False, markup=False)
        for name in info["skipped_refiners"]:
            console.print(f"skipped refiner: {name} (it needs data)", highlight=False, markup=False)
    for role in ("teacher", "student"):
        if role not in report:
            continue
        info = report[role]
        table = Table(
            title=f"{role}: {info['name']} ({info['params'] / 1e6:.2f}M params)", title_justify="left"
        )
        table.add_column("tap")
        table.add_column("shape")
        for key, shape in info["taps"].items():
            table.add_row(key, str(tuple(shape)))
        console.print(table)
    for line in report["connectors"]:
        console.print(line)
    table = Table(title="student modules", title_justify="left")
    for column in ("module", "type", "output shape"):
        table.add_column(column)
    for name, kind, shape in report["student"]["modules"]:
        table.add_row(name, kind, str(shape))
    console.print(table)


@app.command()
@user_errors
def prepare(config: Annotated[Path, typer.Argument(help="YAML config")], set_: SetOption = None):
    """Build a run without training: generate its data and fit what its refiners need (TST's stage I
    meta-encoders, cached per image size), so that `kdkit train` starts at once."""
    from ..api import prepare_config

    lines = prepare_config(config, set_ or [])
    for line in lines or ["nothing to prepare beyond the data (no refiner needs it)"]:
        console.print(line, highlight=False, markup=False)


@app.command("cache-teacher")
@user_errors
def cache_teacher(config: Annotated[Path, typer.Argument(help="YAML config")], set_: SetOption = None):
    """Run the config's teacher over every epoch's augmented samples and store its logits, so that runs
    of the config (any student, any logit term) replay them instead of running the teacher. Under
    torchrun each process fills its share; on a GPU set runtime.device=cuda."""
    from ..api import cache_teacher as fill

    for line in fill(config, set_ or [], progress=lambda text: console.print(text, highlight=False)):
        console.print(line, highlight=False, markup=False)


@app.command("train-style")
@user_errors
def train_style(
    data: Annotated[str, typer.Option(help="dataset whose images F and G learn to reconstruct")],
    out: Annotated[Path, typer.Option(help="output file, e.g. style.safetensors (+ style.json)")],
    root: Annotated[str | None, typer.Option(help="dataset folder")] = None,
    split: Annotated[str, typer.Option(help="split")] = "train",
    param: Annotated[
        list[str] | None, typer.Option(help="dataset parameter k=v (YAML value), repeatable")
    ] = None,
    teacher: Annotated[str | None, typer.Option(help="use a frozen teacher front as F: NAME:SPLIT")] = None,
    teacher_weights: Annotated[
        Path | None, typer.Option(help="the teacher's weights (with --teacher)")
    ] = None,
    steps: Annotated[int, typer.Option(help="training steps")] = 2000,
    batch_size: Annotated[int, typer.Option(help="batch size")] = 16,
    seed: Annotated[int, typer.Option(help="seed")] = 0,
):
    """Train the AdaIN encoder F and generator G of the `style` refiner (method: adain) on your images."""
    import yaml

    from ..refiners.style_models import train_style_model

    params = {}
    for item in param or []:
        key, _, value = item.partition("=")
        params[key] = yaml.safe_load(value)
    front = None
    if teacher:
        name, _, split_at = teacher.rpartition(":")
        if not name or teacher_weights is None:
            raise KdkitError(
                "--teacher takes NAME:SPLIT (e.g. mini_deeplab_teacher:backbone) and needs --teacher-weights"
            )
        front = {"name": name, "split": split_at, "weights": str(teacher_weights)}
    losses = train_style_model(
        data,
        out,
        root=root,
        split=split,
        params=params,
        teacher=front,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
    )
    console.print(
        f"reconstruction MSE {losses[0]:.4f} -> {sum(losses[-20:]) / len(losses[-20:]):.4f}; saved {out}"
    )


@app.command()
@user_errors
def compare(
    runs: Annotated[
        list[Path], typer.Argument(help="run directories or folders of runs (seeds of a config are grouped)")
    ],
    out: Annotated[Path | None, typer.Option(help="also write the table to this Markdown file")] = None,
):
    """One table over runs: best/last metric as mean ± std over seeds, best and last epoch.

    A folder that is not a run stands for the runs inside it; files and unfinished runs are skipped
    with a note. Classification and segmentation runs get one table each.
    """
    from ..report.compare import compare_runs, comparison_tables, find_runs

    run_dirs, notes = find_runs(runs)
    for note in notes:
        Console(stderr=True).print(f"note: {note}", highlight=False, soft_wrap=True, markup=False)
    table = comparison_tables(compare_runs(run_dirs))
    console.print(table, highlight=False, markup=False)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")


@app.command()
@user_errors
def demo(
    task: Annotated[str, typer.Option(help="classification, segmentation or detection")] = "classification",
    style: Annotated[bool, typer.Option(help="plain KD vs style-augmented KD, evaluated per style")] = False,
    quick: Annotated[bool, typer.Option(help="smaller settings: a pipeline check in a few minutes")] = False,
    out: Annotated[Path | None, typer.Option(help="output folder [runs/demo(-<task>)]")] = None,
    seed: Annotated[int, typer.Option(help="seed of the students' runs")] = 0,
    set_: SetOption = None,
):
    """Embedded data -> teacher -> students -> report.md comparing them.

    classification: student alone, KD, DKD. segmentation: student alone, CWD, I2CKD, Spirit
    Distillation and Enhanced Spirit Distillation at several r. detection: student alone, mimic, PKD
    and mimic + style (patent claim 14). --style: plain KD vs style-augmented KD (patent US
    2025/0265822), trained on day images, evaluated on every style (classification, segmentation).
    """
    from importlib import import_module

    pipelines = {
        "classification": ("classification", "run_demo", "runs/demo"),
        "segmentation": ("segmentation", "run_segmentation_demo", "runs/demo-segmentation"),
        "detection": ("detection", "run_detection_demo", "runs/demo-detection"),
    }
    if task not in pipelines:
        raise KdkitError(f"--task must be one of {', '.join(pipelines)}, not '{task}'")
    if style:
        if task == "detection":
            raise KdkitError("--style is for classification and segmentation (detection has a style row)")
        from ..demos.style import run_style_demo

        out = out or Path(f"runs/demo-style-{task}")
        report = run_style_demo(out, task=task, quick=quick, seed=seed, overrides=set_ or [])
    else:
        module, function, default = pipelines[task]
        run = getattr(import_module(f"kdkit.demos.{module}"), function)
        report = run(out or Path(default), quick=quick, seed=seed, overrides=set_ or [])
    console.print(f"report: {report}")
