"""The callback that fills a run directory: config, exported network, plots, ``report.md`` (rank 0)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..deploy.export import ModelSpec, export_student
from ..engine.callbacks import Callback
from ..engine.checkpoint import atomic_write_text
from ..engine.tasks import METRIC_LABELS
from ..refiners.base import fit_to_size
from .dam_plots import plot_dam
from .histogram import plot_miou_histogram
from .plots import plot_accuracy, plot_losses
from .refiner_plots import plot_refiner_state, write_refined_grid
from .runreport import write_run_report
from .style_preview import write_style_preview

PREVIEW = "style_preview.png"


class RunOutputs(Callback):
    """Writes ``config.yaml`` at the start; the exported network, plots and ``report.md`` at the end.

    The trained network is labelled by its role: ``student`` when the run has a teacher, ``network``
    otherwise (a teacher being trained from labels); ``student.json`` records it as ``role``.
    """

    def __init__(self, spec: ModelSpec, config_yaml: str) -> None:
        self.spec = spec
        self.config_yaml = config_yaml

    def on_run_start(self, trainer) -> None:
        if not trainer.info.main:
            return
        atomic_write_text(trainer.run_dir / "config.yaml", self.config_yaml)
        styles = [s.refiner for s in trainer.refining.slots if hasattr(s.refiner, "styled")]
        if styles:
            data = trainer.stages[0].train_data
            images = torch.stack([data[i][0] for i in range(min(4, len(data)))])
            write_style_preview(styles[0], images, trainer.run_dir / PREVIEW)

    def on_run_end(self, trainer, summary: dict[str, Any]) -> None:
        if not trainer.info.main:
            return
        role = "student" if trainer.distiller.teacher is not None else "network"
        export_student(trainer.distiller.student, replace(self.spec, role=role), trainer.run_dir)
        metric = trainer.task.metric
        run_dir, name = trainer.run_dir, trainer.name
        title = f"{name}: {METRIC_LABELS[metric]}"
        plots = [
            plot_losses(trainer.history, run_dir / "loss.png", f"{name}: training loss"),
            plot_accuracy(trainer.history, run_dir / "accuracy.png", title, metric, label=role),
        ]
        if (run_dir / PREVIEW).is_file():
            plots.append(run_dir / PREVIEW)
        plots += self._refiner_plots(trainer)
        plots += self._dam_plots(trainer)
        plots.append(self._detection_plot(trainer, role))
        evals = [r for r in trainer.history if r["kind"] == "eval"]
        if evals and "image_miou" in evals[-1]:
            threshold = trainer.task.evaluation.hp_threshold
            series = {f"{role} (last evaluation)": evals[-1]["image_miou"]}
            plots.append(plot_miou_histogram(series, run_dir / "image_miou.png", threshold))
        notes = [line for slot in trainer.refining.slots for line in slot.refiner.report()]
        adapter = getattr(trainer.distiller.teacher, "kdkit_input", None)
        if adapter is not None:
            notes.insert(0, f"- {adapter.describe()}")
        plots = [p for p in plots if p is not None]
        write_run_report(trainer.run_dir, summary, trainer.history, plots, role=role, notes=notes)

    @staticmethod
    def _dam_plots(trainer) -> list[Path]:
        """SoKD's DAM: the heatmap and the selected areas of each ``dam`` term on 8 training images, with
        the final networks and the teacher's feature as the teacher gives it (no refiner draws)."""
        terms = [t for t in trainer.distiller.terms.values() if hasattr(t, "detect")]
        if not terms:
            return []
        data = trainer.stages[0].train_data
        images = torch.stack([data[i][0] for i in range(min(8, len(data)))])
        trainer.distiller.eval()
        try:
            view = trainer.distiller.features(trainer.prepare_eval(images))
            paths = []
            for term in terms:
                score, boxes, _ = term.detect(view.student[term.student_tap], view.teacher[term.teacher_tap])
                path = trainer.run_dir / f"dam_{term.teacher_tap.replace(':', '_')}.png"
                paths.append(plot_dam(images, score, boxes, tuple(score.shape[-2:]), path))
        finally:
            trainer._train_mode()
        return paths

    @staticmethod
    @torch.no_grad()
    def _detection_plot(trainer, role: str) -> Path | None:
        """A detector's boxes on 6 test images (``detections.png``), ground truth above its predictions."""
        model = trainer.distiller.student
        data = trainer.stages[0].eval_data
        if not callable(getattr(model, "detect", None)) or not len(data):
            return None
        from ..data.det_base import unpad
        from .boxes import detection_grid

        items = [data[i] for i in range(min(6, len(data)))]
        if any(image.shape != items[0][0].shape for image, _ in items):
            items = [item for item in items if item[0].shape == items[0][0].shape]
        images = torch.stack([image for image, _ in items])
        model.eval()
        try:
            found = model.detect(model(trainer.prepare_eval(images)))
        finally:
            trainer._train_mode()
        found = [{k: v.cpu() for k, v in det.items()} for det in found]
        classes = list(getattr(data, "classes", [])) or [str(i) for i in range(trainer.task.num_classes)]
        path = trainer.run_dir / "detections.png"
        return detection_grid(images, found, [unpad(t) for _, t in items], classes, path)

    @staticmethod
    def _refiner_plots(trainer) -> list[Path | None]:
        """Each learnable refiner's logged parameters over its updates, and a grid of x and x_hat."""
        plots: list[Path | None] = []
        data = trainer.stages[0].train_data
        for slot in trainer.refining.learning():
            name = slot.config.name
            plots.append(plot_refiner_state(trainer.history, name, trainer.run_dir / f"refiner_{name}.png"))
            if hasattr(slot.refiner, "augment"):
                size = slot.refiner.size or tuple(data[0][0].shape[-2:])
                items = [data[i] for i in range(min(8, len(data)))]
                images = torch.stack([fit_to_size(image, size) for image, _ in items])
                targets, classes = None, None
                if trainer.task.name == "detection" and all(tuple(x.shape[-2:]) == size for x, _ in items):
                    from ..data.det_base import pad_targets, unpad

                    targets = pad_targets([unpad(t) for _, t in items])
                    classes = list(getattr(data, "classes", [])) or None
                grid = trainer.run_dir / f"refined_{name}.png"
                plots.append(write_refined_grid(slot.refiner, images, grid, targets=targets, classes=classes))
        return plots
