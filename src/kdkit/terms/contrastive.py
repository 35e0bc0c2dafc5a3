"""CRD: contrastive representation distillation (Tian, Krishnan, Isola, ICLR 2020).

Student and teacher embeddings (the inputs of their classifiers) are projected to ``feat_dim``
dimensions and L2-normalised (``g_S``, ``g_T`` of Sec. 3.2). Two memory banks hold one embedding per
training sample: ``memory_s`` (student) and ``memory_t`` (teacher). For each sample i of the batch, K
negatives j are drawn uniformly from the dataset; with the sample's own index first,

    h(T, S) = exp(<g_T(t), g_S(s)> / tau) / Z        (Eq. 19; Z estimated once, from the first batch)

scores the teacher embedding against the student bank's rows (and the student embedding against the
teacher bank's), and the NCE loss of Eq. 18 with the noise distribution P_n = 1/N,

    L = -sum_i [ log h_i0 / (h_i0 + K/N) + sum_{k=1..K} log (K/N) / (h_ik + K/N) ] / B

is summed over both directions, as the authors' code does. After the loss the banks move to the batch's
embeddings with momentum 0.5 and are renormalised (the memory of Wu et al. 2018). The banks live in
the term, so they are checkpointed and resume exactly; under torchrun every process adds the whole
global batch's embeddings to its banks (all-gathered), so the banks stay identical across processes.
Negatives are drawn from the global torch generator, which the trainer seeds per (seed, stage, epoch,
step, rank). With classification data they are drawn from the samples of the OTHER classes, as the
authors' code does (its CIFAR-100 sampler, mode ``exact``: the paper's "K negatives" are samples of a
different class), uniformly with replacement (the code draws without replacement where it can; at
K = 16384 of about 49,500 other-class samples that changes little); without labels (segmentation),
uniformly from the whole set. On the 10-class demo, uniform negatives (10% of them of the anchor's
class) kept the student at chance for 12 epochs. The term needs each sample's dataset index:
``StepView.indices``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import KdkitError
from ..registry import TERMS
from .base import StepView
from .features import _SingleTapTerm


def nce_loss(scores: Tensor, num_samples: int, eps: float = 1e-7) -> Tensor:
    """NCE loss of CRD Eq. 18 from ``scores`` ``[B, K + 1]`` (column 0: the positive), P_n = 1/N."""
    batch, k = scores.shape[0], scores.shape[1] - 1
    noise = k / num_samples
    positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
    negative = torch.log(noise / (scores[:, 1:] + noise + eps))
    return -(positive.sum() + negative.sum()) / batch


def contrast_scores(anchor: Tensor, bank: Tensor, sampled: Tensor, temperature: float) -> Tensor:
    """``exp(<bank[sampled[i, k]], anchor[i]> / tau)``: ``[B, K + 1]``. The products with the whole bank
    (``[B, N]``) are cheaper than gathering ``[B, K + 1, D]`` rows whenever N < (K + 1) D, which holds
    for CIFAR and ImageNet at the paper's K = 16384, D = 128."""
    return torch.exp(torch.gather(anchor @ bank.t().to(anchor.dtype), 1, sampled) / temperature)


def momentum_update(bank: Tensor, indices: Tensor, values: Tensor, momentum: float) -> None:
    """``bank[i] <- normalize(momentum * bank[i] + (1 - momentum) * v)`` in place (no gradient)."""
    with torch.no_grad():
        mixed = bank[indices] * momentum + values.detach().to(bank.dtype) * (1 - momentum)
        bank[indices] = F.normalize(mixed, dim=1)


def _gather(tensor: Tensor) -> Tensor:
    """All processes' ``tensor`` concatenated in rank order (the tensor itself outside torchrun)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class Embed(nn.Module):
    """CRD's projection head: flatten, linear to ``feat_dim``, L2 normalisation."""

    def __init__(self, in_dim: int, feat_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, feat_dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1).float()), dim=1)


@TERMS.register("crd", "Tian et al. 2020: contrastive representation distillation with memory banks (NCE)")
class CRD(_SingleTapTerm):
    """CRD (see the module docstring). Taps default to each model's ``embedding_tap`` (the classifier's
    input). ``feat_dim`` 128, ``negatives`` K = 16384, ``temperature`` 0.07, ``momentum`` 0.5: the paper's
    CIFAR-100 settings; K is capped at the dataset size minus one. The CRD code base weights it 0.8
    next to CE."""

    needs_indices = True

    def __init__(
        self,
        *,
        student_tap: str | None = None,
        teacher_tap: str | None = None,
        feat_dim: int = 128,
        negatives: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
    ) -> None:
        super().__init__(student_tap, teacher_tap)
        if feat_dim < 1 or negatives < 1 or temperature <= 0 or not 0 <= momentum < 1:
            raise KdkitError(
                "term 'crd': feat_dim and negatives must be positive, temperature > 0, 0 <= momentum < 1"
            )
        self.feat_dim, self.negatives = feat_dim, negatives
        self.temperature, self.momentum = temperature, momentum
        self.embed_s: nn.Module | None = None
        self.embed_t: nn.Module | None = None
        self.num_samples = 0
        self.register_buffer("labels", None, persistent=False)  # set by bind_data for classification

    def _default(self, model: nn.Module | None, role: str) -> str:
        return self._declared(model, "embedding_tap", role, f"{role}_tap")

    def bind(self, student_shapes, teacher_shapes) -> None:
        s_dim = math.prod(student_shapes[self.student_tap][1:])
        t_dim = math.prod(teacher_shapes[self.teacher_tap][1:])
        self.embed_s, self.embed_t = Embed(s_dim, self.feat_dim), Embed(t_dim, self.feat_dim)

    def bind_data(self, num_samples: int, labels: Tensor | None = None) -> None:
        """Memory banks for a training set of ``num_samples`` (uniform in [-a, a], a = 1/sqrt(d/3),
        as the authors' code initialises them), the NCE constants, still unknown (-1), and, given the
        samples' ``labels``, the index tables that draw negatives from the other classes."""
        if num_samples < 2:
            raise KdkitError("term 'crd' needs a training set of at least 2 images")
        self.num_samples = num_samples
        if labels is not None:
            labels = labels.long().cpu()
            counts = torch.bincount(labels)
            if int(counts.max()) == num_samples:
                raise KdkitError("term 'crd' takes negatives from other classes; the training set has one")
            # samples sorted by class; class c occupies order[start[c] : start[c] + counts[c]]
            self.labels = labels
            self.register_buffer("order", torch.argsort(labels, stable=True), persistent=False)
            self.register_buffer("class_start", torch.cumsum(counts, 0) - counts, persistent=False)
            self.register_buffer("class_count", counts, persistent=False)
        bound = 1.0 / math.sqrt(self.feat_dim / 3)
        generator = torch.Generator().manual_seed(0)
        for name in ("memory_s", "memory_t"):
            bank = torch.rand(num_samples, self.feat_dim, generator=generator) * 2 * bound - bound
            self.register_buffer(name, bank)
        self.register_buffer("z", torch.full((2,), -1.0))

    def sample_negatives(self, indices: Tensor) -> Tensor:
        """``[B, K + 1]`` dataset indices: each sample's own index, then K negatives drawn uniformly (with
        replacement) from the samples of the other classes (from all samples without labels)."""
        k = min(self.negatives, self.num_samples - 1)
        if self.labels is None:
            sampled = torch.randint(0, self.num_samples, (indices.numel(), k + 1), device=indices.device)
        else:
            cls = self.labels[indices]
            start, count = self.class_start[cls, None], self.class_count[cls, None]
            u = torch.rand(indices.numel(), k + 1, device=indices.device)
            r = (u * (self.num_samples - count)).long()  # a position among the other classes' samples
            sampled = self.order[r + (r >= start) * count]  # skip the anchor's class block
        sampled[:, 0] = indices
        return sampled

    def forward(self, view: StepView) -> Tensor:
        if view.indices is None:
            raise KdkitError("term 'crd' needs the samples' dataset indices (training steps provide them)")
        if self.num_samples == 0 or self.embed_s is None or self.embed_t is None:
            raise KdkitError("term 'crd' was not bound to its data; build it through the engine")
        s = self.embed_s(view.student[self.student_tap])
        t = self.embed_t(view.teacher[self.teacher_tap])
        indices = view.indices.to(s.device)
        sampled = self.sample_negatives(indices)
        # the banks as they were before this step's update (the backward pass reads them after it)
        memory_s, memory_t = self.memory_s.clone(), self.memory_t.clone()
        scores_t = contrast_scores(t, memory_s, sampled, self.temperature)  # teacher vs student bank
        scores_s = contrast_scores(s, memory_t, sampled, self.temperature)  # student vs teacher bank
        with torch.no_grad():  # Z of Eq. 19, estimated once from the first batch (as the authors' code)
            if self.z[0] < 0:
                self.z.copy_(torch.stack([scores_t.mean(), scores_s.mean()]) * self.num_samples)
        n = self.num_samples
        loss = nce_loss(scores_t / self.z[0], n) + nce_loss(scores_s / self.z[1], n)
        momentum_update(self.memory_s, _gather(indices), _gather(s.detach()), self.momentum)
        momentum_update(self.memory_t, _gather(indices), _gather(t.detach()), self.momentum)
        return loss
