"""Mixup (Zhang et al., ICLR 2018) and CutMix (Yun et al., ICCV 2019) with a per-sample partner.

timm mixes each batch with its own reversal, so a sample's image depends on the batch it lands in.
Here every choice for sample ``i`` of epoch ``e`` comes from its own key ``("mixup", seed, stage, e, i)``
(:mod:`kdkit.data.draws`): whether it is mixed (``prob``), mixup or CutMix (``switch_prob`` when both
are on), its partner ``j`` (any other sample of the training set, uniformly) and ``lambda ~
Beta(alpha, alpha)`` (:func:`symmetric_beta`, exact, from the key's uniforms). The partner's image
is ``j``'s own image of that epoch (its decode-time augmentation drawn from ``j``'s key), so the mixed
image, like any other, is the same whatever the batch size, batch position and process count, and
the teacher cache can replay it. The price: each mixed image loads and decodes a second one.

Mixup: ``x = lambda x_i + (1 - lambda) x_j``. CutMix (the paper's Algorithm A1, timm's ``rand_bbox``):
a box of ``sqrt(1 - lambda)`` of each side, centred uniformly and clipped to the image, is pasted from
``x_j``, and lambda becomes the share of ``x_i`` left visible. Targets are ``lambda onehot(y_i) +
(1 - lambda) onehot(y_j)``, class probabilities that ``ce`` takes as they are and ``dkd`` reads
through their arg-max. Mixed images are float in [0, 1]. Without decode-time augmentation (the CIFAR
recipe of padded crop + flip on the batch) the two raw images are mixed and the batch step then crops
and flips the mixture, so the partner shares the sample's crop and flip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .draws import SampleKeys


@dataclass(frozen=True)
class MixDraws:
    """One batch's draws: partner ``[B]`` long, ``lam`` ``[B]`` (1 for an unmixed sample), ``cut`` ``[B]``
    bool (CutMix), ``centre`` ``[B, 2]`` uniforms placing the box (as fractions of H and W)."""

    partner: Tensor
    lam: Tensor
    cut: Tensor
    centre: Tensor

    def row(self, j: int) -> MixDraws:
        """The draws of sample ``j`` of the batch alone (a batch of one)."""
        return MixDraws(
            self.partner[j : j + 1], self.lam[j : j + 1], self.cut[j : j + 1], self.centre[j : j + 1]
        )


class Mixup:
    """``data.augment.mixup``: draws partners and weights per sample and mixes images and labels."""

    def __init__(
        self, num_classes: int, mixup_alpha: float, cutmix_alpha: float, prob: float, switch_prob: float
    ) -> None:
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob = prob, switch_prob

    def draw(self, keys: SampleKeys, size: int) -> MixDraws:
        """The draws of the samples ``keys.indices`` in a training set of ``size`` samples."""
        u = keys.uniform(5 + 2 * JOHNK_TRIES)
        on = (u[:, 0] < self.prob) & (size > 1)
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cut = u[:, 1] < self.switch_prob
        else:
            cut = torch.full_like(on, self.cutmix_alpha > 0)
        offset = 1 + (u[:, 2] * max(size - 1, 1)).long().clamp(max=max(size - 2, 0))
        partner = torch.where(on, (keys.indices + offset) % size, keys.indices)
        lam = torch.where(
            cut,
            symmetric_beta(self.cutmix_alpha, u[:, 5:]),
            symmetric_beta(self.mixup_alpha, u[:, 5:]),
        )
        return MixDraws(partner, torch.where(on, lam, 1.0), cut & on, u[:, 3:5])

    def mix(
        self, images: Tensor, partners: Tensor, labels: Tensor, partner_labels: Tensor, draws: MixDraws
    ) -> tuple[Tensor, Tensor]:
        """Float images in [0, 1] ``[B, C, H, W]`` and targets ``[B, num_classes]`` for a batch whose
        partners' images and labels are given (uint8 or [0, 1] float images)."""
        a, b = _unit(images), _unit(partners)
        h, w = a.shape[-2:]
        lam = draws.lam.clone()
        for row in torch.nonzero(draws.cut).flatten().tolist():
            (y0, y1, x0, x1), lam[row] = cut_box(float(lam[row]), draws.centre[row], h, w)
            a[row, :, y0:y1, x0:x1] = b[row, :, y0:y1, x0:x1]
        blend = (~draws.cut).nonzero().flatten()
        weight = lam[blend].to(a.dtype).view(-1, 1, 1, 1)
        a[blend] = weight * a[blend] + (1 - weight) * b[blend]
        targets = lam[:, None] * _onehot(labels, self.num_classes)
        targets += (1 - lam[:, None]) * _onehot(partner_labels, self.num_classes)
        return a, targets.float()

    def describe(self) -> str:
        parts = []
        if self.mixup_alpha > 0:
            parts.append(f"mixup (alpha {self.mixup_alpha:g})")
        if self.cutmix_alpha > 0:
            parts.append(f"CutMix (alpha {self.cutmix_alpha:g})")
        switch = f", CutMix share {self.switch_prob:g}" if len(parts) == 2 else ""
        return f"{' or '.join(parts)} with a per-sample partner, probability {self.prob:g}{switch}"


JOHNK_TRIES = 8
"""Candidate pairs of :func:`symmetric_beta` for ``alpha <= 1/2`` (each accepted with probability >= 0.78)."""


def symmetric_beta(alpha: float, u: Tensor) -> Tensor:
    """``Beta(alpha, alpha)`` samples ``[B]`` from uniforms ``u`` ``[B, 2 * JOHNK_TRIES]``, exactly.

    ``alpha > 1/2``: Ulrich's (1984) polar method, ``1/2 + 1/2 sqrt(1 - u0^(2 / (2 alpha - 1)))
    cos(2 pi u1)``. ``alpha <= 1/2``: Johnk's (1964) rejection, ``X = u^(1/alpha)``, ``Y = v^(1/alpha)``,
    the first pair with ``X + Y <= 1`` gives ``X / (X + Y)`` (in logs; all 8 pairs rejected, an event
    of probability < 1e-5, falls back to the first pair's ratio). ``alpha = 0`` gives ones."""
    if alpha <= 0:
        return torch.ones(u.shape[0], dtype=torch.float64)
    if alpha > 0.5:
        radius = torch.sqrt(1 - u[:, 0] ** (2 / (2 * alpha - 1)))
        return 0.5 + 0.5 * radius * torch.cos(2 * math.pi * u[:, 1])
    log_u = torch.log(u.clamp_min(1e-300)).view(-1, JOHNK_TRIES, 2) / alpha
    log_sum = torch.logaddexp(log_u[..., 0], log_u[..., 1])
    accepted = log_sum <= 0
    first = torch.where(accepted.any(1), accepted.double().argmax(1), 0)
    rows = torch.arange(u.shape[0])
    return torch.exp(log_u[rows, first, 0] - log_sum[rows, first])


def cut_box(lam: float, centre: Tensor, h: int, w: int) -> tuple[tuple[int, int, int, int], float]:
    """CutMix's box ``(y0, y1, x0, x1)`` for ``lam`` and its centre uniforms, and the corrected lambda
    ``1 - box area / (H W)`` (Yun et al., Algorithm A1; box sides ``int(side * sqrt(1 - lam))``)."""
    cut = (1 - lam) ** 0.5
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(float(centre[0]) * h), int(float(centre[1]) * w)
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    return (y0, y1, x0, x1), 1 - (y1 - y0) * (x1 - x0) / (h * w)


def _unit(images: Tensor) -> Tensor:
    return images.float() / 255 if images.dtype == torch.uint8 else images.float().clone()


def _onehot(labels: Tensor, num_classes: int) -> Tensor:
    labels = torch.as_tensor(labels)
    if labels.is_floating_point():
        return labels.double()
    return F.one_hot(labels.long(), num_classes).double()
