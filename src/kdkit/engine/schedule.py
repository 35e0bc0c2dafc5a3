"""Learning-rate schedules as pure functions of progress, so resuming needs no scheduler state."""

from __future__ import annotations

import bisect
import math

from ..config import ScheduleConfig


def lr_factor(schedule: ScheduleConfig, position: float, length: float) -> float:
    """Multiplier of the base learning rate at ``position`` (in the stage's unit) of a stage of ``length``.

    * ``multistep``: ``gamma ** (number of milestones <= position)``;
    * ``cosine``: ``min_factor + (1 - min_factor) * (1 + cos(pi * t)) / 2`` with ``t`` the progress
      after warm-up;
    * ``poly``: ``(1 - t) ** power`` (the DeepLab schedule);
    * ``constant``: 1.
    A linear warm-up from 0 over ``warmup`` units multiplies any of them.
    """
    if schedule.warmup > 0 and position < schedule.warmup:
        warm = (position + 1e-12) / schedule.warmup
    else:
        warm = 1.0
    span = max(length - schedule.warmup, 1e-12)
    t = min(max((position - schedule.warmup) / span, 0.0), 1.0)
    if schedule.name == "multistep":
        base = schedule.gamma ** bisect.bisect_right(sorted(schedule.milestones), position)
    elif schedule.name == "cosine":
        base = schedule.min_factor + (1.0 - schedule.min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))
    elif schedule.name == "poly":
        base = max((1.0 - t) ** schedule.power, schedule.min_factor)
    else:
        base = 1.0
    return warm * base
