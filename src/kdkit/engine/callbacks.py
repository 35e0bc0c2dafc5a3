"""Training events as empty-method callbacks (logging, progress bars, reports hook in here)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

if TYPE_CHECKING:
    from .trainer import Stage, Trainer


class Callback:
    """Override any of these; each is called on every process unless noted."""

    def on_run_start(self, trainer: Trainer) -> None: ...

    def on_stage_start(self, trainer: Trainer, stage: Stage, total_steps: int, done_steps: int) -> None: ...

    def on_step_end(self, trainer: Trainer, stage: Stage, step: int) -> None: ...

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """A metrics record (``kind`` = train, eval, teacher_eval); rank 0 only."""

    def on_stage_end(self, trainer: Trainer, stage: Stage) -> None: ...

    def on_run_end(self, trainer: Trainer, summary: dict[str, Any]) -> None: ...


class ProgressBar(Callback):
    """A rich progress bar per stage with the latest loss, accuracy and throughput (rank 0)."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.task = None
        self.latest = ""

    def on_stage_start(self, trainer: Trainer, stage: Stage, total_steps: int, done_steps: int) -> None:
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

    def on_step_end(self, trainer: Trainer, stage: Stage, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, status=self.latest)

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if record["kind"] == "train":
            self.latest = f"loss {record['loss']:.3f}  {record['images_per_s']:.0f} img/s"
        elif record["kind"] == "eval":
            metric = trainer.task.metric
            self.latest += f"  {metric} {record[metric]:.2f}"

    def on_stage_end(self, trainer: Trainer, stage: Stage) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
