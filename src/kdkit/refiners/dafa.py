"""DAFA: differentiable automatic feature augmentation of the teacher's features, the refiner half of
SoKD (Shen, Huang, Zhu, Fan & Zhang, "Student-Oriented Teacher Knowledge Refinement for Knowledge
Distillation", ACM MM 2024, Sec. 3.1 and 3.3).

Our reading of the paper:

- **Policy** (Eq. 3-4): the sub-policies are all ``k``-element combinations of the operations
  (:mod:`kdkit.refiners.dafa_ops`; 9 operations and ``k = 2`` give 36), applied in the order listed.
  Each of a sub-policy's ``k`` operations has its own probability ``beta = sigmoid(theta_p)`` and
  magnitude ``m = sigmoid(theta_m)``; the sub-policy weights are ``softmax(alpha)``. Initial values are
  not in the paper: uniform weights, probability and magnitude 0.5 (configurable).
- **Search** (Eq. 7, 14): first-order alternating updates (the engine's learnable-refiner contract): the
  policy parameters minimise ``L_aug = 1/2 mean (s(F^t) - Phi(F^s))^2`` with their own optimizer during
  the listed search epochs (``update.epochs``; Table 6: 20 of 240), the student, its adapters and the
  teacher frozen. ``Phi(F^s)`` is what the run's terms map the student onto in the teacher's space
  (:meth:`kdkit.terms.base.Term.teacher_space`: SoKD's adapter in ``dam``, FitNet's connector,
  ReviewKD's fused levels); where several terms give one, the losses are averaged.
- **Relaxation**: one sub-policy per step for the whole (global) batch, drawn with the Gumbel-max trick
  from ``alpha``; its output is scaled by ``1 + w_i - stopgrad(w_i)`` with ``w = softmax((alpha + g) /
  tau)`` (Eq. 8; value 1, gradient to ``alpha`` through the drawn ``w_i`` only, as DADA does, instead of
  running all sub-policies as Eq. 5's sum would). Application per sample with the relaxed Bernoulli of
  Eq. 9 (temperature ``lambda``), mixed as Eq. 6, ``b O(F) + (1 - b) F``. Magnitudes through the
  straight-through estimator of Eq. 10: ``O(F; stopgrad(m)) + (m - stopgrad(m))``, so
  ``dL/dm = sum_ij dL/dF_hat_ij``.
- **Student steps** (in and after the search): the policy is fixed and sampled: a sub-policy from
  ``softmax(alpha)``, each operation applied with probability ``beta`` (hard Bernoulli), magnitude ``m``.
- The refined taps default to every 4-D teacher tap some term maps the student onto; at the end the
  argmax policy goes into the run's report.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import KdkitError
from ..registry import REFINERS
from .base import FeatureRefiner, RefinerContext
from .dafa_ops import OPS


def _logit(p: float, what: str) -> float:
    if not isinstance(p, (int, float)) or not 0.0 < p < 1.0:
        raise KdkitError(f"refiner 'dafa': {what} must be strictly between 0 and 1, got {p!r}")
    return math.log(p / (1.0 - p))


def gumbel(shape: Sequence[int], generator: torch.Generator) -> Tensor:
    """Standard Gumbel noise ``-log(-log(u))``, ``u ~ U(0, 1)`` (kept away from 0 and 1)."""
    u = torch.rand(shape, generator=generator).clamp(1e-10, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def relaxed_bernoulli(prob_logit: Tensor, u: Tensor, temperature: float) -> Tensor:
    """Eq. 9: ``sigmoid((log(beta / (1 - beta)) + log(u / (1 - u))) / lambda)``, differentiable in beta."""
    return torch.sigmoid((prob_logit + torch.log(u) - torch.log1p(-u)) / temperature)


@REFINERS.register(
    "dafa", "Shen et al. 2024 (SoKD): searched augmentation of the teacher's features toward the student"
)
class DAFARefiner(FeatureRefiner):
    """SoKD's DAFA (module docstring): a policy over feature-map operations applied to teacher taps."""

    def __init__(
        self,
        *,
        taps: list[str] | None = None,
        ops: list[str] | None = None,
        k: int = 2,
        temperature: float = 0.5,
        bernoulli_temperature: float = 0.5,
        init_probability: float = 0.5,
        init_magnitude: float = 0.5,
    ) -> None:
        super().__init__()
        names = list(OPS) if ops is None else list(ops)
        unknown = [n for n in names if n not in OPS]
        if unknown or len(set(names)) != len(names):
            raise KdkitError(
                f"refiner 'dafa': ops must be distinct names among {', '.join(OPS)}; got {ops!r}"
            )
        if not isinstance(k, int) or not 1 <= k <= len(names):
            raise KdkitError(f"refiner 'dafa': k must be an integer in [1, {len(names)}] (ops), got {k!r}")
        for what, value in (("temperature", temperature), ("bernoulli_temperature", bernoulli_temperature)):
            if not isinstance(value, (int, float)) or value <= 0:
                raise KdkitError(f"refiner 'dafa': {what} must be a number > 0, got {value!r}")
        self.requested = list(taps) if taps else None
        self.taps: list[str] = []
        self.ops = names
        self.subpolicies = list(itertools.combinations(range(len(names)), k))
        self.temperature = float(temperature)
        self.bernoulli_temperature = float(bernoulli_temperature)
        count = len(self.subpolicies)
        self.alpha = nn.Parameter(torch.zeros(count))
        self.theta_p = nn.Parameter(torch.full((count, k), _logit(init_probability, "init_probability")))
        self.theta_m = nn.Parameter(torch.full((count, k), _logit(init_magnitude, "init_magnitude")))

    def setup(self, context: RefinerContext) -> None:
        super().setup(context)
        self.to(context.device)

    def bind(self, teacher_shapes: dict[str, torch.Size], targets: list[str]) -> None:
        if self.requested is None:
            self.taps = [k for k in targets if len(teacher_shapes.get(k, ())) == 4]
            if not self.taps:
                raise KdkitError(
                    "refiner 'dafa' has no teacher feature map to refine: add a term that maps the student "
                    "onto one (dam, fitnet, reviewkd) or list `taps`"
                )
            return
        for key in self.requested:
            if key not in teacher_shapes:
                raise KdkitError(
                    f"refiner 'dafa': teacher tap '{key}' is read by no term of its stages "
                    f"(they read: {', '.join(sorted(teacher_shapes))}); fix `taps`"
                )
            if len(teacher_shapes[key]) != 4:
                raise KdkitError(
                    f"refiner 'dafa' refines feature maps (B, C, H, W), but teacher tap '{key}' has shape "
                    f"{tuple(teacher_shapes[key])}; pick a stage output in `taps`"
                )
            if key not in targets:
                raise KdkitError(
                    f"refiner 'dafa': no term maps the student onto teacher tap '{key}', so its consistency "
                    "loss (SoKD Eq. 14) is undefined; add a `dam` or `fitnet` term on it"
                )
        self.taps = list(self.requested)

    def weights(self) -> Tensor:
        return torch.softmax(self.alpha.detach(), 0)

    def _refine(
        self, features: dict[str, Tensor], generator: torch.Generator, total: int, start: int, relaxed: bool
    ) -> dict[str, Tensor]:
        """Apply one sub-policy (drawn for the global batch) to every refined tap; per-sample draws are
        made for ``total`` samples and sliced at ``start``."""
        noise = gumbel((len(self.subpolicies),), generator).to(self.alpha.device)
        choice = int(torch.argmax(self.alpha.detach() + noise))
        scale = None
        if relaxed:
            w = torch.softmax((self.alpha + noise) / self.temperature, 0)[choice]
            scale = 1.0 + w - w.detach()
        out = dict(features)
        for key in self.taps:
            f = features[key]
            rows = slice(start, start + f.shape[0])
            for j, op_index in enumerate(self.subpolicies[choice]):
                op = OPS[self.ops[op_index]]
                rand = torch.rand((total, 4 + f.shape[1]), generator=generator)[rows].to(f.device)
                u = torch.rand((total,), generator=generator)[rows].to(f.device).clamp(1e-6, 1 - 1e-6)
                gauss = None
                if self.ops[op_index] == "noise":
                    gauss = torch.randn((total, *f.shape[1:]), generator=generator)[rows].to(f.device)
                m = torch.sigmoid(self.theta_m[choice, j])
                applied = op(f, m.detach(), rand, gauss) + (m - m.detach())  # Eq. 10
                logit = self.theta_p[choice, j]
                if relaxed:
                    b = relaxed_bernoulli(logit, u, self.bernoulli_temperature)
                else:
                    b = (u < torch.sigmoid(logit.detach())).to(f.dtype)
                b = b.view(-1, 1, 1, 1)
                f = b * applied + (1.0 - b) * f  # Eq. 6
            out[key] = f if scale is None else scale * f
        return out

    def forward(
        self, features: dict[str, Tensor], generator: torch.Generator, total: int, start: int
    ) -> dict[str, Tensor]:
        return self._refine(features, generator, total, start, relaxed=False)

    def loss(
        self, images: Tensor, labels, generator: torch.Generator, total: int, start: int, frozen
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``L_aug`` (Eq. 14) on the frozen networks' taps of ``images``: ``1/2 mean (s(F^t) - Phi(F^s))^2``
        for every refined tap, averaged over the targets of the tap and over the taps."""
        view = frozen.features(images)
        targets = frozen.teacher_space(view)
        refined = self._refine({k: view.teacher[k] for k in self.taps}, generator, total, start, relaxed=True)
        losses = []
        for key in self.taps:
            if key not in targets:
                raise KdkitError(
                    f"refiner 'dafa': no term of this stage maps the student onto teacher tap '{key}'; "
                    "limit the refiner's `stages` to those with a `dam` or `fitnet` term on it"
                )
            if not all(bool(torch.isfinite(t).all()) for t in targets[key]):
                raise KdkitError(
                    f"refiner 'dafa': the student's features mapped onto teacher tap '{key}' are not finite "
                    "(the student's steps diverged); lower the stage's lr or the terms' weights"
                )
            losses += [0.5 * F.mse_loss(refined[key], t) for t in targets[key]]
        aug = torch.stack(losses).mean()
        return aug, {}

    def _name(self, index: int) -> str:
        return "+".join(self.ops[i] for i in self.subpolicies[index])

    def log_state(self) -> dict[str, float]:
        return {f"w/{self._name(i)}": float(w) for i, w in enumerate(self.weights())}

    def policy(self, top: int = 3) -> list[dict]:
        """The ``top`` sub-policies by weight: name, weight, each operation's probability and magnitude."""
        weights, probs, mags = self.weights(), self.theta_p.detach(), self.theta_m.detach()
        order = torch.argsort(weights, descending=True)[:top].tolist()
        return [
            {
                "subpolicy": self._name(i),
                "weight": float(weights[i]),
                "ops": [
                    (self.ops[op], float(torch.sigmoid(p)), float(torch.sigmoid(m)))
                    for op, p, m in zip(self.subpolicies[i], probs[i], mags[i], strict=True)
                ],
            }
            for i in order
        ]

    def report(self) -> list[str]:
        def ops(entry: dict) -> str:
            return " then ".join(f"`{name}` (p {p:.2f}, m {m:.2f})" for name, p, m in entry["ops"])

        best, *rest = self.policy()
        uniform = 1.0 / len(self.subpolicies)
        lines = [
            f"DAFA policy (refined teacher taps: {', '.join(self.taps)}): the argmax sub-policy is "
            f"{ops(best)}, weight {best['weight']:.3f} (uniform {uniform:.3f}).",
        ]
        lines += [f"- next: {ops(e)}, weight {e['weight']:.3f}" for e in rest]
        return lines
