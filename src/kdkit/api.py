"""The Python API behind the CLI: train from a config, distill without one, evaluate, inspect."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import OptimizerConfig, RunConfig, RuntimeConfig, ScheduleConfig, load_config
from .errors import KdkitError
from .registry import REGISTRIES, Registry


def registries() -> dict[str, Registry]:
    """Every registry, with all built-in entries registered."""
    from . import data, models, terms  # noqa: F401 - importing registers

    return REGISTRIES


def train_from_config(
    config: str | Path | RunConfig,
    overrides: Sequence[str] = (),
    run_dir: str | Path | None = None,
    resume: bool = False,
    callbacks: list | None = None,
    modules: Mapping[str, nn.Module] | None = None,
) -> dict[str, Any]:
    """Build and run a config (a YAML path or a :class:`RunConfig`); returns the run summary.

    ``modules`` may hold a ready ``"student"`` and/or ``"teacher"`` used instead of building them.
    """
    from .engine.build import build_run

    if not isinstance(config, RunConfig):
        config = load_config(config, overrides)
    built = build_run(config, Path(run_dir) if run_dir else None, callbacks, modules)
    try:
        return built.trainer.fit(resume=resume)
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
) -> dict[str, Any]:
    """Distill ``teacher`` into ``student`` in one stage, without a config file.

    ``student``/``teacher`` are model names (zoo, ``torchvision:``, ``timm:``) or modules; ``terms`` maps
    term names to a weight or to ``(weight, constructor arguments)``. Returns the run summary; the run
    directory (``runtime.out_dir/name``) holds the exported student, plots and ``report.md``.
    ``task="segmentation"`` with a segmentation dataset (e.g. ``data="road_scenes"``) distills dense
    predictions.
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
    return train_from_config(load_config(base=config), modules=modules)


def evaluate_student(
    run: str | Path,
    data: str | None = None,
    split: str | None = None,
    overrides: Sequence[str] = (),
    root: str | Path | None = None,
) -> dict[str, float]:
    """Metrics of an exported student on a dataset split (default: its run's eval split): top-1, top-5
    and loss for classification; mIoU, per-class IoU, pixel accuracy, per-image mIoU variance and
    HP-Acc for segmentation (with the run's ``evaluation`` settings)."""
    from .data import build_dataset
    from .data.augment import BatchAugment
    from .deploy.export import load_student
    from .engine.batches import Batches
    from .engine.distributed import DistInfo, resolve_device
    from .engine.tasks import build_task

    run = Path(run)
    model, spec = load_student(run)
    run_dir = run if run.is_dir() else run.parent
    config_path = run_dir / "config.yaml"
    base = load_config(config_path, overrides) if config_path.is_file() else None
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
    task = build_task(kind, dataset, base.evaluation if base is not None else None)
    device = resolve_device("auto")
    model.to(device)
    augment = BatchAugment(0, False, spec.mean, spec.std)
    batch = data_config.eval_batch_size if data_config is not None else 64
    batches = Batches(dataset, batch, DistInfo(), train=False)
    return task.evaluate(model, batches, lambda x: augment.normalize(x.to(device)), device, "fp32")


def evaluate_styles(
    run: str | Path,
    styles: Sequence[str] = (),
    folders: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Robustness to style shift: the student's metric on the same test set rendered in each of
    ``styles`` (datasets with a ``styles`` parameter: ``embedded``, ``road_scenes``), or on each of
    ``folders`` (test sets of the run's dataset type), with the drop from the training style.

    Writes ``styles.md``, ``styles.json`` and ``styles.png`` into ``out`` (default: the run
    directory); returns ``{"metric", "train_style", "rows": [{"style", <metric>, "drop"}...]}``.
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
        results[style] = evaluate_student(run, overrides=[*overrides, f"data.eval_params.styles=[{style}]"])
    for folder in folders:
        results[str(folder)] = evaluate_student(run, overrides=overrides, root=folder)
    metric = "top1" if "top1" in next(iter(results.values())) else "miou"
    reference = results.get(trained[0], next(iter(results.values())))[metric]
    rows = [{"style": name, metric: r[metric], "drop": reference - r[metric]} for name, r in results.items()]
    out = Path(out) if out is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    plot_styles(
        rows, metric, out / "styles.png", f"{run_dir.name}: {metric} per style (trained on {trained[0]})"
    )
    label = "top-1 (%)" if metric == "top1" else "mIoU (%)"
    table = markdown_table(
        ["style", label, f"drop from {trained[0]}"],
        [[r["style"], f"{r[metric]:.2f}", f"{r['drop']:+.2f}"] for r in rows],
    )
    report = {"metric": metric, "train_style": trained[0], "rows": rows}
    atomic_write_text(out / "styles.json", json.dumps(report, indent=1))
    atomic_write_text(out / "styles.md", f"# {run_dir.name} per style\n\n{table}\n\n![styles](styles.png)\n")
    return report


def inspect_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Build a run without training: tap shapes, connectors, parameter counts, module shapes."""
    from .engine.build import build_run
    from .taps import module_shapes

    config = load_config(path, overrides)
    built = build_run(config, callbacks=[])
    distiller = built.trainer.distiller
    sample = built.trainer.prepare_eval(
        torch.stack([built.trainer.stages[0].eval_data[i][0] for i in range(2)])
    )
    report: dict[str, Any] = {"connectors": []}
    roles = [("student", distiller.student, config.student.name)]
    if distiller.teacher is not None and config.teacher is not None:
        roles.insert(0, ("teacher", distiller.teacher, config.teacher.name))
    for role, model, name in roles:
        report[role] = {
            "name": name,
            "params": sum(p.numel() for p in model.parameters()),
            "taps": built.shapes.get(role, {}),
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


@torch.no_grad()
def predict_images(
    run: str | Path, images: Sequence[str | Path], top: int = 3
) -> list[list[tuple[str, float]]]:
    """The ``top`` most probable classes of each image file, as (class name, probability) pairs."""
    from .data.augment import BatchAugment
    from .data.folders import load_image
    from .deploy.export import load_student

    model, spec = load_student(run)
    size = spec.image_size
    batch = torch.stack([load_image(Path(p), size[0] if size else None) for p in images])
    probs = model(BatchAugment(0, False, spec.mean, spec.std).normalize(batch)).softmax(1)
    names = spec.classes or [str(i) for i in range(spec.num_classes)]
    values, indices = probs.topk(min(top, probs.shape[1]), dim=1)
    ranked = zip(values.tolist(), indices.tolist())
    return [[(names[i], float(v)) for v, i in zip(vs, ix)] for vs, ix in ranked]
