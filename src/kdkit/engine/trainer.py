"""The stage-based trainer: one loop for every method.

A run is a list of :class:`Stage`; each sets its data, terms with weights, which student parameters
train (glob patterns on parameter names), optimizer, schedule, length (epochs or steps) and evaluation
interval. The loop counts steps; every random choice derives from ``(seed, stage, epoch, step)`` (see
:mod:`kdkit.engine.batches`), so a resumed run repeats an uninterrupted one exactly in deterministic mode.
"""

from __future__ import annotations

import fnmatch
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import AugmentConfig, OptimizerConfig, RuntimeConfig, ScheduleConfig
from ..data.augment import BatchAugment
from ..errors import KdkitError
from ..registry import did_you_mean
from .batches import Batches, derive_seed, generator
from .callbacks import Callback
from .checkpoint import atomic_write_json, load_checkpoint, save_checkpoint
from .distiller import Distiller, WeightedTerm
from .distributed import DistInfo, all_mean, barrier
from .evaluate import autocast
from .schedule import lr_factor
from .tasks import ClassificationTask


@dataclass
class Stage:
    """One stage of a run (see :class:`kdkit.config.StageConfig` for the YAML view)."""

    name: str
    terms: list[WeightedTerm]
    train_data: Any
    eval_data: Any
    epochs: int | None = None
    steps: int | None = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: Sequence[str] = ("*",)
    eval_every: int = 1
    batch_size: int = 128
    eval_batch_size: int = 256
    num_workers: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def select_parameters(model: nn.Module, patterns: Sequence[str], stage: str) -> list[str]:
    """Names of the parameters matching any glob pattern; a pattern matching nothing is an error."""
    names = [name for name, _ in model.named_parameters()]
    chosen: set[str] = set()
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise KdkitError(
                f"stage '{stage}': train pattern '{pattern}' matches no student parameter"
                f"{did_you_mean(pattern, names)}"
            )
        chosen.update(hits)
    return [n for n in names if n in chosen]


def build_optimizer(config: OptimizerConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW; weight decay skips 1-D parameters (norms, biases) only for AdamW."""
    if config.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
        )
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas)


class _Window:
    """Sums of the loss and each term over the steps since the last log record."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.steps = 0
        self.images = 0
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, images: int, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        self.steps += 1
        self.images += images
        for key, value in {"loss": loss.detach(), **parts}.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.float()


class Trainer:
    """Runs the stages of a :class:`Distiller` and writes the run directory (rank 0).

    ``run_dir`` receives ``metrics.jsonl``, ``checkpoints/last.pt`` and, at the end, what the
    callbacks write (the exported student, plots, report).
    """

    def __init__(
        self,
        distiller: Distiller,
        stages: Sequence[Stage],
        runtime: RuntimeConfig,
        run_dir: Path,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        info: DistInfo | None = None,
        device: torch.device | None = None,
        callbacks: Sequence[Callback] = (),
        name: str = "run",
        task: ClassificationTask | None = None,
        evaluate_teacher: bool = True,
        refiners: Sequence[nn.Module] = (),
    ) -> None:
        self.distiller = distiller
        self.stages = list(stages)
        self.runtime = runtime
        self.run_dir = Path(run_dir)
        self.num_classes = num_classes
        self.info = info or DistInfo()
        self.device = device or torch.device("cpu")
        self.callbacks = list(callbacks)
        self.name = name
        self.mean, self.std = tuple(mean), tuple(std)
        self.task = task or ClassificationTask(num_classes, mean, std)
        self.evaluate_teacher = evaluate_teacher  # False when the teacher predicts other classes
        self.refiners = list(refiners)  # data refiners (set up by the builder), applied after augmentation
        self._normalize = BatchAugment(0, False, self.mean, self.std)
        self.memory_format = torch.channels_last if runtime.channels_last else torch.contiguous_format
        self.history: list[dict[str, Any]] = []
        self.checkpoint_path = self.run_dir / "checkpoints" / "last.pt"
        self.metrics_path = self.run_dir / "metrics.jsonl"

    # ------------------------------------------------------------------ helpers

    def prepare_eval(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> normalised float input on the device, in the run's memory format."""
        return self._normalize.normalize(images.to(self.device)).contiguous(memory_format=self.memory_format)

    def log(self, record: dict[str, Any]) -> None:
        if not self.info.main:
            return
        self.history.append(record)
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        for callback in self.callbacks:
            callback.on_log(self, record)

    def _emit(self, event: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self, *args)

    @staticmethod
    def stage_length(stage: Stage, steps_per_epoch: int) -> int:
        return stage.steps if stage.steps is not None else stage.epochs * steps_per_epoch  # type: ignore[operator]

    # ------------------------------------------------------------------ state

    def _state(self, stage_index: int, step: int, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {
            "stage": stage_index,
            "step": step,
            "student": self.distiller.student.state_dict(),
            "terms": self.distiller.terms.state_dict(),
            "optimizer": optimizer.state_dict(),
            "metrics_bytes": self.metrics_path.stat().st_size if self.metrics_path.exists() else 0,
        }

    def _save(self, stage_index: int, step: int, optimizer: torch.optim.Optimizer) -> None:
        if self.info.main:
            save_checkpoint(self.checkpoint_path, self._state(stage_index, step, optimizer))
        barrier(self.info)

    def _restore(self) -> dict[str, Any]:
        state = load_checkpoint(self.checkpoint_path)
        self.distiller.student.load_state_dict(state["student"])
        self.distiller.terms.load_state_dict(state["terms"])
        if self.info.main and self.metrics_path.exists():
            with self.metrics_path.open("r+b") as handle:  # drop records written after the checkpoint
                handle.truncate(state["metrics_bytes"])
            self.history = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]
        return state

    # ------------------------------------------------------------------ run

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train every stage (from the last checkpoint when ``resume``); returns the summary."""
        if self.info.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not resume:
                self.metrics_path.unlink(missing_ok=True)
        barrier(self.info)
        state = self._restore() if resume else None
        start_stage, start_step = (state["stage"], state["step"]) if state else (0, 0)
        self._emit("on_run_start")
        if state is None and self.distiller.teacher is not None and self.evaluate_teacher:
            self._evaluate_teacher()
        for index in range(start_stage, len(self.stages)):
            resume_state = state if (state and index == start_stage) else None
            self._run_stage(index, start_step if resume_state else 0, resume_state)
        summary = self.summary()
        if self.info.main:
            atomic_write_json(self.run_dir / "summary.json", summary)
        self._emit("on_run_end", summary)
        return summary

    def _evaluate_teacher(self) -> None:
        stage = self.stages[0]
        batches = Batches(
            stage.eval_data, stage.eval_batch_size, self.info, train=False, num_workers=stage.num_workers
        )
        assert self.distiller.teacher is not None
        if any(wt.term.needs_teacher for wts in self.distiller.stage_terms for wt in wts):
            result = self.task.evaluate(
                self.distiller.teacher, batches, self.prepare_eval, self.device, self.runtime.precision
            )
            self.log({"kind": "teacher_eval", **result})

    def _stage_parameters(self, index: int, stage: Stage) -> list[nn.Parameter]:
        student = self.distiller.student
        chosen = set(select_parameters(student, stage.train, stage.name))
        for name, param in student.named_parameters():
            param.requires_grad_(name in chosen)
        self.distiller.stage = index
        params = [p for n, p in student.named_parameters() if n in chosen]
        return params + self.distiller.trainable_term_parameters()

    def _train_mode(self) -> None:
        """Training mode, except normalisation layers whose parameters this stage freezes: they stay
        in eval mode so a frozen part (Spirit Distillation's extractor in stage 2) keeps its statistics."""
        self.distiller.train()
        for module in self.distiller.student.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase):
                params = list(module.parameters(recurse=False))
                if params and not any(p.requires_grad for p in params):
                    module.eval()

    def _run_stage(self, index: int, start_step: int, state: dict[str, Any] | None) -> None:
        stage = self.stages[index]
        seed = self.runtime.seed
        params = self._stage_parameters(index, stage)
        optimizer = build_optimizer(stage.optimizer, params)
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
        model: nn.Module = self.distiller
        if self.info.active:
            model = DistributedDataParallel(self.distiller, find_unused_parameters=True)
        train = Batches(
            stage.train_data, stage.batch_size, self.info, train=True, num_workers=stage.num_workers
        )
        evals = Batches(
            stage.eval_data, stage.eval_batch_size, self.info, train=False, num_workers=stage.num_workers
        )
        augment = self.task.augmenter(stage.augment)
        per_epoch = len(train)
        total = self.stage_length(stage, per_epoch)
        by_epochs = stage.epochs is not None
        self._emit("on_stage_start", stage, total, start_step)
        self._train_mode()
        step = start_step
        window = _Window()
        while step < total:
            epoch, offset = divmod(step, per_epoch)
            for images, labels in train.epoch((seed, index, epoch), offset):
                position = step / per_epoch if by_epochs else float(step)
                length = float(stage.epochs) if by_epochs else float(total)  # type: ignore[arg-type]
                lr = stage.optimizer.lr * lr_factor(stage.schedule, position, length)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                torch.manual_seed(derive_seed(seed, "global", index, epoch, step, self.info.rank))
                images, labels = augment(
                    _to(images, self.device),
                    _to(labels, self.device),
                    generator("augment", seed, index, epoch, step),
                    total=stage.batch_size,
                    start=self.info.rank * train.local_batch,
                )
                for refiner in self.refiners:
                    images, labels = refiner(
                        images,
                        labels,
                        generator("refine", seed, index, epoch, step),
                        total=images.shape[0] * self.info.world,
                        start=self.info.rank * images.shape[0],
                    )
                images = images.contiguous(memory_format=self.memory_format)
                with autocast(self.device, self.runtime.precision):
                    loss, parts, _ = model(images, labels, epoch, step / per_epoch)
                self._check_finite(loss, parts, stage, epoch, step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                window.add(images.shape[0] * self.info.world, loss, parts)
                if step % self.runtime.log_every == 0 or step == total or step % per_epoch == 0:
                    self._log_train(index, stage, step, per_epoch, lr, window)
                    window = _Window()
                self._emit("on_step_end", stage, step)
                if self._eval_due(stage, step, per_epoch, total, by_epochs):
                    self._evaluate(index, stage, step, per_epoch, evals)
                    self._save(index, step, optimizer)
                elif self.runtime.checkpoint_every_steps and step % self.runtime.checkpoint_every_steps == 0:
                    self._save(index, step, optimizer)
                if step >= total:
                    break
        self._emit("on_stage_end", stage)

    def _eval_due(self, stage: Stage, step: int, per_epoch: int, total: int, by_epochs: bool) -> bool:
        if step == total:
            return True
        if by_epochs:
            return step % per_epoch == 0 and (step // per_epoch) % stage.eval_every == 0
        return step % stage.eval_every == 0

    def _check_finite(
        self, loss: torch.Tensor, parts: dict[str, torch.Tensor], stage: Stage, epoch: int, step: int
    ):
        bad = not bool(torch.isfinite(loss.detach()).item())
        if self.info.active:
            flag = torch.tensor([1.0 if bad else 0.0])
            torch.distributed.all_reduce(flag)
            bad = flag.item() > 0
        if bad:
            terms = ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
            where = (
                f"the last good checkpoint is {self.checkpoint_path}"
                if self.checkpoint_path.exists()
                else "no checkpoint yet"
            )
            raise KdkitError(
                f"non-finite loss in stage '{stage.name}', epoch {epoch}, step {step} ({terms}); {where}. "
                f"Lower the learning rate, use runtime.precision=fp32, or check the data and term weights"
            )

    def _log_train(
        self, index: int, stage: Stage, step: int, per_epoch: int, lr: float, window: _Window
    ) -> None:
        means = {key: all_mean(value / window.steps, self.info).item() for key, value in window.sums.items()}
        self.log(
            {
                "kind": "train",
                "stage": stage.name,
                "stage_index": index,
                "step": step,
                "epoch": step / per_epoch,
                "lr": lr,
                **means,
                "images_per_s": window.images / max(time.perf_counter() - window.started, 1e-9),
            }
        )

    def _evaluate(self, index: int, stage: Stage, step: int, per_epoch: int, evals: Batches) -> None:
        result = self.task.evaluate(
            self.distiller.student, evals, self.prepare_eval, self.device, self.runtime.precision
        )
        self._train_mode()
        self.log(
            {
                "kind": "eval",
                "stage": stage.name,
                "stage_index": index,
                "step": step,
                "epoch": step / per_epoch,
                **result,
            }
        )

    def summary(self) -> dict[str, Any]:
        """Best (over the last stage's evaluations) and last value of the task's metric, and the
        teacher's: ``best_top1``/``last_top1``... for classification, ``best_miou``... for segmentation."""
        metric = self.task.metric
        evals = [r for r in self.history if r["kind"] == "eval"]
        teacher = [r for r in self.history if r["kind"] == "teacher_eval"]
        if not evals:
            return {"name": self.name, "metric": metric}
        last = evals[-1]
        final_stage = [r for r in evals if r["stage_index"] == last["stage_index"]]
        best = max(final_stage, key=lambda r: r[metric])
        out = {
            "name": self.name,
            "metric": metric,
            f"last_{metric}": last[metric],
            f"best_{metric}": best[metric],
            "best_epoch": best["epoch"],
            "last_epoch": last["epoch"],
        }
        extras = ("top5",) if metric == "top1" else ("pixel_acc", "miou_var", "hp_acc")
        out.update({f"last_{key}": last[key] for key in extras})
        if teacher:
            out[f"teacher_{metric}"] = teacher[-1][metric]
        if not math.isfinite(out[f"last_{metric}"]):
            raise KdkitError(f"evaluation produced a non-finite {metric}")
        return out


def _to(value: torch.Tensor | list[torch.Tensor], device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    """Move a batch tensor, or a list of differently sized samples, to ``device``."""
    if isinstance(value, list):
        return [v.to(device) for v in value]
    return value.to(device)
