"""Size and speed of a network: parameters, FLOPs (``torch.utils.flop_counter``) and latency."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, sample: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``sample`` (a multiply-add counts as 2)."""
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(sample)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


@torch.no_grad()
def latency_ms(model: nn.Module, sample: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one forward pass in milliseconds (synchronised on CUDA)."""
    model.eval()
    timings = []
    for i in range(warmup + repeats):
        if sample.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(sample)
        if sample.is_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            timings.append((time.perf_counter() - start) * 1e3)
    return statistics.median(timings)


def profile(
    model: nn.Module, image_size: tuple[int, int], batch: int = 1, device: str = "cpu"
) -> dict[str, float]:
    """Parameters, GFLOPs per image and latency at ``batch`` of a model on ``device``."""
    sample = torch.zeros(batch, 3, *image_size, device=device)
    model = model.to(device)
    return {
        "params_m": count_parameters(model) / 1e6,
        "gflops": count_flops(model, sample[:1]) / 1e9,
        "latency_ms": latency_ms(model, sample),
        "batch": batch,
    }
