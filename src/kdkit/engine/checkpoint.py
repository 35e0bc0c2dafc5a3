"""Atomic checkpoints: write to a temporary file in the same folder, fsync, then rename.

A reader never sees a half-written file, and a run killed while saving keeps its previous checkpoint.
Checkpoints hold tensors, numbers and strings only and are read back with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import KdkitError


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(file_object)`` on a temp file next to ``path``, then atomically replace ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode()))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise KdkitError(
            f"no checkpoint at {path}: the run has not finished an epoch yet; start it without --resume"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise KdkitError(
            f"cannot read checkpoint {path} ({type(exc).__name__}: {exc}); it may be corrupt"
        ) from None
