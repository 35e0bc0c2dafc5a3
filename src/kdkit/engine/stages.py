"""A stage of a run: its data, terms, length, optimizer and schedule, and which student parameters train."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import AugmentConfig, OptimizerConfig, ScheduleConfig
from ..errors import KdkitError
from ..registry import did_you_mean
from .distiller import WeightedTerm


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
