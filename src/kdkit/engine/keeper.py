"""Checkpoints a run can resume from: finite-state checks and the pending -> last promotion.

A checkpoint is only written from a state whose every tensor (student parameters and buffers,
term/connector state, optimizer state) is finite. Finite is not enough to resume: parameters one update
away from overflow are finite, yet the next forward pass overflows the batch-norm statistics. So a save
goes to ``checkpoints/pending.pt`` and becomes ``checkpoints/last.pt`` only once the next step's forward
pass from it gave a finite loss and finite buffers; otherwise it is deleted. The "last good checkpoint"
an error names has therefore already produced a finite training step. ``--resume`` loads ``pending.pt``
when a kill left one (it is finite and gets verified by the resumed run's first step), else ``last.pt``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import KdkitError
from .checkpoint import (
    first_nonfinite,
    load_checkpoint,
    peek_position,
    position,
    save_checkpoint,
    state_tensors,
)
from .distributed import DistInfo, barrier


def training_tensors(
    modules: Iterable[tuple[str, nn.Module]], optimizers: Iterable[torch.optim.Optimizer | None]
) -> list[tuple[str, torch.Tensor]]:
    """Every tensor a checkpoint holds, labelled for a user (``student buffer bn1.running_var``)."""
    tensors = []
    names: dict[int, str] = {}
    for role, module in modules:
        for name, param in module.named_parameters():
            tensors.append((f"{role} parameter {name}", param.detach()))
            names[id(param)] = f"{role} parameter {name}"
        tensors += [(f"{role} buffer {name}", b) for name, b in module.named_buffers()]
    for optimizer in optimizers:
        for param, slots in (optimizer.state if optimizer is not None else {}).items():
            owner = names.get(id(param), "a parameter")
            for slot, value in slots.items():
                if isinstance(value, torch.Tensor):
                    tensors.append((f"optimizer {slot} of {owner}", value))
    return tensors


class CheckpointKeeper:
    """The run's ``checkpoints/pending.pt`` and ``checkpoints/last.pt``; rank 0 writes, all ranks agree.

    ``last_good`` and ``pending`` are the positions (e.g. "stage 'main', step 12") of the verified and
    the not-yet-verified checkpoint, for messages.
    """

    def __init__(self, run_dir: Path, info: DistInfo, device: torch.device) -> None:
        self.run_dir = run_dir
        self.info = info
        self.device = device
        self.last_path = run_dir / "checkpoints" / "last.pt"
        self.pending_path = run_dir / "checkpoints" / "pending.pt"
        self.last_good: str | None = None
        self.pending: str | None = None

    def anywhere(self, bad: str | None) -> str | None:
        """``bad`` from this process, or a placeholder when only another process found a bad tensor."""
        if not self.info.active:
            return bad
        flag = torch.tensor([0.0 if bad is None else 1.0], device=self.device)
        torch.distributed.all_reduce(flag)
        return None if flag.item() == 0 else (bad or "a tensor on another process")

    def save(self, state: dict[str, Any] | None, at: str) -> None:
        """Write ``pending.pt`` from ``state`` (built on rank 0 only; check it with :meth:`check` first);
        ``at`` is its position for messages, the same on every rank."""
        if state is not None:
            save_checkpoint(self.pending_path, state)
        self.pending = at
        barrier(self.info)

    def promote(self) -> None:
        """``pending.pt`` -> ``last.pt``: its state has passed a forward pass (or the run ended)."""
        if self.pending is None:
            return
        if self.info.main:
            self.pending_path.replace(self.last_path)
        self.last_good, self.pending = self.pending, None

    def discard(self) -> str:
        """Delete ``pending.pt`` (training from it gave non-finite values); the sentence that says so."""
        saved, self.pending = self.pending, None
        if self.info.main:
            self.pending_path.unlink(missing_ok=True)
        if saved is None:
            return ""
        return f"The newer checkpoint ({saved}) was deleted: training from it is not finite. "

    def verify(self, modules: Iterable[tuple[str, nn.Module]], where: str, index: int) -> None:
        """After the forward pass from a freshly saved state (its loss already checked): promote it when
        every buffer stayed finite, else discard it and stop with ``where`` (e.g. "in the forward pass
        of step 7 of stage 'main' (epoch 1.75)") in the message."""
        bad = self.anywhere(
            first_nonfinite((f"{role} buffer {n}", b) for role, m in modules for n, b in m.named_buffers())
        )
        if bad is None:
            self.promote()
            return
        dropped = self.discard()
        raise KdkitError(f"non-finite {bad} {where}. {dropped}{self.resume_hint(index)}")

    def check(self, tensors: list[tuple[str, torch.Tensor]], where: str, index: int) -> None:
        """Stop, writing nothing, when any tensor of the training state is NaN/inf (on any process)."""
        bad = self.anywhere(first_nonfinite(tensors))
        if bad is not None:
            raise KdkitError(
                f"non-finite {bad} {where}; no checkpoint written from it. {self.resume_hint(index)}"
            )

    def resume_hint(self, index: int) -> str:
        """Names the last good checkpoint (which really resumes) and how to continue from it."""
        lower = f"--set stages.{index}.optimizer.lr=<lower>"
        if self.last_good is None:
            return (
                "There is no checkpoint to resume from. Lower the learning rate "
                f"({lower}), use runtime.precision=fp32, or check the data and term weights"
            )
        return (
            f"The last good checkpoint is {self.last_path} ({self.last_good}): continue from it with "
            f"`kdkit train --resume {self.run_dir} {lower}`, or use runtime.precision=fp32, "
            "or check the data and term weights"
        )

    def load(self) -> dict[str, Any]:
        """The newest checkpoint: ``pending.pt`` (a kill left it before its verification; the first step
        verifies it) or ``last.pt``; refused when it holds non-finite values."""
        path = self.pending_path if self.pending_path.is_file() else self.last_path
        state = load_checkpoint(path)
        keys = ("student", "terms", "optimizer", "refiners")
        bad = first_nonfinite(state_tensors({k: state[k] for k in keys if state.get(k) is not None}))
        if bad is not None:
            raise KdkitError(
                f"checkpoint {path} holds non-finite values ({bad}) and cannot resume "
                "(it predates kdkit's finite-checkpoint check); start the run again with --overwrite"
            )
        if path == self.pending_path:
            self.pending = position(state)
            self.last_good = peek_position(self.last_path) if self.last_path.is_file() else None
        else:
            self.last_good = position(state)
        return state

    def disk_full(self, message: str) -> str:
        """The one line for a full disk: which checkpoint is intact and how to go on."""
        newest = self.pending or self.last_good
        path = self.pending_path if self.pending else self.last_path
        if newest is None:
            return (
                f"{message}; there is no earlier checkpoint; free space, then start the run again "
                "with --overwrite"
            )
        return (
            f"{message}; the previous checkpoint {path} is intact ({newest}); free space, "
            f"then continue with `kdkit train --resume {self.run_dir}`"
        )
