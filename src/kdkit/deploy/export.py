"""The exported network: ``student.safetensors`` plus ``student.json``, the spec needed to rebuild it.

No teacher, no connectors: a deployed model needs only these two files (:func:`load_student`).
Every run exports the network it trained under these names, also a run without a teacher (e.g. one
that trains a teacher from labels): its spec says ``"role": "network"`` (``"student"`` when the run
distilled from a teacher), and a later run uses its ``student.safetensors`` as ``teacher.weights``.
The file name stays ``student.*`` so that one path works for every run (the presets rely on it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..engine.checkpoint import atomic_write_json
from ..errors import KdkitError
from ..models import build_model, load_weights, save_weights

WEIGHTS = "student.safetensors"
SPEC = "student.json"


@dataclass
class ModelSpec:
    """Everything needed to rebuild and feed a trained network.

    ``role``: ``"student"`` when the run distilled it from a teacher, ``"network"`` when it learned
    from labels alone (it may then be a later run's teacher).
    """

    model: str
    num_classes: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    classes: list[str] = field(default_factory=list)
    image_size: tuple[int, int] | None = None
    task: str = "classification"
    role: str = "student"

    def build(self) -> nn.Module:
        return build_model(self.model, num_classes=self.num_classes, **self.kwargs)


def export_student(student: nn.Module, spec: ModelSpec, out_dir: Path) -> Path:
    """Write ``student.safetensors`` and ``student.json`` into ``out_dir`` atomically; returns the weights.

    The weights' metadata and the spec carry ``spec.role`` (see :class:`ModelSpec`).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS
    metadata = {"model": spec.model, "num_classes": str(spec.num_classes), "role": spec.role}
    save_weights(student, weights, metadata=metadata)
    atomic_write_json(out_dir / SPEC, asdict(spec))
    return weights


def read_spec(path: Path) -> ModelSpec:
    spec_path = path / SPEC if path.is_dir() else path.with_name(SPEC)
    if not spec_path.is_file():
        raise KdkitError(f"no {SPEC} at {spec_path.parent}: expected a run directory or an exported student")
    data = json.loads(spec_path.read_text())
    data["mean"], data["std"] = tuple(data["mean"]), tuple(data["std"])
    if data.get("image_size") is not None:
        data["image_size"] = tuple(data["image_size"])
    return ModelSpec(**data)


def load_student(path: str | Path) -> tuple[nn.Module, ModelSpec]:
    """Rebuild an exported network from its run directory (or its ``student.safetensors``)."""
    path = Path(path)
    spec = read_spec(path)
    weights = path / WEIGHTS if path.is_dir() else path
    model = spec.build()
    load_weights(model, weights)
    return model.eval(), spec
