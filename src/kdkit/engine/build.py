"""From a validated :class:`~kdkit.config.RunConfig` to live objects: data, models, terms, stages, trainer.

The config is only a view of these constructors; everything here can be built in Python directly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import AugmentConfig, DataConfig, ModelConfig, RunConfig, TermConfig, dump_config
from ..data import build_dataset
from ..data.draws import sample_keys
from ..data.mixing import MixedDataset
from ..deploy.export import ModelSpec
from ..errors import ConfigError
from ..models import build_model, load_weights
from ..refiners import RefinerContext
from ..registry import REFINERS, TERMS
from ..taps import main_output
from ..terms.base import LOGITS
from .callbacks import Callback, ProgressBar
from .distiller import Distiller, WeightedTerm
from .distributed import init_distributed, resolve_device, sync_batchnorm
from .evaluate import resolve_precision
from .refining import Refining
from .stages import Stage
from .tasks import build_task
from .teacher_cache import stage_caches
from .teacher_input import attach_teacher_input
from .trainer import Trainer


class DataCache:
    """Builds each (dataset, split, params) once per run."""

    def __init__(self) -> None:
        self._built: dict[str, Any] = {}

    def get(self, data: DataConfig, split: str, params: dict[str, Any]) -> Any:
        key = json.dumps([data.name, data.root, split, params], sort_keys=True, default=str)
        if key not in self._built:
            self._built[key] = build_dataset(data.name, split, root=data.root, **params)
        return self._built[key]

    def train(self, data: DataConfig) -> Any:
        """The training split, with ``data.mix`` images mixed in when set (see :mod:`kdkit.data.mixing`)."""
        train = self.get(data, data.train_split, data.params)
        if data.mix is None:
            return train
        mix = data.mix
        other = self.get(DataConfig(name=mix.name, root=mix.root), mix.split, mix.params)
        return MixedDataset(train, other, mix.ratio)

    def eval(self, data: DataConfig) -> Any:
        return self.get(data, data.eval_split, {**data.params, **data.eval_params})


def build_network(config: ModelConfig, num_classes: int, role: str) -> nn.Module:
    """A model from its config entry, with weights loaded when given."""
    try:
        model = build_model(config.name, num_classes=config.num_classes or num_classes, **config.kwargs)
    except TypeError as exc:
        raise ConfigError(f"{role}.kwargs: {exc}") from None
    if config.weights is not None:
        load_weights(model, config.weights)
    return model


def build_terms(terms: list[TermConfig], where: str) -> list[WeightedTerm]:
    built = []
    for i, term in enumerate(terms):
        try:
            module = TERMS.build(term.name, **term.params)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}[{i}] ({term.name}): {exc}") from None
        built.append(WeightedTerm(term.name, term.weight, module))
    return built


def build_refiners(
    config: RunConfig,
    task: Any,
    device: torch.device,
    cache: DataCache,
    stage_terms: list[list[WeightedTerm]],
) -> list[nn.Module]:
    """The run's data refiners, set up with the task's normalisation and a dataset builder."""
    context = RefinerContext(
        task=task.name,
        mean=task.mean,
        std=task.std,
        device=device,
        build_dataset=lambda name, root, split, params: cache.get(
            DataConfig(name=name, root=root), split, params
        ),
        label_terms=sorted({wt.name for terms in stage_terms for wt in terms if wt.term.needs_labels}),
        ignore_index=getattr(task, "ignore_index", -100),
        seed=config.runtime.seed,
        train_data=cache.train(config.data),
    )
    refiners = []
    for i, entry in enumerate(config.refiners):
        try:
            refiner = REFINERS.build(entry.name, **entry.params)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"refiners[{i}] ({entry.name}): {exc}") from None
        refiner.setup(context)
        refiners.append(refiner)
    return refiners


def model_spec(
    config: ModelConfig,
    num_classes: int,
    dataset: Any,
    task: str = "classification",
    size: tuple[int, int] | None = None,
) -> ModelSpec:
    """What rebuilds and feeds the trained network; ``size``: its input size (default: the dataset's)."""
    images = getattr(dataset, "images", None)
    size = size or (tuple(images.shape[-2:]) if images is not None else None)
    return ModelSpec(
        model=config.name,
        num_classes=config.num_classes or num_classes,
        kwargs=dict(config.kwargs),
        mean=tuple(dataset.mean),
        std=tuple(dataset.std),
        classes=list(dataset.classes),
        image_size=size,
        task=task,
    )


def input_size(augment: AugmentConfig, dataset: Any) -> tuple[int, int] | None:
    """The training input size: the augment section's ``crop``, else the size of an in-memory
    dataset's images (None for differently sized images on disk)."""
    if augment.crop is not None:
        return tuple(augment.crop)
    images = getattr(dataset, "images", None)
    return tuple(images.shape[-2:]) if isinstance(images, torch.Tensor) else None


@torch.no_grad()
def predicts_classes(model: nn.Module, sample: torch.Tensor, num_classes: int) -> bool:
    """Whether ``model`` outputs class scores (``[B, C]`` or ``[B, C, H, W]``, or a detector of
    ``num_classes``): a feature-only teacher, e.g. a foundation-model encoder returning tokens (patent
    [0040]), is distilled but not evaluated."""
    if callable(getattr(model, "detect", None)):
        return getattr(model, "num_classes", None) == num_classes
    out = main_output(model(sample[:1]))
    return out.dim() in (2, 4) and out.shape[1] == num_classes


def dry_run_batch(trainer: Trainer, stage: Stage) -> torch.Tensor:
    """Two training images as the first stage's augmentation shapes them (connectors are built
    from the shapes training produces, e.g. the segmentation crop)."""
    items = [stage.train_data[i] for i in range(min(2, len(stage.train_data)))]
    images, labels = [im for im, _ in items], [lb for _, lb in items]
    decode = trainer.task.decoder(stage.augment)
    if decode is not None:
        images = [decode(image, i) for i, image in enumerate(images)]
    if trainer.task.name == "classification":
        images, labels = torch.stack(images), torch.as_tensor([int(lb) for lb in labels])
    augment = trainer.task.augmenter(stage.augment)
    batch, _ = augment(images, labels, sample_keys(range(len(items)), "dry-run"))
    return batch.to(trainer.device).contiguous(memory_format=trainer.memory_format)


@dataclass
class BuiltRun:
    trainer: Trainer
    config: RunConfig
    shapes: dict[str, dict[str, torch.Size]]
    spec: ModelSpec


def run_directory(config: RunConfig) -> Path:
    return Path(config.runtime.out_dir) / config.name


def build_run(
    config: RunConfig,
    run_dir: Path | None = None,
    callbacks: list[Callback] | None = None,
    modules: Mapping[str, nn.Module] | None = None,
) -> BuiltRun:
    """Build data, models, terms and the trainer of a run (joining a torchrun process group if any).

    ``modules`` may hold a ready ``"student"``/``"teacher"`` to use instead of building from the config.
    """
    modules = dict(modules or {})
    device = resolve_device(config.runtime.device, config.runtime.threads)
    if config.runtime.precision == "auto":  # the resolved precision is what config.yaml records
        precision = resolve_precision("auto", device)
        runtime = config.runtime.model_copy(update={"precision": precision})
        config = config.model_copy(update={"runtime": runtime})
    runtime = config.runtime
    info = init_distributed(device)
    if runtime.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(runtime.seed)
    cache = DataCache()
    first = cache.train(config.data)
    task = build_task(config.task, first, config.evaluation, input_size(config.data.augment, first))
    num_classes = first.num_classes
    student = modules.get("student") or build_network(config.student, num_classes, "student")
    teacher = None
    if config.teacher is not None:
        teacher = modules.get("teacher") or build_network(config.teacher, num_classes, "teacher")
        if "teacher" in modules and config.teacher.weights is not None:
            load_weights(teacher, config.teacher.weights)
        attach_teacher_input(teacher, first.mean, first.std, config.teacher.weights, config.teacher.input)
    task.check_models(student, teacher)
    stage_terms = [
        build_terms(config.stage_terms(s), f"stages[{i}].terms") for i, s in enumerate(config.stages)
    ]
    refiners = build_refiners(config, task, device, cache, stage_terms)
    if info.active and runtime.sync_batchnorm:
        student = sync_batchnorm(student, device)
    distiller = Distiller(student, teacher, stage_terms)
    distiller.to(device)
    if runtime.channels_last:
        distiller.to(memory_format=torch.channels_last)
    stages = []
    for i, stage in enumerate(config.stages):
        data = config.stage_data(stage)
        stages.append(
            Stage(
                name=stage.name,
                terms=stage_terms[i],
                train_data=cache.train(data),
                eval_data=cache.eval(data),
                epochs=stage.epochs,
                steps=stage.steps,
                optimizer=stage.optimizer,
                schedule=stage.schedule,
                train=stage.train,
                eval_every=stage.eval_every,
                batch_size=data.batch_size,
                eval_batch_size=data.eval_batch_size,
                num_workers=data.num_workers,
                augment=data.augment,
            )
        )
    run_dir = run_dir or run_directory(config)
    crop = config.data.augment.resized_crop  # classification from differently sized images: the crop's size
    size = getattr(task, "size", None) or ((crop.size, crop.size) if crop is not None else None)
    spec = model_spec(config.student, num_classes, first, task.name, size)
    from ..report.outputs import RunOutputs  # report imports the engine; import late

    extra = list(callbacks) if callbacks is not None else ([ProgressBar()] if runtime.progress else [])
    trainer = Trainer(
        distiller,
        stages,
        runtime,
        run_dir,
        num_classes=num_classes,
        mean=first.mean,
        std=first.std,
        info=info,
        device=device,
        callbacks=[*extra, RunOutputs(spec, dump_config(config))],
        name=config.name,
        task=task,
        evaluate_teacher=config.teacher is not None and config.teacher.num_classes in (None, num_classes),
        refining=Refining(refiners, config.refiners),
    )
    sample = dry_run_batch(trainer, stages[0])
    for stage in stages:
        for wt in stage.terms:
            labels = getattr(stage.train_data, "labels", None)  # classification: one class per sample
            labels = labels if isinstance(labels, torch.Tensor) and labels.dim() == 1 else None
            wt.term.bind_data(len(stage.train_data), labels)
    for refiner in refiners:
        refiner.prepare(tuple(sample.shape[-2:]))
    shapes = distiller.setup(sample)
    logits = shapes.get("teacher", {}).get(LOGITS)
    trainer.teacher_caches = stage_caches(
        config, teacher, stages, trainer.refining, task.name, logits[1] if logits is not None else None
    )
    trainer.refining.bind_features(distiller, shapes.get("teacher", {}), [s.name for s in config.stages])
    if teacher is not None and trainer.evaluate_teacher:
        trainer.evaluate_teacher = predicts_classes(teacher, sample, num_classes)
    distiller.to(device)  # connectors built by setup
    if runtime.channels_last:
        distiller.to(memory_format=torch.channels_last)
    if runtime.compile:
        student.compile()
        if teacher is not None:
            teacher.compile()
    return BuiltRun(trainer, config, shapes, spec)
