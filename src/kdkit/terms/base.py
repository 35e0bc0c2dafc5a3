"""The contract every loss term follows.

A term is a plain function (tested against hand-computed values) plus a small ``nn.Module``
that reads its inputs from a :class:`StepView` and calls the function. Terms declare what
they consume so that a config referring to a missing tap fails before training starts.

Tap keys: ``"logits"`` is the model's output (for dict outputs, its ``"out"`` entry); any other
key is a module path of the network, ``"path"`` meaning the module's output and
``"path:input"`` its (first) input, e.g. ``"fc:input"`` for the penultimate embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

LOGITS = "logits"


@dataclass
class StepView:
    """Everything one training step exposes to the terms.

    ``student`` and ``teacher`` map tap keys to tensors (``LOGITS`` always present for the
    student; for the teacher when it has a task head). ``epoch`` counts from 0 within the
    stage and ``epoch_progress`` is the fractional epoch ``step / steps_per_epoch`` (epoch +
    fraction done; passes over the stage's training data, also in a step-based stage), which
    warm-ups use: 0.0 at the first step of a stage. ``indices`` are the dataset indices of the
    batch's samples on this process (repeated for the copies a data refiner appends, e.g. TST's
    ``[x; x_hat]``), for terms that keep a memory per sample (CRD's memory bank); ``None`` outside
    training. ``student_output`` / ``teacher_output`` are the models' raw outputs of the step (a
    detector's dict of head outputs, which its own ``losses`` and the dense-head terms read); for
    detection ``labels`` are the targets ``[B, M, 5]`` (``x1, y1, x2, y2, class``, class -1 = padding).
    """

    student: dict[str, Tensor]
    teacher: dict[str, Tensor] = field(default_factory=dict)
    labels: Tensor | None = None
    epoch: int = 0
    epoch_progress: float = 0.0
    indices: Tensor | None = None
    student_output: Any = None
    teacher_output: Any = None

    @property
    def student_logits(self) -> Tensor:
        return self.student[LOGITS]

    @property
    def teacher_logits(self) -> Tensor:
        if LOGITS not in self.teacher:
            raise KeyError(
                "this term needs teacher logits, but the teacher returned none (feature-only teacher?)"
            )
        return self.teacher[LOGITS]


class Term(nn.Module):
    """Base class of all loss terms.

    Subclasses set ``needs_teacher``/``needs_labels`` and override ``student_taps`` /
    ``teacher_taps`` when they read tapped features. After the dry run the engine calls
    :meth:`bind` with every tap's shape (batch dimension included) so the term can build
    connectors (owned by the term; their parameters train with the student).
    """

    needs_teacher: ClassVar[bool] = True
    needs_labels: ClassVar[bool] = False

    def student_taps(self) -> list[str]:
        return [LOGITS]

    def teacher_taps(self) -> list[str]:
        return [LOGITS] if self.needs_teacher else []

    def resolve_taps(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Fill tap keys the config left unset from the models' declared taps.

        Zoo models declare ``feature_taps`` (stage outputs, shallow to deep) and
        ``embedding_tap`` (the classifier's input). Default: nothing to resolve.
        """

    def bind(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        """Build connectors from the dry run's shapes. Default: nothing to build."""

    def bind_data(self, num_samples: int, labels: Tensor | None = None) -> None:
        """Called once with the size of the stage's training set and, for classification data, the
        class of every sample (terms with a memory per sample, such as CRD's banks, allocate it here;
        they read ``StepView.indices``). Default: nothing."""

    def stats(self) -> dict[str, Tensor]:
        """Detached scalars of the last forward for the training log (``<term>/<key>`` in the ``train``
        records, averaged like the losses; e.g. DAM's mask coverage). Default: none."""
        return {}

    def teacher_space_taps(self) -> list[str]:
        """The teacher taps :meth:`teacher_space` gives targets for (known after :meth:`bind`)."""
        return []

    def teacher_space(self, view: StepView) -> dict[str, Tensor]:
        """The student's features mapped into the teacher's space, by teacher tap key (FitNet's connector
        output, SoKD's adapter Phi_s, ReviewKD's fused levels): the targets a feature refiner's
        consistency loss pulls the refined teacher features towards (SoKD Eq. 14). Default: none."""
        return {}

    def forward(self, view: StepView) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
