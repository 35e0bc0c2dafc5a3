"""Teachers with their own inputs: the normalisation and resolution a teacher expects, applied to the
student's batch whenever the teacher runs.

The batch the engine builds is normalised with the data's mean/std (the student's input). A teacher
trained elsewhere may expect another normalisation (ImageNet's, CLIP's ...) or resolution (224 or 518 px
for foundation encoders). :func:`attach_teacher_input` registers a forward pre-hook on the teacher that
maps the batch, so every call of the teacher (the step, refiner losses, the teacher's evaluation, the dry
run that builds the connectors) sees its own input; module paths, and so the taps, are unchanged.

With ``x`` normalised by the data's ``(m_d, s_d)`` and the teacher's ``(m_t, s_t)``:
``x_t = (x * s_d + m_d - m_t) / s_t`` per channel, then a bilinear resize to the teacher's ``size``.

Where the teacher's input comes from, first found: the config's ``teacher.input``; the ``student.json``
beside a teacher trained by kdkit (its training normalisation; not its image size: a crop-trained dense
teacher runs on crops); the ``pretrained_cfg`` of a timm model loaded with weights that did not come from
kdkit (mean, std and input size). Otherwise the teacher gets the student's input unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import KdkitError


class TeacherInput:
    """The map from the student's normalised batch to the teacher's input (a forward pre-hook)."""

    def __init__(
        self,
        data_mean: Sequence[float],
        data_std: Sequence[float],
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        size: Sequence[int] | None,
        source: str,
    ) -> None:
        self.data = (tuple(map(float, data_mean)), tuple(map(float, data_std)))
        self.mean = tuple(map(float, mean)) if mean is not None else self.data[0]
        self.std = tuple(map(float, std)) if std is not None else self.data[1]
        if len(self.mean) != len(self.data[0]) or len(self.std) != len(self.data[1]):
            raise KdkitError(
                f"the teacher's input mean/std have {len(self.mean)}/{len(self.std)} channels but the data "
                f"has {len(self.data[0])}; give one value per channel in teacher.input"
            )
        if any(s <= 0 for s in self.std):
            raise KdkitError(f"the teacher's input std must be positive, got {list(self.std)}")
        self.size = tuple(int(s) for s in size) if size is not None else None
        self.source = source
        dm, ds = (torch.tensor(v) for v in self.data)
        tm, ts = torch.tensor(self.mean), torch.tensor(self.std)
        self.scale = (ds / ts).view(1, -1, 1, 1)
        self.shift = ((dm - tm) / ts).view(1, -1, 1, 1)

    @property
    def identity(self) -> bool:
        return self.mean == self.data[0] and self.std == self.data[1] and self.size is None

    def __call__(self, x: Tensor) -> Tensor:
        x = x * self.scale.to(x.device, x.dtype) + self.shift.to(x.device, x.dtype)
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return x

    def describe(self) -> str:
        size = f", resized to {self.size[0]}x{self.size[1]}" if self.size else ""
        return (
            f"teacher input ({self.source}): renormalised from the data's mean/std "
            f"{_fmt(self.data[0])}/{_fmt(self.data[1])} to {_fmt(self.mean)}/{_fmt(self.std)}{size}"
        )


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"


def declared_input(
    model: nn.Module, weights: Path | None, config: Any | None
) -> tuple[Sequence[float] | None, Sequence[float] | None, Sequence[int] | None, str] | None:
    """``(mean, std, size, source)`` the teacher declares (see the module docstring), or None."""
    if config is not None:
        return config.mean, config.std, config.size, "teacher.input"
    spec_path = Path(weights).with_name("student.json") if weights is not None else None
    if spec_path is not None and spec_path.is_file():
        from ..deploy.export import read_spec

        spec = read_spec(spec_path.parent)
        return spec.mean, spec.std, None, f"the normalisation it was trained with ({spec_path})"
    cfg = getattr(model, "pretrained_cfg", None)
    if weights is not None and isinstance(cfg, dict) and cfg.get("mean") and cfg.get("std"):
        size = cfg.get("input_size")
        return cfg["mean"], cfg["std"], tuple(size[-2:]) if size else None, "its timm pretrained_cfg"
    return None


def attach_teacher_input(
    teacher: nn.Module,
    data_mean: Sequence[float],
    data_std: Sequence[float],
    weights: Path | None = None,
    config: Any | None = None,
) -> TeacherInput | None:
    """Register the map to the teacher's declared input on ``teacher`` (none when it matches the data);
    returns it (its :meth:`~TeacherInput.describe` says what it does)."""
    declared = declared_input(teacher, weights, config)
    if declared is None:
        return None
    adapter = TeacherInput(data_mean, data_std, *declared)
    if adapter.identity:
        return None
    teacher.register_forward_pre_hook(lambda _module, args: (adapter(args[0]), *args[1:]))
    teacher.kdkit_input = adapter
    return adapter
