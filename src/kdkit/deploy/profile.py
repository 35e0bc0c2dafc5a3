"""Size and speed of a network: parameters, FLOPs (``torch.utils.flop_counter``) and latency."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from time import perf_counter

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


def latency_stats(
    run: Callable[[torch.Tensor], object], sample: torch.Tensor, repeats: int = 20, warmup: int = 3
) -> dict[str, float]:
    """Median and 95th percentile (nearest rank) of the wall time of ``run(sample)`` in ms, over
    ``repeats`` timed calls after ``warmup`` untimed ones (synchronised on CUDA). ``run`` is a model
    or any callable, e.g. an exported file's runner (:mod:`kdkit.deploy.runtime`)."""
    timings = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            if sample.is_cuda:
                torch.cuda.synchronize()
            start = perf_counter()
            run(sample)
            if sample.is_cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                timings.append((perf_counter() - start) * 1e3)
    ordered = sorted(timings)
    p95 = ordered[max(0, -(-95 * len(ordered) // 100) - 1)]
    return {"median_ms": statistics.median(timings), "p95_ms": p95, "repeats": repeats}


def latency_ms(model: nn.Module, sample: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one forward pass in milliseconds (synchronised on CUDA)."""
    model.eval()
    return latency_stats(model, sample, repeats, warmup)["median_ms"]


def profile(
    model: nn.Module, image_size: tuple[int, int], batch: int = 1, device: str = "cpu"
) -> dict[str, float]:
    """Parameters, GFLOPs per image and latency (median ``latency_ms`` and ``p95_ms``) at ``batch`` of
    a model on ``device``."""
    sample = torch.zeros(batch, 3, *image_size, device=device)
    model = model.to(device).eval()
    stats = latency_stats(model, sample)
    return {
        "params_m": count_parameters(model) / 1e6,
        "gflops": count_flops(model, sample[:1]) / 1e9,
        "latency_ms": stats["median_ms"],
        "p95_ms": stats["p95_ms"],
        "batch": batch,
    }
