"""torch.distributed glue: the same code runs as one process or under ``torchrun`` (DDP).

gloo on CPU, nccl on CUDA. Rank 0 does all file I/O; metrics are synced by torchmetrics.
Also the process-wide CPU settings made when the device is resolved (intra-op threads, denormals).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

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
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Leave it with :func:`shutdown` when the work is done (``python -m kdkit`` does this).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown(ok: bool = True) -> None:
    """End of a command under torchrun: after success, a final barrier, then destroy the process group.

    A process that exits with the gloo group alive can abort at interpreter exit (gloo's C++ threads
    still hold work whose tensors are released while Python is torn down: ``terminate called without
    an active exception``, SIGABRT; pytorch/pytorch#190489, #179291). That hit rank 1 in about 1
    torchrun run in 9: it left ``fit`` while rank 0 still wrote ``report.md`` and the plots, aborted,
    and torchrun then stopped rank 0 before the report was written. The barrier keeps every rank until
    rank 0 is done; destroying the group stops gloo's threads while the interpreter is whole.
    After an error (``ok=False``) nothing is done: another rank may be inside a collective, and both a
    barrier and the teardown could then wait for it (torchtitan does the same); the run failed anyway
    and torchrun stops the other ranks.
    """
    if not ok or not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def _cgroup_cpus() -> float | None:
    """The CPU quota of this process's cgroup (v2 ``cpu.max`` or v1 ``cfs_quota_us``), in cores."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpus()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from ``/proc/stat`` (Linux), or None."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user time
    return total - idle, total


def busy_cpus(window: float = 0.25) -> float:
    """Cores kept busy by other work now: CPU use over ``window`` seconds while this process sleeps
    (``/proc/stat``; elsewhere the 1-minute load average)."""
    first = _cpu_times()
    if first is None:
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):
            return 0.0
    time.sleep(window)
    second = _cpu_times()
    if second is None or second[1] <= first[1]:
        return 0.0
    return (second[0] - first[0]) / (second[1] - first[1]) * (os.cpu_count() or 1)


def default_threads() -> int:
    """kdkit's intra-op thread count when ``runtime.threads`` is 0 / ``auto``.

    ``OMP_NUM_THREADS`` when set (the user's choice; torchrun sets 1). Otherwise the available CPUs
    (:func:`available_cpus`), shared among this node's processes under torchrun
    (``LOCAL_WORLD_SIZE``), less the cores that other work keeps busy right now (:func:`busy_cpus`,
    rounded; scaled to this process's share when it may use fewer CPUs than the machine has); at least
    1. On a shared machine this matters: PyTorch's OpenMP threads wait for each other at every
    parallel region, so with a core taken by another job two threads can run far slower than one
    (issue 8: ``kdkit demo --quick`` took 282 s with the default threads, 56 s with 1).
    """
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cpus = available_cpus()
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    share = max(1, cpus // local)
    machine = os.cpu_count() or cpus
    busy = busy_cpus()
    busy = round(busy * cpus / machine if machine > cpus else busy)
    return max(1, min(share, cpus - busy))


_auto_threads: int | None = None


def set_threads(threads: int | str = 0) -> int:
    """Set torch's intra-op threads: ``threads`` when positive, else :func:`default_threads`.

    The default is decided once per process (when its first run is built); later runs in the same
    process (``kdkit demo`` trains several) keep it, and do not count their own load as other work.
    """
    global _auto_threads
    if isinstance(threads, int) and threads > 0:
        count = threads
    elif _auto_threads is not None:
        return torch.get_num_threads()
    else:
        count = _auto_threads = default_threads()
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def resolve_device(name: str, threads: int | str = 0) -> torch.device:
    """``auto`` picks CUDA (this process's local rank) when present, else the CPU.

    Sets the intra-op thread count (:func:`set_threads`; ``runtime.threads``). On the CPU, denormal
    floats are flushed to zero: small gradients otherwise fall into the denormal range and slow
    bf16/fp32 kernels down by an order of magnitude or more (seen here: a ResNet-20 training step
    went from ~1,000 to under 100 images/s).
    """
    if name != "auto":
        device = torch.device(name)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cpu")
    set_threads(threads)
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
        # As PyTorch's batch norm under autocast: statistics, running buffers and the normalisation
        # in float32, the output in the input's dtype (bf16 in, bf16 out).
        with torch.autocast(x.device.type, enabled=False):
            return self._global_forward(x.float()).to(x.dtype)

    def _global_forward(self, x: torch.Tensor) -> torch.Tensor:
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
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                unbiased = var.detach() * total / (total - 1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape).to(y.dtype) + self.bias.view(shape).to(y.dtype)
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
