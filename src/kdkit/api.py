"""The Python API behind the CLI: train from a config, distill without one, evaluate, inspect."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import OptimizerConfig, RunConfig, RuntimeConfig, ScheduleConfig, load_config
from .errors import KdkitError
from .registry import REGISTRIES, Registry


def registries() -> dict[str, Registry]:
    """Every registry, with all built-in entries registered."""
    from . import data, models, refiners, terms  # noqa: F401 - importing registers

    return REGISTRIES


def train_from_config(
    config: str | Path | RunConfig,
    overrides: Sequence[str] = (),
    run_dir: str | Path | None = None,
    resume: bool = False,
    callbacks: list | None = None,
    modules: Mapping[str, nn.Module] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build and run a config (a YAML path or a :class:`RunConfig`); returns the run summary.

    ``run_dir`` defaults to ``runtime.out_dir/name``. A directory that already holds a run is refused
    (before anything is built) unless ``resume`` continues it or ``overwrite`` replaces it; a
    directory another run is using is refused too (see :mod:`kdkit.engine.rundir`).
    ``modules`` may hold a ready ``"student"`` and/or ``"teacher"`` used instead of building them.
    """
    import os

    from .engine.build import build_run, run_directory
    from .engine.rundir import check_run_dir

    if not isinstance(config, RunConfig):
        config = load_config(config, overrides)
    target = Path(run_dir) if run_dir else run_directory(config)
    check_run_dir(target, resume=resume, overwrite=overwrite, probe_lock=os.environ.get("RANK", "0") == "0")
    built = build_run(config, target, callbacks, modules)
    try:
        return built.trainer.fit(resume=resume, overwrite=overwrite)
    finally:
        built.trainer.distiller.release_taps()


def _model_name(model: str | nn.Module) -> str:
    """Config name of a model given by name, or ``module:<Class>`` for a module built by the caller."""
    return model if isinstance(model, str) else f"module:{type(model).__name__}"


def distill(
    student: str | nn.Module,
    teacher: str | nn.Module | None,
    *,
    data: str = "embedded",
    data_params: Mapping[str, Any] | None = None,
    terms: Mapping[str, float | tuple[float, Mapping[str, Any]]] = {"ce": 1.0, "kd": 1.0},
    teacher_weights: str | Path | None = None,
    epochs: int = 10,
    batch_size: int = 128,
    optimizer: OptimizerConfig | None = None,
    schedule: ScheduleConfig | None = None,
    runtime: RuntimeConfig | None = None,
    name: str = "distill",
    task: str = "classification",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Distill ``teacher`` into ``student`` in one stage, without a config file.

    ``student``/``teacher`` are model names (zoo, ``torchvision:``, ``timm:``) or modules; ``terms`` maps
    term names to a weight or to ``(weight, constructor arguments)``. Returns the run summary; the run
    directory (``runtime.out_dir/name``) holds the exported student, plots and ``report.md``.
    ``task="segmentation"`` with a segmentation dataset (e.g. ``data="road_scenes"``) distills dense
    predictions. ``overwrite`` replaces an earlier run of the same name (otherwise refused).
    """
    term_list = []
    for term_name, value in terms.items():
        weight, params = (value, {}) if isinstance(value, (int, float)) else (value[0], dict(value[1]))
        term_list.append({"name": term_name, "weight": weight, **params})
    config = {
        "name": name,
        "task": task,
        "data": {"name": data, "params": dict(data_params or {}), "batch_size": batch_size},
        "student": {"name": _model_name(student)},
        "terms": term_list,
        "stages": [
            {
                "epochs": epochs,
                "optimizer": (optimizer or OptimizerConfig()).model_dump(),
                "schedule": (schedule or ScheduleConfig(name="cosine")).model_dump(),
            }
        ],
        "runtime": (runtime or RuntimeConfig()).model_dump(),
    }
    if teacher is not None:
        config["teacher"] = {"name": _model_name(teacher), "weights": teacher_weights}
    modules = {
        role: m for role, m in (("student", student), ("teacher", teacher)) if isinstance(m, nn.Module)
    }
    return train_from_config(load_config(base=config), modules=modules, overwrite=overwrite)


def evaluate_student(
    run: str | Path,
    data: str | None = None,
    split: str | None = None,
    overrides: Sequence[str] = (),
    root: str | Path | None = None,
    precision: str | None = None,
) -> dict[str, Any]:
    """Metrics of an exported student on a dataset split (default: its run's eval split): top-1, top-5
    and loss for classification; mIoU, per-class IoU, pixel accuracy, per-image mIoU variance and
    HP-Acc for segmentation (with the run's ``evaluation`` settings).

    ``precision`` (``fp32`` or ``bf16``) defaults to the run's ``runtime.precision`` (fp32 without a
    run config), and the run's memory format is used too, so a run directory evaluates exactly as its
    training evaluations did. The result's ``"precision"`` says which was used.
    """
    from .data import build_dataset
    from .data.augment import BatchAugment
    from .deploy.export import load_student
    from .engine.batches import Batches
    from .engine.distributed import DistInfo, resolve_device
    from .engine.evaluate import resolve_precision
    from .engine.tasks import build_task

    run = Path(run)
    model, spec = load_student(run)
    run_dir = run if run.is_dir() else run.parent
    config_path = run_dir / "config.yaml"
    base = load_config(config_path, overrides) if config_path.is_file() else None
    precision = precision or (base.runtime.precision if base is not None else "fp32")
    if precision not in ("fp32", "bf16", "auto"):
        raise KdkitError(f"precision must be fp32, bf16 or auto, not '{precision}'")
    data_config = base.data if base is not None else None
    name = data or (data_config.name if data_config else "embedded")
    params = {**data_config.params, **data_config.eval_params} if data_config and data is None else {}
    dataset = build_dataset(
        name,
        split or (data_config.eval_split if data_config else "test"),
        root=str(root) if root is not None else (data_config.root if data_config and data is None else None),
        **params,
    )
    if dataset.num_classes != spec.num_classes:
        raise KdkitError(
            f"the student predicts {spec.num_classes} classes but {name} has {dataset.num_classes}; "
            "evaluate on the dataset it was trained for (--data, --set data.params...)"
        )
    kind = getattr(dataset, "task", "classification")
    task = build_task(kind, dataset, base.evaluation if base is not None else None, spec.image_size)
    device = resolve_device("auto")
    precision = resolve_precision(precision, device)
    memory_format = (
        torch.channels_last if base is not None and base.runtime.channels_last else torch.contiguous_format
    )
    model.to(device, memory_format=memory_format)
    augment = BatchAugment(0, False, spec.mean, spec.std)
    batch = data_config.eval_batch_size if data_config is not None else 64
    batches = Batches(dataset, batch, DistInfo(), train=False)

    def prepare(images: torch.Tensor) -> torch.Tensor:
        return augment.normalize(images.to(device)).contiguous(memory_format=memory_format)

    return {**task.evaluate(model, batches, prepare, device, precision), "precision": precision}


def evaluate_styles(
    run: str | Path,
    styles: Sequence[str] = (),
    folders: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    precision: str | None = None,
) -> dict[str, Any]:
    """Robustness to style shift: the student's metric on the same test set rendered in each of
    ``styles`` (datasets with a ``styles`` parameter: ``embedded``, ``road_scenes``), or on each of
    ``folders`` (test sets of the run's dataset type), with the change from the training style
    (``metric - metric on the training style``: negative for a drop).

    Writes ``styles.md``, ``styles.json`` and ``styles.png`` into ``out`` (default: the run
    directory); returns ``{"metric", "train_style", "rows": [{"style", <metric>, "change"}...]}``.
    """
    from .engine.checkpoint import atomic_write_text
    from .report.plots import plot_styles
    from .report.runreport import markdown_table

    if bool(styles) == bool(folders):
        raise KdkitError("give either styles (e.g. day,night,fog) or test folders, not both or neither")
    run = Path(run)
    run_dir = run if run.is_dir() else run.parent
    config = load_config(run_dir / "config.yaml", overrides) if (run_dir / "config.yaml").is_file() else None
    trained = (config.data.params.get("styles") if config is not None else None) or ["day"]
    trained = [trained] if isinstance(trained, str) else list(trained)
    results: dict[str, dict[str, float]] = {}
    for style in styles:
        results[style] = evaluate_student(
            run, overrides=[*overrides, f"data.eval_params.styles=[{style}]"], precision=precision
        )
    for folder in folders:
        results[str(folder)] = evaluate_student(run, overrides=overrides, root=folder, precision=precision)
    metric = next(m for m in ("top1", "map", "miou") if m in next(iter(results.values())))
    reference = results.get(trained[0], next(iter(results.values())))[metric]
    rows = [{"style": k, metric: r[metric], "change": r[metric] - reference} for k, r in results.items()]
    out = Path(out) if out is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    plot_styles(
        rows, metric, out / "styles.png", f"{run_dir.name}: {metric} per style (trained on {trained[0]})"
    )
    from .engine.tasks import METRIC_LABELS

    label = METRIC_LABELS[metric]
    table = markdown_table(
        ["style", label, f"change from {trained[0]}"],
        [[r["style"], f"{r[metric]:.2f}", f"{r['change']:+.2f}"] for r in rows],
    )
    used = next(iter(results.values()))["precision"]
    report = {"metric": metric, "train_style": trained[0], "rows": rows, "precision": used}
    atomic_write_text(out / "styles.json", json.dumps(report, indent=1))
    atomic_write_text(out / "styles.md", f"# {run_dir.name} per style\n\n{table}\n\n![styles](styles.png)\n")
    return report


def _without_weight_files(data: dict[str, Any]) -> list[str]:
    """Drop every weights file of a raw config (``weights`` of teacher and student, and ``*weights``
    model arguments such as ``backbone_weights``) in place; returns what was dropped."""
    dropped = []
    for role in ("teacher", "student"):
        model = data.get(role)
        if not isinstance(model, dict):
            continue
        if model.get("weights") is not None:
            dropped.append(f"{role}.weights={model['weights']}")
            model["weights"] = None
        for key, value in (model.get("kwargs") or {}).items():
            if key.endswith("weights") and isinstance(value, str):
                dropped.append(f"{role}.kwargs.{key}={value}")
                model["kwargs"][key] = None
    return dropped


def _dry_input(config: RunConfig) -> tuple[Any, tuple[int, int]]:
    """The dataset's shape (task, classes) and the training input size ``(H, W)``, without the data:
    the dataset's known shape (:mod:`kdkit.data.shapes`), or the dataset itself when it is a folder
    of the user's that is on disk; a segmentation crop (``data.augment.crop``) sets the size."""
    from .data import build_dataset
    from .data.shapes import DataShape, known_shape

    data = config.data
    shape = known_shape(data.name, data.params)
    if shape is None:
        try:
            dataset = build_dataset(data.name, data.train_split, root=data.root, **data.params)
        except KdkitError as exc:
            raise KdkitError(
                f"a dry run needs the shape of dataset '{data.name}', which is known only from its files "
                f"({exc})"
            ) from None
        image = dataset[0][0]
        shape = DataShape(
            getattr(dataset, "task", "classification"), dataset.num_classes, tuple(image.shape[-2:])
        )
    size = shape.size
    if shape.task == "segmentation" and data.augment.crop is not None:
        size = tuple(data.augment.crop)
    return shape, size


def prepare_config(path: str | Path, overrides: Sequence[str] = ()) -> list[str]:
    """Build a run without training, so that what it prepares is ready and cached before training: its
    datasets (generated ones are written to the cache) and each refiner's own preparation (TST's stage I
    meta-encoders, fitted for the run's image size). Returns one line per refiner that prepared something."""
    from .engine.build import build_run

    built = build_run(load_config(path, overrides), callbacks=[])
    lines = []
    for slot in built.trainer.refining.slots:
        described = slot.refiner.describe()
        if described:
            lines.append(f"{slot.config.name}: {described}")
    return lines


def cache_teacher(
    path: str | Path, overrides: Sequence[str] = (), progress: Callable[[str], None] = print
) -> list[str]:
    """Fill the run's teacher-output cache ahead of training (:func:`kdkit.engine.teacher_cache.fill`);
    ``runtime.teacher_cache.enabled`` is implied. Under ``torchrun`` each process fills its share.
    Returns one line per stage that reads the teacher."""
    from .engine.build import build_run
    from .engine.teacher_cache import fill

    config = load_config(path, [*overrides, "runtime.teacher_cache.enabled=true"])
    if config.teacher is None:
        raise KdkitError(f"{path} has no teacher: there is nothing to cache")
    built = build_run(config, callbacks=[])
    try:
        lines = fill(built.trainer, progress)
    finally:
        built.trainer.distiller.release_taps()
    return lines or ["no stage of the run reads the teacher: nothing to cache"]


def inspect_config(path: str | Path, overrides: Sequence[str] = (), dry: bool = False) -> dict[str, Any]:
    """Build a run without training: tap shapes, connectors, parameter counts, module shapes.

    ``dry=True`` needs neither weights nor data: models are built with random weights (weights files
    are skipped), and two random images of the dataset's training size stand in for a batch (the
    size and classes come from :mod:`kdkit.data.shapes`). ``report["dry"]`` says what was assumed.
    """
    from .engine.build import build_run

    if dry:
        return _inspect_dry(Path(path), overrides)
    config = load_config(path, overrides)
    built = build_run(config, callbacks=[])
    distiller = built.trainer.distiller
    sample = built.trainer.prepare_eval(
        torch.stack([built.trainer.stages[0].eval_data[i][0] for i in range(2)])
    )
    return _inspect_report(distiller, config, built.shapes, sample)


def _inspect_dry(path: Path, overrides: Sequence[str]) -> dict[str, Any]:
    from .config import _read_yaml, apply_override, validate
    from .engine.build import build_network, build_terms
    from .engine.distiller import Distiller

    data = _read_yaml(path)
    for assignment in overrides:
        apply_override(data, assignment)
    skipped = _without_weight_files(data)
    refiners = [
        r.get("name", "?") if isinstance(r, dict) else str(r) for r in data.pop("refiners", None) or []
    ]
    config = validate(data, str(path), path.read_text())
    shape, size = _dry_input(config)
    torch.manual_seed(config.runtime.seed)
    student = build_network(config.student, shape.num_classes, "student")
    teacher = build_network(config.teacher, shape.num_classes, "teacher") if config.teacher else None
    stage_terms = [
        build_terms(config.stage_terms(s), f"stages[{i}].terms") for i, s in enumerate(config.stages)
    ]
    distiller = Distiller(student, teacher, stage_terms)
    sample = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(config.runtime.seed))
    with torch.no_grad():
        shapes = distiller.setup(sample)
    report = _inspect_report(distiller, config, shapes, sample)
    report["dry"] = {
        "input": (2, 3, *size),
        "task": shape.task,
        "num_classes": config.student.num_classes or shape.num_classes,
        "skipped_weights": skipped,
        "skipped_refiners": refiners,
    }
    return report


def _inspect_report(
    distiller: Any, config: RunConfig, shapes: Mapping[str, Any], sample: torch.Tensor
) -> dict[str, Any]:
    """Teacher and student (name, params, taps, top-level module shapes) and the connectors built."""
    from .taps import module_shapes

    report: dict[str, Any] = {"connectors": []}
    roles = [("student", distiller.student, config.student.name)]
    if distiller.teacher is not None and config.teacher is not None:
        roles.insert(0, ("teacher", distiller.teacher, config.teacher.name))
    for role, model, name in roles:
        report[role] = {
            "name": name,
            "params": sum(p.numel() for p in model.parameters()),
            "taps": shapes.get(role, {}),
            "modules": module_shapes(model, sample, depth=1),
        }
    for key, term in distiller.terms.items():
        for child_name, child in term.named_children():
            n = sum(p.numel() for p in child.parameters())
            report["connectors"].append(f"connector {key}.{child_name}: {child} ({n} params)")
    distiller.release_taps()
    return report


def profile_model(
    model: str | Path, size: int = 32, num_classes: int = 100, batch: int = 1, device: str = "cpu"
) -> dict[str, float]:
    """Params, FLOPs and latency of an exported student (its spec gives the input size) or a model name."""
    from .deploy.export import load_student
    from .deploy.profile import profile
    from .models import build_model

    path = Path(model)
    if path.exists():
        network, spec = load_student(path)
        image_size = spec.image_size or (size, size)
    else:
        network, image_size = build_model(str(model), num_classes=num_classes), (size, size)
    return profile(network, tuple(image_size), batch=batch, device=device)
