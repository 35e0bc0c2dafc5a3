"""The ``train`` records of ``metrics.jsonl``: loss and terms averaged over the steps since the last one."""

from __future__ import annotations

import time
from typing import Any

import torch

from .distributed import DistInfo, all_mean


class TrainWindow:
    """Sums of the loss and each term over the steps since the last log record."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.steps = 0
        self.images = 0
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, images: int, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        self.steps += 1
        self.images += images
        for key, value in {"loss": loss.detach(), **parts}.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.float()

    def means(self, info: DistInfo) -> dict[str, Any]:
        """Each sum's mean over the window's steps (and over the processes), and the images per second."""
        means = {key: all_mean(value / self.steps, info).item() for key, value in self.sums.items()}
        return {**means, "images_per_s": self.images / max(time.perf_counter() - self.started, 1e-9)}
