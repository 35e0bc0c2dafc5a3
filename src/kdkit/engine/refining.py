"""Refiners in the run: data refiners on the batch, feature refiners on the teacher's taps, and the turns
learnable ones take with the student.

The contract (README, "Architecture"): a refiner (:class:`~kdkit.refiners.base.DataRefiner` or
:class:`~kdkit.refiners.base.FeatureRefiner`) that owns trainable parameters implements
``loss(images, labels, generator, total, start, frozen)``. The config
gives it an ``optimizer`` (and ``schedule``) and an ``update`` schedule; the trainer then alternates:

- a **refiner phase** runs before the student step at every ``update.every``-th step of the listed
  ``update.epochs`` (1-based epochs of the stage; default: all): ``update.iterations`` updates, each on the
  step's augmented batch with its own random draws. During it the student and its terms are frozen (eval
  mode, so batch-norm statistics do not move; gradients go only to the refiner's parameters through the
  frozen teacher and student: ``loss.backward(inputs=refiner parameters)``); under torchrun the refiner's
  gradients are averaged over processes before its optimizer steps.
- the **student step** then sees the refined batch (refiner applied under ``no_grad``; its parameters do
  not change), exactly like a stateless refiner's; a feature refiner is applied inside the step to the
  teacher's taps (:meth:`Refining.feature_refine`), with draws seeded by (seed, stage, epoch, step) and
  made for the global batch, of which each process takes its slice (so the rank selects the draws).

A refiner runs in the stages its ``stages`` entry names (default: every stage). Its parameters, optimizer
state and update count are part of the checkpoint, so ``--resume`` continues a refiner phase exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..config import RefinerConfig
from ..errors import KdkitError
from ..refiners.base import FeatureRefiner
from .batches import generator
from .distributed import DistInfo, all_mean
from .schedule import lr_factor
from .stages import build_optimizer


@dataclass
class FrozenModels:
    """Teacher and student as a refiner's loss sees them: parameters frozen, eval mode, gradients
    flowing to the input. ``teacher(x)`` / ``student(x)`` return logits, ``[B, C]`` or ``[B, C, H, W]``."""

    distiller: Any

    def _model(self, role: str) -> nn.Module:
        model = self.distiller.student if role == "student" else self.distiller.teacher
        if model is None:
            raise KdkitError("this refiner's loss needs a teacher, but the config has none (set 'teacher:')")
        return model

    def teacher(self, images: Tensor) -> Tensor:
        return self.distiller.logits(self._model("teacher"), images)

    def student(self, images: Tensor) -> Tensor:
        return self.distiller.logits(self._model("student"), images)

    def losses(self, role: str, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """A detector's own training losses (its ``losses``) on ``images`` and padded box targets, with
        gradients to the images; ``role``: ``"teacher"`` or ``"student"``."""
        model = self._model(role)
        return model.losses(model(images), targets)

    def features(self, images: Tensor):
        """Both networks' taps on ``images`` as a :class:`~kdkit.terms.base.StepView`, without gradients."""
        return self.distiller.features(images)

    def teacher_space(self, view) -> dict[str, list[Tensor]]:
        """The active terms' student features mapped into the teacher's space, by teacher tap (no
        gradients): what a feature refiner's consistency loss compares the refined taps with."""
        return self.distiller.teacher_space(view)


@dataclass
class RefinerSlot:
    """One configured refiner: the module, its config entry, and (if it learns) its optimizer."""

    refiner: nn.Module
    config: RefinerConfig
    optimizer: torch.optim.Optimizer | None = None
    updates: int = 0  # refiner updates done in the run
    params: list[nn.Parameter] = field(default_factory=list)

    def runs_in(self, stage: str) -> bool:
        return self.config.stages is None or stage in self.config.stages

    def due(self, stage: str, step: int, per_epoch: int) -> bool:
        """Whether a refiner phase runs before student step ``step + 1`` (``step`` 0-based in the stage)."""
        if self.optimizer is None or not self.runs_in(stage):
            return False
        update = self.config.update
        epoch = step // per_epoch + 1
        if update.epochs is not None and epoch not in update.epochs:
            return False
        return step % update.every == 0


class Refining:
    """The run's refiners in config order, with what learnable ones need to learn."""

    def __init__(self, refiners: Sequence[nn.Module], configs: Sequence[RefinerConfig]) -> None:
        self.slots = []
        for i, (refiner, config) in enumerate(zip(refiners, configs)):
            params = [p for p in refiner.parameters() if p.requires_grad]
            learns = hasattr(refiner, "loss") and bool(params)
            if config.optimizer is not None and not learns:
                raise KdkitError(
                    f"refiners[{i}] ({config.name}) has an optimizer but nothing to learn "
                    "(no trainable parameters or no loss); remove its 'optimizer:'"
                )
            if learns and config.optimizer is None:
                raise KdkitError(
                    f"refiners[{i}] ({config.name}) learns but has no optimizer; "
                    "add e.g. 'optimizer: {name: adamw, lr: 0.001}' to its entry"
                )
            optimizer = build_optimizer(config.optimizer, params) if learns else None
            self.slots.append(RefinerSlot(refiner, config, optimizer, params=params))

    def learning(self) -> list[RefinerSlot]:
        return [s for s in self.slots if s.optimizer is not None]

    def modules(self) -> list[tuple[str, nn.Module]]:
        """The learnable refiners (checked for finite values and checkpointed; stateless ones are not)."""
        return [(f"refiner {s.config.name}", s.refiner) for s in self.learning()]

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [s.optimizer for s in self.learning() if s.optimizer is not None]

    def apply(
        self, stage: str, images: Tensor, labels: Any, seed_parts: tuple, info: DistInfo
    ) -> tuple[Tensor, Any]:
        """The batch the student step sees: each refiner of this stage in turn, without gradients."""
        with torch.no_grad():
            for slot in self.slots:
                if slot.runs_in(stage) and not isinstance(slot.refiner, FeatureRefiner):
                    images, labels = slot.refiner(
                        images,
                        labels,
                        generator("refine", *seed_parts),
                        total=images.shape[0] * info.world,
                        start=info.rank * images.shape[0],
                    )
        return images, labels

    def bind_features(self, distiller: Any, teacher_shapes: dict[str, torch.Size], stages: list[str]) -> None:
        """Bind each feature refiner to the teacher taps the terms of its stages read and map onto."""
        for i, slot in enumerate(self.slots):
            if not isinstance(slot.refiner, FeatureRefiner):
                continue
            if distiller.teacher is None:
                raise KdkitError(
                    f"refiners[{i}] ({slot.config.name}) refines the teacher's features, but the config has "
                    "no teacher (set 'teacher:')"
                )
            mine = [j for j, name in enumerate(stages) if slot.runs_in(name)]
            slot.refiner.bind(teacher_shapes, distiller.teacher_space_taps(mine))

    def feature_refine(self, stage: str, seed_parts: tuple, info: DistInfo):
        """The function the distiller applies to the teacher's taps in a student step of ``stage``
        (``None`` when no feature refiner runs in it): draws depend on ``seed_parts``, and are made for
        the global batch, this process taking its slice."""
        slots = [(i, s) for i, s in enumerate(self.slots) if isinstance(s.refiner, FeatureRefiner)]
        slots = [(i, s) for i, s in slots if s.runs_in(stage)]
        if not slots:
            return None

        def refine(features: dict[str, Tensor]) -> dict[str, Tensor]:
            batch = next(iter(features.values())).shape[0]
            for i, slot in slots:
                draws = generator("refine-features", *seed_parts, i)
                features = slot.refiner(features, draws, batch * info.world, info.rank * batch)
            return features

        return refine

    def due(self, stage: str, step: int, per_epoch: int) -> list[RefinerSlot]:
        """The learnable refiners whose phase runs before student step ``step + 1`` of ``stage``."""
        return [s for s in self.learning() if s.due(stage, step, per_epoch)]

    def phases(
        self,
        slots: list[RefinerSlot],
        frozen: FrozenModels,
        images: Tensor,
        labels: Any,
        seed_parts: tuple,
        schedule: tuple[float, float],
        info: DistInfo,
    ) -> list[dict[str, Any]]:
        """One phase per slot (the caller holds the networks in eval mode); ``schedule`` is the position
        and length in the stage's unit for the refiners' lr schedules. One record per phase: losses, lr,
        update count and the refiner's :meth:`log_state`."""
        records = []
        for slot in slots:
            lr = self.lr(slot, *schedule)
            means = self.update(slot, images, labels, frozen, seed_parts, lr, info)
            record = {"kind": "refiner", "refiner": slot.config.name, "updates": slot.updates, "lr": lr}
            records.append({**record, **means, **slot.refiner.log_state()})
        return records

    def update(
        self,
        slot: RefinerSlot,
        images: Tensor,
        labels: Any,
        frozen: FrozenModels,
        seed_parts: tuple,
        lr: float,
        info: DistInfo,
    ) -> dict[str, float]:
        """``update.iterations`` refiner updates on one batch; the mean of its loss parts, for the log."""
        assert slot.optimizer is not None
        for group in slot.optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, Tensor] = {}
        for it in range(slot.config.update.iterations):
            loss, parts = slot.refiner.loss(
                images,
                labels,
                generator("refine-update", *seed_parts, it),
                total=images.shape[0] * info.world,
                start=info.rank * images.shape[0],
                frozen=frozen,
            )
            if not bool(torch.isfinite(loss.detach()).item()):
                student = frozen.distiller.student.parameters()
                way_out = (
                    "lower its optimizer.lr"
                    if all(bool(torch.isfinite(p).all()) for p in student)
                    else "the student's weights are not finite (its steps diverged): lower the stage's lr "
                    "or the terms' weights"
                )
                raise KdkitError(
                    f"refiner '{slot.config.name}': non-finite loss {float(loss.detach()):.4g} in update "
                    f"{slot.updates + 1}; {way_out}"
                )
            slot.optimizer.zero_grad(set_to_none=True)
            loss.backward(inputs=slot.params)
            if info.active:  # average the refiner's gradients over processes (it is not DDP-wrapped)
                for param in slot.params:
                    if param.grad is None:
                        param.grad = torch.zeros_like(param)
                    torch.distributed.all_reduce(param.grad)
                    param.grad /= info.world
            slot.optimizer.step()
            slot.optimizer.zero_grad(set_to_none=True)  # no refiner gradient outlives its update
            slot.updates += 1
            for key, value in {"loss": loss.detach(), **parts}.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float()
        n = slot.config.update.iterations
        return {key: all_mean(value / n, info).item() for key, value in sums.items()}

    def lr(self, slot: RefinerSlot, position: float, length: float) -> float:
        assert slot.config.optimizer is not None
        return slot.config.optimizer.lr * lr_factor(slot.config.schedule, position, length)

    def state_dict(self) -> list[dict[str, Any]]:
        """Parameters, buffers, optimizer state and update count of each learnable refiner."""
        return [
            {"module": s.refiner.state_dict(), "optimizer": s.optimizer.state_dict(), "updates": s.updates}
            for s in self.learning()
            if s.optimizer is not None
        ]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        slots = self.learning()
        if len(states) != len(slots):
            raise KdkitError(
                f"the checkpoint holds {len(states)} learnable refiner(s), the config {len(slots)}; "
                "resume with the run's own config.yaml"
            )
        for slot, state in zip(slots, states):
            assert slot.optimizer is not None
            slot.refiner.load_state_dict(state["module"])
            slot.optimizer.load_state_dict(state["optimizer"])
            slot.updates = state["updates"]
