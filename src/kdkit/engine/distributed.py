"""torch.distributed glue: the same code runs as one process or under ``torchrun`` (DDP).

gloo on CPU, nccl on CUDA. Rank 0 does all file I/O; metrics are synced by torchmetrics.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA (this process's local rank) when present, else the CPU.

    On the CPU, denormal floats are flushed to zero: small gradients otherwise fall into the
    denormal range and slow bf16/fp32 kernels down by an order of magnitude or more (seen here:
    a ResNet-20 training step went from ~1,000 to under 100 images/s).
    """
    if name != "auto":
        device = torch.device(name)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cpu")
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    return device


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()


def all_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a tensor over processes (for logged losses)."""
    if not info.active:
        return values
    values = values.detach().clone()
    dist.all_reduce(values)
    return values / info.world


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch of all processes, for any backend (gloo on CPU included).

    Per-channel sums and squared sums are all-reduced with the differentiable
    ``torch.distributed.nn.all_reduce``, so the forward pass and the gradients equal those of one
    process holding the whole batch (PyTorch's ``SyncBatchNorm`` does this on GPUs only).
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        stats = dist_nn.all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
        channels = x.shape[1]
        total = stats[-1]
        mean = stats[:channels] / total
        var = stats[channels : 2 * channels] / total - mean * mean
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = (
                    self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                )
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * total / (total - 1), momentum)
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Swap every batch-norm layer for one that normalises over the global batch (CUDA: SyncBatchNorm)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            swapped = GlobalBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            swapped.load_state_dict(child.state_dict())
            swapped.to(next(iter(child.state_dict().values()), torch.empty(0)).device)
            setattr(model, name, swapped)
        else:
            sync_batchnorm(child, device)
    return model
