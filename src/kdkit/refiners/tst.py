"""``tst``: "Teaching what you Should Teach" (Shao et al., IJCAI 2023), a learnable data refiner.

Stage I (Sec. 3.4, Eq. 3): one meta-encoder per primitive with a magnitude (a spatial transformer for
the affine ops, a colour network for the colour ops; :mod:`kdkit.refiners.tst_encoders`), fitted by MSE
to the hand-made op (:mod:`kdkit.refiners.tst_ops`) once per image size, cached, then frozen.

Stage II (Sec. 3.3, 3.5): learnable magnitudes ``theta_m`` (11) and probabilities ``theta_p`` (14). For
every batch, ``num_ops`` (N_A) distinct primitives Z are drawn; per image, the relaxed Bernoulli
(Eq. 4, temperature ``temperature``) gives ``p_i = RBD(sigmoid(theta_p))`` and ``m_i =
RBD(sigmoid(theta_m))`` (with AutoAugment's random sign for signed ops), and (Eq. 5)

    x_hat = x + sum_i p_i * (f_E(x, m_i) - x)        (clamped to [0, 1])

The search loss (Eq. 2) makes the frozen teacher right and the frozen student wrong on x_hat:
``alpha * CE(p_T(x_hat), y) + beta * CE(1 - p_S(x_hat), y)``; the engine minimises it with the
refiner's own optimizer on the ``update`` schedule (:mod:`kdkit.engine.refining`), so n_encoder << n_student
(Table 6) is ``update.every`` > 1.

Stage III (Sec. 3.2, Eq. 1): the student steps on ``[x; x_hat]`` (original and augmented samples
together) with the run's terms (``ce`` + ``kd``, or any logit term).

Our readings, where the paper leaves a choice:

- Eq. 4 writes ``sigmoid((log p + L) / tau)``; we use the relaxed Bernoulli of Maddison et al. (2017),
  ``sigmoid((logit p + L) / tau)``, whose value is near 1 with probability p (with ``log p`` it would be
  near 1 with probability p / (1 + p) only). With ``q = sigmoid(theta)``, ``logit q = theta``.
- The primitives are drawn once per batch (the same Z for every image, as "N_A primitives per batch");
  the relaxed draws, signs and cutout positions are drawn per image, for the global batch (then sliced),
  so N processes draw what one process draws.
- Segmentation: Eq. 5's sum of differently warped images would not correspond to one mask, so the
  chosen ops are composed in turn, ``x <- x + p_i (f_E(x, m_i) - x)``, and an affine op applies with a
  hard (straight-through) p in {0, 1}: the mask is warped by the same matrix (nearest; pixels from
  outside the frame get the ignore label). Colour ops and Cutout leave the mask alone.
- Detection (the "separate algorithm" of the paper's Appendix D, which is not in the seed text): the
  same composition, for the reason Sec. 3.5 gives (Eq. 5's sum turns one object into several); the
  boxes move with the meta-encoder's own matrix (:func:`~kdkit.refiners.tst_ops.warp_boxes`: the
  enclosing box of the moved corners, clamped; boxes left thinner than 2 px are dropped). Stage II
  (Sec. 4, "losses that drove the student box regression to be inaccurate and the teacher box
  regression to be accurate"): ``alpha * sum(L_T) + beta * sum(A(L_S))`` over each detector's own
  losses (classification, box regression, centre-ness), with ``A(L) = -log(1 - exp(-L))``: Eq. 2's
  ``CE(1 - p)`` written for a loss ``L = -log p``, bounded below (no divergence) and decreasing in L,
  so the search raises every student loss, the box terms included.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.det_augment import MIN_BOX
from ..errors import KdkitError
from ..registry import REFINERS, did_you_mean
from .base import DataRefiner, RefinerContext, fit_to_size
from .tst_ops import (
    AFFINE_OPS,
    MAGNITUDE_OPS,
    PRIMITIVES,
    SIGNED_OPS,
    cutout,
    hand_op,
    warp,
    warp_boxes,
)


def relaxed_bernoulli(theta: Tensor, noise: Tensor, temperature: float) -> Tensor:
    """Eq. 4 with ``q = sigmoid(theta)``: ``sigmoid((logit q + L) / tau)``, ``L ~ Logistic(0, 1)``."""
    return torch.sigmoid((theta + noise) / temperature)


def logistic(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    u = torch.rand(shape, generator=generator).clamp(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


def anti_ce(logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """``CE(1 - p, y) = -log(1 - p_y)`` (Eq. 2's student part), computed as
    ``logsumexp(z) - logsumexp(z without z_y)``; mean over labelled samples (or pixels). Soft targets
    ``q`` ``(B, C)`` (mixup/CutMix) give ``-sum_c q_c log(1 - p_c)``, the same reading per class."""
    if labels.is_floating_point():
        log_rest = torch.log1p(-logits.float().softmax(1).clamp(max=1 - 1e-6))
        return -(labels * log_rest).sum(1).mean()
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    others = logits.scatter(1, safe.unsqueeze(1), float("-inf"))
    loss = torch.logsumexp(logits, 1) - torch.logsumexp(others, 1)
    return (loss * valid).sum() / valid.sum().clamp(min=1)


def anti_loss(loss: Tensor) -> Tensor:
    """``A(L) = -log(1 - exp(-L))``: Eq. 2's ``CE(1 - p)`` for a loss ``L = -log p`` (L >= 0)."""
    return -torch.log(-torch.expm1(-loss.float().clamp(min=1e-6)))


@REFINERS.register(
    "tst", "TST (IJCAI 2023): learned augmentation the teacher gets right and the student wrong"
)
class TSTRefiner(DataRefiner):
    """Data refiner of TST (see the module docstring).

    ``num_ops``: N_A primitives per batch (paper: 4). ``temperature``: tau_l of Eq. 4 (0.05).
    ``alpha``, ``beta``: Eq. 2's weights (1, 1; Table 8 lowers alpha for strong teachers).
    ``primitives``: a subset of the 14 (default all). ``fit_steps``, ``fit_images``: Stage I fitting.
    ``keep_original``: the student sees ``[x; x_hat]`` (true, Sec. 3.2) or ``x_hat`` only.
    """

    def __init__(
        self,
        *,
        num_ops: int = 4,
        temperature: float = 0.05,
        alpha: float = 1.0,
        beta: float = 1.0,
        primitives: list[str] | None = None,
        fit_steps: int | None = None,
        fit_images: int = 512,
        keep_original: bool = True,
    ) -> None:
        super().__init__()
        chosen = list(primitives or PRIMITIVES)
        for name in chosen:
            if name not in PRIMITIVES:
                hint = did_you_mean(name, list(PRIMITIVES))
                raise KdkitError(f"tst refiner: unknown primitive '{name}'{hint}")
        if not 1 <= num_ops <= len(chosen):
            raise KdkitError(f"tst refiner: num_ops must be between 1 and {len(chosen)} (got {num_ops})")
        if temperature <= 0:
            raise KdkitError(f"tst refiner: temperature must be positive (got {temperature})")
        self.primitives = chosen
        self.num_ops, self.temperature = num_ops, temperature
        self.alpha, self.beta = alpha, beta
        self.fit_steps, self.fit_images = fit_steps, fit_images
        self.keep_original = keep_original
        magnitude = [n for n in chosen if n in MAGNITUDE_OPS]
        self.magnitude_index = {name: i for i, name in enumerate(magnitude)}
        self.theta_m = nn.Parameter(torch.zeros(len(magnitude)))  # sigmoid(0) = 0.5: half strength
        self.theta_p = nn.Parameter(torch.zeros(len(chosen)))  # sigmoid(0) = 0.5
        self.encoders = nn.ModuleDict()
        self.fit_errors: dict[str, float] = {}
        self.size: tuple[int, int] | None = None  # the image size prepared for

    # ------------------------------------------------------------------ stage I

    def setup(self, context: RefinerContext) -> None:
        super().setup(context)
        if context.task not in ("classification", "segmentation", "detection"):
            raise KdkitError(
                f"tst refiner: task '{context.task}' is not supported "
                "(classification, segmentation, detection)"
            )

    def prepare(self, size: tuple[int, int]) -> None:
        """Stage I for images of ``size`` (the engine calls it before training; a batch of another size
        calls it again): load the cached meta-encoders or fit them (Eq. 3) on the run's training images,
        centre-cropped or resized to ``size``."""
        size = (int(size[0]), int(size[1]))
        magnitude = [n for n in self.primitives if n in MAGNITUDE_OPS]
        if self.size == size or not magnitude:
            self.size = size
            return
        data = self.context.train_data
        if data is None:
            raise KdkitError("tst refiner: no training images to fit its meta-encoders on")
        count = min(self.fit_images, len(data))
        images = torch.stack([fit_to_size(torch.as_tensor(data[i][0]), size) for i in range(count)])
        from .tst_encoders import load_or_fit  # noqa: PLC0415 - stage I only when magnitude ops are used

        kwargs = {} if self.fit_steps is None else {"steps": self.fit_steps}
        encoders, errors = load_or_fit(
            size,
            images.float() / 255.0,
            progress=_say,
            **kwargs,  # seed 0: one fit serves every run seed
        )
        self.encoders = nn.ModuleDict({n: encoders[n] for n in magnitude}).to(self.context.device)
        for param in self.encoders.parameters():
            param.requires_grad_(False)
        self.encoders.eval()
        self.fit_errors = {n: errors[n] for n in magnitude}
        self.size = size

    def describe(self) -> str | None:
        if not self.fit_errors:
            return None
        errors = ", ".join(f"{name} {error:.3f}" for name, error in self.fit_errors.items())
        height, width = self.size or (0, 0)
        return f"stage I meta-encoders for {height}x{width} images, relative error per primitive: {errors}"

    # ------------------------------------------------------------------ stage II / III

    def _draws(self, generator: torch.Generator, total: int, start: int, count: int) -> dict[str, Tensor]:
        """Z (per batch), logistic noise for p and m, signs and cutout centres (per global image)."""
        z = torch.randperm(len(self.primitives), generator=generator)[: self.num_ops]
        shape = (total, self.num_ops)
        draws = {
            "p_noise": logistic(shape, generator),
            "m_noise": logistic(shape, generator),
            "sign": torch.randint(0, 2, shape, generator=generator).float() * 2 - 1,
            "centre": torch.rand((total, 2), generator=generator),
        }
        return {"z": z, **{k: v[start : start + count] for k, v in draws.items()}}

    def augment(
        self, images01: Tensor, moving: Tensor | None, generator: torch.Generator, total: int, start: int
    ) -> tuple[Tensor, Tensor | None]:
        """x_hat (Eq. 5; composed in turn for segmentation and detection) from images in [0, 1], and the
        labels that move with the pixels (masks, box targets) moved with them."""
        self.prepare(tuple(images01.shape[-2:]))
        device = images01.device
        draws = {k: v.to(device) for k, v in self._draws(generator, total, start, images01.shape[0]).items()}
        compose = moving is not None
        x = images01
        out = images01
        height, width = images01.shape[-2:]
        for slot, index in enumerate(draws["z"].tolist()):
            name = self.primitives[index]
            p = relaxed_bernoulli(self.theta_p[index], draws["p_noise"][:, slot], self.temperature)
            source = out if compose else x
            if name in MAGNITUDE_OPS:
                theta = self.theta_m[self.magnitude_index[name]]
                m = relaxed_bernoulli(theta, draws["m_noise"][:, slot], self.temperature)
                if name in SIGNED_OPS:
                    m = m * draws["sign"][:, slot]
                changed = self.encoders[name](source, m)
            elif name == "Cutout":
                centres = draws["centre"] * torch.tensor([height, width], device=device)
                changed = cutout(source, centres.long())
            else:
                changed = hand_op(name, source, None)
            if compose and name in AFFINE_OPS:
                hard = (p > 0.5).float()
                p = hard + p - p.detach()  # straight through: applied fully or not at all
                moving = self._move(moving, self.encoders[name].matrix(m), hard > 0, (height, width))
            delta = p.view(-1, 1, 1, 1) * (changed - source)
            out = out + delta
        return out.clamp(0, 1), moving

    def _move(self, labels: Tensor, matrix: Tensor, applied: Tensor, size: tuple[int, int]) -> Tensor:
        """Masks (nearest, out-of-frame pixels ignored) or box targets warped by ``matrix`` where
        ``applied``."""
        if self.context.task == "detection":
            moved = warp_boxes(labels, matrix, size, MIN_BOX)
        else:
            ignore = self.context.ignore_index
            moved = warp(labels.unsqueeze(1).float(), matrix, mode="nearest", fill=ignore)
            moved = moved.squeeze(1).round().long()
        return torch.where(applied.view(-1, *[1] * (labels.dim() - 1)), moved, labels)

    def forward(
        self, images: Tensor, labels: Tensor, generator: torch.Generator, total: int, start: int
    ) -> tuple[Tensor, Tensor]:
        """Stage III's batch: ``[x; x_hat]`` (or ``x_hat``) and the labels (masks, boxes moved with x_hat)."""
        moving = labels if self._labels_move else None
        unit, moved = self.augment(self.context.to_unit(images.float()), moving, generator, total, start)
        augmented = self.context.normalize(unit).to(images.dtype)
        new_labels = moved if moved is not None else labels
        if not self.keep_original:
            return augmented, new_labels
        return torch.cat([images, augmented]), torch.cat([labels, new_labels])

    def loss(
        self,
        images: Tensor,
        labels: Tensor,
        generator: torch.Generator,
        total: int,
        start: int,
        frozen: Any,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Eq. 2: ``alpha CE(p_T(x_hat), y) + beta CE(1 - p_S(x_hat), y)``, teacher and student frozen;
        for detection, over the detectors' own losses (module docstring)."""
        moving = labels if self._labels_move else None
        unit, moved = self.augment(self.context.to_unit(images.float()), moving, generator, total, start)
        target = moved if moved is not None else labels
        x_hat = self.context.normalize(unit).to(images.dtype)
        if self.context.task == "detection":
            teacher = sum(frozen.losses("teacher", x_hat, target).values())
            student = sum(anti_loss(v) for v in frozen.losses("student", x_hat, target).values())
            loss = self.alpha * teacher + self.beta * student
            return loss, {"teacher_det": teacher.detach(), "student_anti_det": student.detach()}
        ignore = self.context.ignore_index
        teacher = F.cross_entropy(frozen.teacher(x_hat), target, ignore_index=ignore)
        student = anti_ce(frozen.student(x_hat), target, ignore)
        loss = self.alpha * teacher + self.beta * student
        return loss, {"teacher_ce": teacher.detach(), "student_anti_ce": student.detach()}

    @property
    def _labels_move(self) -> bool:
        return self.context.task in ("segmentation", "detection")

    def log_state(self) -> dict[str, float]:
        """sigmoid(theta): each primitive's magnitude and probability (the paper's Fig. 2)."""
        m, p = torch.sigmoid(self.theta_m.detach()), torch.sigmoid(self.theta_p.detach())
        state = {f"m/{n}": float(m[i]) for n, i in self.magnitude_index.items()}
        state.update({f"p/{n}": float(p[i]) for i, n in enumerate(self.primitives)})
        return state


def _say(line: str) -> None:
    print(line, flush=True)
