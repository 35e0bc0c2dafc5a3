"""The stage-based trainer: one loop for every method.

A run is a list of :class:`Stage`; each sets its data, terms with weights, which student parameters
train (glob patterns on parameter names), optimizer, schedule, length (epochs or steps) and evaluation
interval. The loop counts steps; every random choice derives from ``(seed, stage, epoch, step)`` (see
:mod:`kdkit.engine.batches`), so a resumed run repeats an uninterrupted one exactly in deterministic mode.

Step numbers: ``step`` counts the optimizer steps completed in the current stage, in ``metrics.jsonl``,
in checkpoints and in error messages alike. Step N is the N-th update: "non-finite loss at step N" means
the N-th update was refused (``metrics.jsonl`` holds steps up to N - 1), "the state after step N" the
parameters that the N-th update produced.

Safety: the loss is checked for NaN/inf at every step, and the whole training state at every save point,
before evaluating and saving; checkpoints go through :class:`~kdkit.engine.keeper.CheckpointKeeper`
(pending -> last once a forward pass from them was finite). The run directory is claimed for the run's
lifetime (:mod:`kdkit.engine.rundir`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import RuntimeConfig
from ..data.augment import BatchAugment
from ..errors import KdkitError
from .batches import Batches, augment_batch, derive_seed, repeat_indices
from .callbacks import Callback
from .checkpoint import DiskFullError, atomic_write_json, is_disk_full, position
from .distiller import Distiller
from .distributed import DistInfo, barrier
from .evaluate import autocast
from .keeper import CheckpointKeeper, training_tensors
from .refining import FrozenModels, Refining
from .rundir import claim_for_run
from .schedule import lr_factor
from .stages import Stage, build_optimizer, select_parameters
from .summary import run_summary
from .tasks import ClassificationTask
from .teacher_cache import TeacherCache
from .trainlog import TrainWindow


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
        refining: Refining | None = None,
        teacher_caches: dict[int, TeacherCache | str] | None = None,
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
        self.refining = refining or Refining([], [])  # data refiners, applied after augmentation
        # per stage: its teacher-output cache, or why the teacher runs live although the cache is on
        self.teacher_caches = dict(teacher_caches or {})
        self._normalize = BatchAugment(0, False, self.mean, self.std)
        self.memory_format = torch.channels_last if runtime.channels_last else torch.contiguous_format
        self.history: list[dict[str, Any]] = []
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.keeper = CheckpointKeeper(self.run_dir, self.info, self.device)
        self.optimizer: torch.optim.Optimizer | None = None  # None in a stage that trains no student part

    # ------------------------------------------------------------------ helpers

    def prepare_eval(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> normalised float input on the device, in the run's memory format."""
        return self._normalize.normalize(images.to(self.device)).contiguous(memory_format=self.memory_format)

    def log(self, record: dict[str, Any]) -> None:
        if not self.info.main:
            return
        self.history.append(record)
        try:
            with self.metrics_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFullError(self.metrics_path) from None
            raise
        for callback in self.callbacks:
            callback.on_log(self, record)

    def _emit(self, event: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self, *args)

    @staticmethod
    def stage_length(stage: Stage, steps_per_epoch: int) -> int:
        return stage.steps if stage.steps is not None else stage.epochs * steps_per_epoch  # type: ignore[operator]

    # ------------------------------------------------------------------ state

    def _state(
        self, stage_index: int, step: int, per_epoch: int, optimizer: torch.optim.Optimizer | None
    ) -> dict[str, Any]:
        return {
            "stage": stage_index,
            "stage_name": self.stages[stage_index].name,
            "step": step,  # optimizer steps completed in this stage, as metrics.jsonl counts them
            "epoch": step / per_epoch,
            "student": self.distiller.student.state_dict(),
            "terms": self.distiller.terms.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "refiners": self.refining.state_dict(),
            "metrics_bytes": self.metrics_path.stat().st_size if self.metrics_path.exists() else 0,
        }

    def _save(
        self, stage_index: int, step: int, per_epoch: int, optimizer: torch.optim.Optimizer | None
    ) -> None:
        """Write ``checkpoints/pending.pt`` (rank 0), promoted to ``last.pt`` by the next step's forward
        pass (:class:`~kdkit.engine.keeper.CheckpointKeeper`)."""
        state = self._state(stage_index, step, per_epoch, optimizer) if self.info.main else None
        self.keeper.save(state, position({"stage_name": self.stages[stage_index].name, "step": step}))

    def _modules(self) -> tuple[tuple[str, nn.Module], ...]:
        return (("student", self.distiller.student), ("term", self.distiller.terms), *self.refining.modules())

    def _restore(self) -> dict[str, Any]:
        state = self.keeper.load()
        self.distiller.student.load_state_dict(state["student"])
        self.distiller.terms.load_state_dict(state["terms"])
        self.refining.load_state_dict(state.get("refiners") or [])
        if self.info.main and self.metrics_path.exists():
            with self.metrics_path.open("r+b") as handle:  # drop records written after the checkpoint
                handle.truncate(state["metrics_bytes"])
            self.history = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]
        return state

    # ------------------------------------------------------------------ run

    def fit(self, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
        """Train every stage (from the last checkpoint when ``resume``); returns the summary.

        The run directory is locked until this returns or raises; one that already holds a run is
        refused unless ``resume`` (continue it) or ``overwrite`` (replace it) is set
        (:func:`~kdkit.engine.rundir.claim_run_dir`).
        """
        lock = claim_for_run(self.run_dir, self.info, resume, overwrite)
        try:
            return self._fit(resume)
        except DiskFullError as exc:
            raise KdkitError(self.keeper.disk_full(str(exc))) from None
        finally:
            if lock is not None:
                lock.release()

    def _fit(self, resume: bool) -> dict[str, Any]:
        barrier(self.info)
        state = self._restore() if resume else None
        start_stage, start_step = (state["stage"], state["step"]) if state else (0, 0)
        self._emit("on_run_start")
        if state is None and self.distiller.teacher is not None and self.evaluate_teacher:
            self._evaluate_teacher()
        for index in range(start_stage, len(self.stages)):
            resume_state = state if (state and index == start_stage) else None
            self._run_stage(index, start_step if resume_state else 0, resume_state)
        self.keeper.promote()  # the final checkpoint: nothing trains from it in this run
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
        optimizer = build_optimizer(stage.optimizer, params) if params else None
        if state is not None and optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        self.optimizer = optimizer  # the current stage's (callbacks may read it)
        model: nn.Module = self.distiller
        if self.info.active and optimizer is not None:
            model = DistributedDataParallel(self.distiller, find_unused_parameters=True)
        train = Batches.of_stage(stage, self.task, self.info, stage.batch_size, train=True)
        evals = Batches(
            stage.eval_data, stage.eval_batch_size, self.info, train=False, num_workers=stage.num_workers
        )
        augment = self.task.augmenter(stage.augment)
        per_epoch = len(train)
        total = self.stage_length(stage, per_epoch)
        by_epochs = stage.epochs is not None
        self._emit("on_stage_start", stage, total, start_step)
        cache = self.teacher_caches.get(index)
        if isinstance(cache, str):
            self.log({"kind": "teacher_cache", "stage": stage.name, "stage_index": index, "text": cache})
            cache = None
        self._train_mode()
        step = start_step
        window = TrainWindow()
        while step < total:
            epoch, offset = divmod(step, per_epoch)
            for images, labels, indices in train.epoch((seed, index, epoch), offset, indices=True):
                position = step / per_epoch if by_epochs else float(step)
                length = float(stage.epochs) if by_epochs else float(total)  # type: ignore[arg-type]
                lr = stage.optimizer.lr * lr_factor(stage.schedule, position, length)
                for group in optimizer.param_groups if optimizer is not None else ():
                    group["lr"] = lr
                torch.manual_seed(derive_seed(seed, "global", index, epoch, step, self.info.rank))
                images, labels = augment_batch(
                    augment, images, labels, indices, self.device, (seed, index, epoch)
                )
                self._refiner_phases(index, stage, images, labels, step, per_epoch, length)
                images, labels = self.refining.apply(
                    stage.name, images, labels, (seed, index, epoch, step), self.info
                )
                images = images.contiguous(memory_format=self.memory_format)
                if optimizer is not None:
                    indices = repeat_indices(indices.to(self.device), images.shape[0])
                    refine = self.refining.feature_refine(stage.name, (seed, index, epoch, step), self.info)
                    with autocast(self.device, self.runtime.precision):
                        replay = None
                        if cache is not None:
                            run = partial(self.distiller.teacher_logits, images)
                            replay = cache.teacher_logits(epoch, indices, run)
                        progress = step / per_epoch
                        loss, parts, _ = model(images, labels, epoch, progress, indices, refine, replay)
                    self._check_finite(loss, parts, index, stage, step, per_epoch)
                if self.keeper.pending is not None:
                    where = f"in the forward pass of step {step + 1} of stage '{stage.name}'"
                    where += f" (epoch {(step + 1) / per_epoch:.2f})"
                    self.keeper.verify(self._modules(), where, index)
                if optimizer is not None:
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    window.add(images.shape[0] * self.info.world, loss, parts)
                step += 1
                log_due = step % self.runtime.log_every == 0 or step == total or step % per_epoch == 0
                if log_due and window.steps:
                    self._log_train(index, stage, step, per_epoch, lr, window)
                    window = TrainWindow()
                self._emit("on_step_end", stage, step)
                eval_due = self._eval_due(stage, step, per_epoch, total, by_epochs)
                every = self.runtime.checkpoint_every_steps
                if eval_due or (every and step % every == 0):
                    where = f"after step {step} of stage '{stage.name}' (epoch {step / per_epoch:.2f})"
                    optimizers = [optimizer, *self.refining.optimizers()]
                    self.keeper.check(training_tensors(self._modules(), optimizers), where, index)
                    if eval_due:
                        self._evaluate(index, stage, step, per_epoch, evals)
                    self._save(index, step, per_epoch, optimizer)
                if step >= total:
                    break
        if cache is not None:
            self.log({"kind": "teacher_cache", "stage": stage.name, "stage_index": index, **cache.counts()})
        self._emit("on_stage_end", stage)

    def _refiner_phases(
        self,
        index: int,
        stage: Stage,
        images: torch.Tensor,
        labels: Any,
        step: int,
        per_epoch: int,
        length: float,
    ) -> None:
        """The refiner phases due before student step ``step + 1`` (:meth:`Refining.phases`), with the
        distiller in eval mode; one ``refiner`` record per phase in metrics.jsonl."""
        slots = self.refining.due(stage.name, step, per_epoch)
        if not slots:
            return
        position = step / per_epoch if stage.epochs is not None else float(step)
        self.distiller.eval()
        try:
            with autocast(self.device, self.runtime.precision):
                records = self.refining.phases(
                    slots,
                    FrozenModels(self.distiller),
                    images.contiguous(memory_format=self.memory_format),
                    labels,
                    (self.runtime.seed, index, step // per_epoch, step),
                    (position, length),
                    self.info,
                )
        finally:
            self._train_mode()
        where = {"stage": stage.name, "stage_index": index, "step": step, "epoch": step / per_epoch}
        for record in records:
            self.log({**record, **where})

    def _eval_due(self, stage: Stage, step: int, per_epoch: int, total: int, by_epochs: bool) -> bool:
        if step == total:
            return True
        if by_epochs:
            return step % per_epoch == 0 and (step // per_epoch) % stage.eval_every == 0
        return step % stage.eval_every == 0

    def _check_finite(
        self,
        loss: torch.Tensor,
        parts: dict[str, torch.Tensor],
        index: int,
        stage: Stage,
        done: int,
        per_epoch: int,
    ) -> None:
        """Refuse update number ``done + 1`` when its loss is NaN/inf; the message shows each term as
        value x weight = weighted value (a huge weight overflows the total while each value is finite)."""
        bad = not bool(torch.isfinite(loss.detach()).item())
        if self.info.active:
            flag = torch.tensor([1.0 if bad else 0.0], device=self.device)
            torch.distributed.all_reduce(flag)
            bad = flag.item() > 0
        if bad:
            dropped = self.keeper.discard()  # the state it was saved from gives this non-finite loss
            weights = {wt.name: wt.weight for wt in self.distiller.active_terms()}
            terms = ", ".join(
                f"{k} {float(v):.4g} x {weights.get(k, 1.0):.4g} = {weights.get(k, 1.0) * float(v):.4g}"
                for k, v in parts.items()
            )
            step = done + 1
            raise KdkitError(
                f"non-finite loss {float(loss.detach()):.4g} at step {step} of stage '{stage.name}' "
                f"(epoch {step / per_epoch:.2f}; terms as value x weight = weighted: {terms}). "
                f"{dropped}{self.keeper.resume_hint(index)}"
            )

    def _log_train(
        self, index: int, stage: Stage, step: int, per_epoch: int, lr: float, window: TrainWindow
    ) -> None:
        where = {"stage": stage.name, "stage_index": index, "step": step, "epoch": step / per_epoch, "lr": lr}
        self.log({"kind": "train", **where, **window.means(self.info)})

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
        """The run's summary (:func:`~kdkit.engine.summary.run_summary`) from its records so far."""
        return run_summary(self.name, self.task.metric, self.history)
