"""Training events as empty-method callbacks (logging, progress, reports hook in here).

This module imports nothing from the trainer: callbacks see the trainer and its stages through the
:class:`TrainerView` and :class:`StageView` protocols (the attributes they may read), so
``trainer -> callbacks`` is the only direction of import.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class StageView(Protocol):
    """What a callback may read of a stage (:class:`kdkit.engine.trainer.Stage`)."""

    name: str
    epochs: int | None
    steps: int | None


class TrainerView(Protocol):
    """What a callback may read of the trainer (:class:`kdkit.engine.trainer.Trainer`)."""

    name: str
    info: Any  # DistInfo: ``main`` is true on rank 0
    task: Any  # the task: ``metric`` names the headline metric
    run_dir: Any
    history: list[dict[str, Any]]
    distiller: Any
    stages: list[Any]
    refiners: list[Any]


class Callback:
    """Override any of these; each is called on every process unless noted."""

    def on_run_start(self, trainer: TrainerView) -> None: ...

    def on_stage_start(
        self, trainer: TrainerView, stage: StageView, total_steps: int, done_steps: int
    ) -> None: ...

    def on_step_end(self, trainer: TrainerView, stage: StageView, step: int) -> None: ...

    def on_log(self, trainer: TrainerView, record: dict[str, Any]) -> None:
        """A metrics record (``kind`` = train, eval, teacher_eval, teacher_cache); rank 0 only."""

    def on_stage_end(self, trainer: TrainerView, stage: StageView) -> None: ...

    def on_run_end(self, trainer: TrainerView, summary: dict[str, Any]) -> None: ...


class LogLines(Callback):
    """Plain progress lines for a log file or a pipe (rank 0), where a progress bar shows nothing.

    One line at each epoch end (for a step-based stage, at each evaluation) and otherwise at most
    every ``every_s`` seconds, e.g.::

        [kd] main epoch 3/12 step 237/948 loss 1.2345 812 img/s top1 41.20 (epoch 3) 0:01:15

    with the stage, epoch, step out of the stage's total, the mean training loss since the last train
    record, images per second, the latest evaluation (and when it was) and the time since the stage
    started. Lines are flushed at once.
    """

    def __init__(self, stream: TextIO | None = None, every_s: float = 30.0) -> None:
        self.stream = stream
        self.every_s = every_s
        self._reset()

    def _reset(self) -> None:
        self.stage: StageView | None = None
        self.total = 0
        self.per_epoch: float | None = None
        self.started = self.last_line = time.monotonic()
        self.train: dict[str, Any] | None = None
        self.metric: str | None = None

    def _write(self, text: str) -> None:
        stream = self.stream or sys.stdout
        stream.write(text + "\n")
        stream.flush()

    def on_stage_start(
        self, trainer: TrainerView, stage: StageView, total_steps: int, done_steps: int
    ) -> None:
        if not trainer.info.main:
            return
        self._reset()
        self.stage, self.total = stage, total_steps
        self.per_epoch = total_steps / stage.epochs if stage.epochs else None
        where = f" from step {done_steps}" if done_steps else ""
        self._write(f"[{trainer.name}] {stage.name}: {total_steps} steps{where}")

    def _line(self, trainer: TrainerView, step: int) -> str:
        assert self.stage is not None
        parts = [f"[{trainer.name}] {self.stage.name}"]
        if self.per_epoch:
            parts.append(f"epoch {step / self.per_epoch:.4g}/{self.stage.epochs}")
        parts.append(f"step {step}/{self.total}")
        if self.train is not None:
            parts.append(f"loss {self.train['loss']:.4f} {self.train['images_per_s']:.0f} img/s")
        if self.metric:
            parts.append(self.metric)
        elapsed = int(time.monotonic() - self.started)
        parts.append(f"{elapsed // 3600}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}")
        return " ".join(parts)

    def on_log(self, trainer: TrainerView, record: dict[str, Any]) -> None:
        kind = record["kind"]
        if kind == "teacher_eval":
            metric = trainer.task.metric
            self._write(f"[{trainer.name}] teacher {metric} {record[metric]:.2f}")
        if kind == "teacher_cache":
            self._write(f"[{trainer.name}] {record['stage']}: {record['text']}")
        if self.stage is None:
            return
        if kind == "train":
            self.train = record
            epoch_end = self.per_epoch is not None and float(record["epoch"]).is_integer()
            due = time.monotonic() - self.last_line >= self.every_s
            if epoch_end or due or record["step"] == self.total:
                self._emit(trainer, record["step"])
        elif kind == "eval":
            metric = trainer.task.metric
            when = f"epoch {record['epoch']:.4g}" if self.per_epoch else f"step {record['step']}"
            self.metric = f"{metric} {record[metric]:.2f} ({when})"
            self._emit(trainer, record["step"])

    def _emit(self, trainer: TrainerView, step: int) -> None:
        self._write(self._line(trainer, step))
        self.last_line = time.monotonic()

    def on_stage_end(self, trainer: TrainerView, stage: StageView) -> None:
        self.stage = None


class ProgressBar(Callback):
    """Progress of each stage with the latest loss, metric and throughput (rank 0).

    On a terminal, a rich progress bar; otherwise (output to a log file or a pipe) plain lines from
    :class:`LogLines`, since a bar drawn on a non-terminal shows nothing until the stage ends.
    ``plain`` forces one or the other (default: ``not sys.stdout.isatty()``).
    """

    def __init__(self, plain: bool | None = None, stream: TextIO | None = None) -> None:
        if plain is None:
            isatty = getattr(stream or sys.stdout, "isatty", None)
            plain = not (isatty is not None and isatty())
        self.lines = LogLines(stream) if plain else None
        self.progress: Progress | None = None
        self.task = None
        self.latest = ""

    def on_stage_start(
        self, trainer: TrainerView, stage: StageView, total_steps: int, done_steps: int
    ) -> None:
        if self.lines is not None:
            self.lines.on_stage_start(trainer, stage, total_steps, done_steps)
            return
        if not trainer.info.main:
            return
        self.progress = Progress(
            TextColumn(f"[bold]{trainer.name}[/] {stage.name}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(stage.name, total=total_steps, completed=done_steps, status="")

    def on_step_end(self, trainer: TrainerView, stage: StageView, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, status=self.latest)

    def on_log(self, trainer: TrainerView, record: dict[str, Any]) -> None:
        if self.lines is not None:
            self.lines.on_log(trainer, record)
        elif record["kind"] == "teacher_cache":
            (self.progress.console if self.progress is not None else Console()).print(
                f"[{trainer.name}] {record['stage']}: {record['text']}", markup=False, highlight=False
            )
        elif record["kind"] == "train":
            self.latest = f"loss {record['loss']:.3f}  {record['images_per_s']:.0f} img/s"
        elif record["kind"] == "eval":
            metric = trainer.task.metric
            self.latest += f"  {metric} {record[metric]:.2f}"

    def on_stage_end(self, trainer: TrainerView, stage: StageView) -> None:
        if self.lines is not None:
            self.lines.on_stage_end(trainer, stage)
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
