"""The distiller: a student, a frozen teacher, and weighted terms, run as one module.

One forward pass (DESIGN.md's step): the teacher runs under ``torch.no_grad`` in eval mode with its
taps, feature refiners (if any) transform the teacher's taps, the student runs with its taps, and each
active term reads a :class:`~kdkit.terms.base.StepView` and returns a scalar; the total is the weighted
sum. Terms (and the connectors they own) live here,
so their parameters train and checkpoint with the student but never enter the exported student.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import KdkitError
from ..taps import Taps, dry_run, main_output
from ..terms.base import LOGITS, StepView, Term


@dataclass(frozen=True)
class WeightedTerm:
    """A term, its weight in the total, and its display name (``kd``, ``fitnet``...)."""

    name: str
    weight: float
    term: Term


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: how the teacher is held throughout."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


class Distiller(nn.Module):
    """Student + frozen teacher + the terms of every stage (``stage_terms[i]`` for stage ``i``)."""

    def __init__(
        self, student: nn.Module, teacher: nn.Module | None, stage_terms: Sequence[Sequence[WeightedTerm]]
    ):
        super().__init__()
        self.student = student
        self.teacher = freeze(teacher) if teacher is not None else None
        self.stage_terms = [list(terms) for terms in stage_terms]
        self.terms = nn.ModuleDict(
            {
                self.term_key(i, j, wt.name): wt.term
                for i, terms in enumerate(self.stage_terms)
                for j, wt in enumerate(terms)
            }
        )
        for terms in self.stage_terms:
            for wt in terms:
                if wt.term.needs_teacher and teacher is None:
                    raise KdkitError(
                        f"term '{wt.name}' needs a teacher, but the config has none (set 'teacher:')"
                    )
        self.stage = 0
        self._student_taps: Taps | None = None
        self._teacher_taps: Taps | None = None

    @staticmethod
    def term_key(stage: int, index: int, name: str) -> str:
        return f"s{stage}_{index}_{name}"

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher never leaves eval mode
        return self

    def _all_terms(self) -> list[WeightedTerm]:
        return [wt for terms in self.stage_terms for wt in terms]

    def setup(self, sample: Tensor) -> dict[str, dict[str, torch.Size]]:
        """Resolve taps, dry-run one batch, build connectors; returns every tap's shape per model."""
        for wt in self._all_terms():
            wt.term.resolve_taps(self.student, self.teacher)
        student_keys = sorted({k for wt in self._all_terms() for k in wt.term.student_taps()})
        teacher_keys = sorted(
            {k for wt in self._all_terms() if wt.term.needs_teacher for k in wt.term.teacher_taps()}
        )
        shapes = {"student": dry_run(self.student, sample, student_keys, "student")}
        if self.teacher is not None:
            shapes["teacher"] = dry_run(self.teacher, sample, teacher_keys, "teacher")
        for wt in self._all_terms():
            wt.term.bind(shapes["student"], shapes.get("teacher", {}))
        self.release_taps()
        self._student_taps = Taps(self.student, student_keys, "student")
        if self.teacher is not None:
            self._teacher_taps = Taps(self.teacher, teacher_keys, "teacher")
        return shapes

    def release_taps(self) -> None:
        for taps in (self._student_taps, self._teacher_taps):
            if taps is not None:
                taps.remove()
        self._student_taps = self._teacher_taps = None

    def active_terms(self) -> list[WeightedTerm]:
        return self.stage_terms[self.stage]

    def forward(
        self,
        images: Tensor,
        labels: Tensor | None,
        epoch: int = 0,
        epoch_progress: float = 0.0,
        indices: Tensor | None = None,
        refine: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
        teacher_logits: Tensor | None = None,
    ):
        """Weighted total loss, the per-term (unweighted) values, and the student's logits;
        ``indices`` are the samples' dataset indices (for terms with per-sample memories); ``refine``
        maps the teacher's taps to what the terms read (the run's feature refiners, without gradients).
        ``teacher_logits`` replays the teacher's logits (:mod:`~kdkit.engine.teacher_cache`) instead of
        running it."""
        if self._student_taps is None:
            raise RuntimeError("call Distiller.setup(sample) before the first forward pass")
        terms = self.active_terms()
        teacher_out: dict[str, Tensor] = {}
        teacher_raw = None
        if teacher_logits is not None:
            teacher_out = {LOGITS: teacher_logits.to(images.device)}
            teacher_raw = teacher_out[LOGITS]
        elif self._teacher_taps is not None and any(wt.term.needs_teacher for wt in terms):
            with torch.no_grad():
                teacher_out = {k: v.float() for k, v in self._teacher_taps(images).items()}
                teacher_raw = self._teacher_taps.output
                if refine is not None:
                    teacher_out = refine(teacher_out)
        student_out = {k: v.float() for k, v in self._student_taps(images).items()}
        view = StepView(
            student_out,
            teacher_out,
            labels,
            epoch,
            epoch_progress,
            indices,
            self._student_taps.output,
            teacher_raw,
        )
        parts: dict[str, Tensor] = {}
        total = images.new_zeros((), dtype=torch.float32)
        for wt in terms:
            value = wt.term(view)
            parts[wt.name] = value.detach()
            parts.update({f"{wt.name}/{key}": stat for key, stat in wt.term.stats().items()})
            total = total + wt.weight * value
        return total, parts, student_out["logits"]

    @torch.no_grad()
    def teacher_logits(self, images: Tensor) -> Tensor:
        """The teacher's task output on ``images`` as float32, without gradients (what the cache stores)."""
        return main_output(self.teacher(images)).float()  # type: ignore[misc]

    @torch.no_grad()
    def features(self, images: Tensor) -> StepView:
        """The student's and teacher's taps on ``images`` without gradients (a feature refiner's loss
        reads them; the caller holds the networks in eval mode)."""
        teacher = {k: v.float() for k, v in self._teacher_taps(images).items()} if self._teacher_taps else {}
        student = {k: v.float() for k, v in self._student_taps(images).items()}  # type: ignore[misc]
        return StepView(student, teacher)

    @torch.no_grad()
    def teacher_space(self, view: StepView) -> dict[str, list[Tensor]]:
        """Every active term's :meth:`~kdkit.terms.base.Term.teacher_space` targets, by teacher tap."""
        targets: dict[str, list[Tensor]] = {}
        for wt in self.active_terms():
            for key, value in wt.term.teacher_space(view).items():
                targets.setdefault(key, []).append(value.float())
        return targets

    def teacher_space_taps(self, stages: Sequence[int] | None = None) -> list[str]:
        """The teacher taps some term of ``stages`` (default: all) gives teacher-space targets for."""
        chosen = range(len(self.stage_terms)) if stages is None else stages
        return sorted({k for i in chosen for wt in self.stage_terms[i] for k in wt.term.teacher_space_taps()})

    def logits(self, model: nn.Module, images: Tensor) -> Tensor:
        """``model``'s task output with gradients to ``images`` but not to its (frozen) parameters: a
        learnable refiner's loss (:mod:`kdkit.engine.refining`) reads teacher and student this way. The
        caller holds the student in eval mode; the taps' buffers are refilled by the next step anyway."""
        return main_output(model(images)).float()

    def trainable_term_parameters(self) -> list[nn.Parameter]:
        """Connector parameters of the active stage's terms."""
        return [p for wt in self.active_terms() for p in wt.term.parameters() if p.requires_grad]
