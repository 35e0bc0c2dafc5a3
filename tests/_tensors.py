"""Float64 tensors for hand-computed loss values and gradient checks."""

from __future__ import annotations

import torch


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def rand64(*shape: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
