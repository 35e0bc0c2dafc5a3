"""Training and loading the AdaIN style model of the ``style`` refiner (``kdkit train-style``).

F and G are trained in tandem to reconstruct the user's images (patent [0022]). F may instead be the
frozen front part of a teacher (``teacher``: model name, weights file, split path): then only G trains,
and the saved file records the teacher so the refiner rebuilds the same F.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import build_dataset
from ..errors import KdkitError
from .style_transfer import (
    AdaINStyle,
    StyleDecoder,
    StyleEncoder,
    encoder_channels,
    load_style_model,
    read_style_spec,
    save_style_model,
    train_style_autoencoder,
)

MAX_IMAGES = 5000


class _Normalized(nn.Module):
    """A teacher front fed with [0, 1] images: normalises them as the teacher was trained."""

    def __init__(self, front: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.front = front
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..taps import main_output

        return main_output(self.front((x - self.mean) / self.std))


def teacher_front(teacher: dict[str, Any]) -> nn.Module:
    """The frozen front part of ``teacher`` = ``{name, weights, split, num_classes?}`` as a [0, 1]-input
    encoder (normalised with the ``student.json`` next to the weights, else ImageNet statistics)."""
    from ..data.base import IMAGENET_MEAN, IMAGENET_STD
    from ..models import build_model, load_weights
    from ..models.spirit import split_model

    missing = {"name", "weights", "split"} - set(teacher)
    if missing:
        raise KdkitError(f"teacher front needs keys name, weights and split; missing {sorted(missing)}")
    weights = Path(teacher["weights"])
    spec_path = weights.parent / "student.json"
    spec = json.loads(spec_path.read_text()) if spec_path.is_file() else {}
    model = build_model(
        teacher["name"], num_classes=int(teacher.get("num_classes") or spec.get("num_classes", 10))
    )
    load_weights(model, weights)
    front, _ = split_model(model, teacher["split"])
    encoder = _Normalized(front, spec.get("mean", IMAGENET_MEAN), spec.get("std", IMAGENET_STD)).eval()
    for param in encoder.parameters():
        param.requires_grad_(False)
    return encoder


def _images(data: str, root: str | None, split: str, params: dict[str, Any]) -> torch.Tensor:
    dataset = build_dataset(data, split, root=root, **params)
    if getattr(dataset, "images", None) is not None:
        return dataset.images[:MAX_IMAGES]
    items = [dataset[i][0] for i in range(min(len(dataset), MAX_IMAGES))]
    if any(item.shape != items[0].shape for item in items):
        raise KdkitError(
            f"{data}: images differ in size; pass params with a resize/image_size to train-style"
        )
    return torch.stack(items)


def train_style_model(
    data: str,
    out: str | Path,
    *,
    root: str | None = None,
    split: str = "train",
    params: dict[str, Any] | None = None,
    teacher: dict[str, Any] | None = None,
    width: int = 32,
    depth: int = 3,
    steps: int = 2000,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
) -> list[float]:
    """Train the AdaIN F/G on a dataset's images and save them to ``out`` (``.safetensors`` + ``.json``);
    returns the reconstruction loss per step."""
    images = _images(data, root, split, dict(params or {}))
    encoder = teacher_front(teacher) if teacher else StyleEncoder(width, depth)
    decoder = StyleDecoder(encoder_channels(encoder, min(images.shape[-2:])), width, depth)
    losses = train_style_autoencoder(
        images,
        encoder,
        decoder,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        generator=seed,
        freeze_encoder=teacher is not None,
    )
    spec = {
        "data": data,
        "root": root,
        "split": split,
        "params": params or {},
        "steps": steps,
        "teacher": teacher,
    }
    save_style_model(out, encoder, decoder, spec)
    return losses


def load_trained_style(path: str | Path) -> AdaINStyle:
    """Load a ``kdkit train-style`` file, rebuilding the teacher front it was trained with, if any."""
    teacher = (read_style_spec(Path(path)).get("spec") or {}).get("teacher")
    return load_style_model(path, encoder=teacher_front(teacher) if teacher else None)
