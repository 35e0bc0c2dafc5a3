"""``cifar10`` / ``cifar100`` from a local folder in torchvision's format, held in memory.

``root`` holds ``cifar-10-batches-py`` or ``cifar-100-python`` (default root:
``$KDKIT_CACHE/datasets``). The pickled batches are read directly; ``download=True`` first
fetches them with ``torchvision.datasets`` (needs network access).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import KdkitError
from ..registry import DATASETS
from .base import ImageDataset, TensorDataset, cache_dir, check_split


@dataclass(frozen=True)
class CifarFormat:
    folder: str
    files: dict[str, tuple[str, ...]]
    meta: str
    names_key: str
    labels_key: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    torchvision_class: str


CIFAR10 = CifarFormat(
    "cifar-10-batches-py",
    {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    "batches.meta",
    "label_names",
    "labels",
    (0.4914, 0.4822, 0.4465),
    (0.2470, 0.2435, 0.2616),
    "CIFAR10",
)
CIFAR100 = CifarFormat(
    "cifar-100-python",
    {"train": ("train",), "test": ("test",)},
    "meta",
    "fine_label_names",
    "fine_labels",
    (0.5071, 0.4865, 0.4409),
    (0.2673, 0.2564, 0.2762),
    "CIFAR100",
)


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def load_cifar(fmt: CifarFormat, split: str, root: str | None, download: bool) -> ImageDataset:
    name = fmt.torchvision_class.lower()
    check_split(split, list(fmt.files), name)
    base = Path(root).expanduser() if root else cache_dir("datasets")
    if download:
        import torchvision.datasets  # only needed here; needs network access

        getattr(torchvision.datasets, fmt.torchvision_class)(str(base), train=split == "train", download=True)
    folder = base / fmt.folder
    missing = [f for f in (*fmt.files[split], fmt.meta) if not (folder / f).is_file()]
    if missing:
        raise KdkitError(
            f"{name} not found: expected {folder} with {', '.join(missing)}; point root at the folder that "
            f"contains '{fmt.folder}', or set download=true on a machine with network access"
        )
    batches = [_unpickle(folder / f) for f in fmt.files[split]]
    images = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([b[fmt.labels_key] for b in batches])
    classes = list(_unpickle(folder / fmt.meta)[fmt.names_key])
    return TensorDataset(torch.from_numpy(images), torch.from_numpy(labels), classes, fmt.mean, fmt.std)


@DATASETS.register(
    "cifar10", "CIFAR-10 from a local torchvision-format folder (root; download=true needs network)"
)
def cifar10(split: str, root: str | None = None, download: bool = False) -> ImageDataset:
    """CIFAR-10 train/test, in memory."""
    return load_cifar(CIFAR10, split, root, download)


@DATASETS.register(
    "cifar100", "CIFAR-100 from a local torchvision-format folder (root; download=true needs network)"
)
def cifar100(split: str, root: str | None = None, download: bool = False) -> ImageDataset:
    """CIFAR-100 (fine labels) train/test, in memory."""
    return load_cifar(CIFAR100, split, root, download)
