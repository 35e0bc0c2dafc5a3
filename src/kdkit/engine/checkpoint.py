"""Atomic checkpoints: write to a temporary file in the same folder, fsync, then rename.

A reader never sees a half-written file, and a run killed while saving keeps its previous checkpoint
(its ``.<name>.*.tmp`` file is removed when the next run starts or resumes, see
:mod:`kdkit.engine.rundir`). A full disk raises :class:`DiskFullError` naming the file, after removing
the temporary file. Checkpoints hold tensors, numbers and strings only and are read back with
``weights_only=True``; the trainer writes them only from an all-finite state (:func:`first_nonfinite`).
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..errors import KdkitError

DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
TMP_GLOB = ".*.tmp"  # what atomic_write leaves behind when killed mid-write


class DiskFullError(KdkitError):
    """No space (or quota) left while writing ``path``; the file's previous version is intact."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(
            f"the disk is full: could not write {path} (no space or quota left); its previous version, "
            "if any, is intact"
        )


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is ENOSPC/EDQUOT."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file under the process's umask (0644 under umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = new_file_mode()


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(file_object)`` on a temp file next to ``path``, then atomically replace ``path``.

    ``mkstemp`` creates the temp file 0600; it gets the mode of any other new file (umask applied)
    before it replaces ``path``, so atomically written files match ``metrics.jsonl`` and the weights.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(exc):
            raise DiskFullError(path) from None
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


def position(state: dict[str, Any]) -> str:
    """Where a checkpoint stands, e.g. ``stage 'main', step 12`` (step = completed optimizer steps
    of that stage, as ``metrics.jsonl`` counts them)."""
    stage = state.get("stage_name")
    stage = f"'{stage}'" if stage is not None else str(state.get("stage", 0))
    return f"stage {stage}, step {state.get('step', 0)}"


def peek_position(path: Path) -> str | None:
    """:func:`position` of the checkpoint at ``path`` without reading its tensors (memory-mapped),
    or None when it cannot be read."""
    try:
        return position(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    except Exception:  # noqa: BLE001 - an unreadable checkpoint simply has no position to show
        return None


def first_nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """Label of the first floating-point tensor holding a NaN or an infinity, or None.

    All checks are gathered into one tensor, so the device synchronises once.
    """
    labelled = [(label, t) for label, t in tensors if t.is_floating_point() or t.is_complex()]
    if not labelled:
        return None
    device = labelled[0][1].device
    flags = torch.stack([torch.isfinite(t).all().to(device) for _, t in labelled]).cpu()
    if bool(flags.all()):
        return None
    return labelled[int((~flags).nonzero()[0, 0])][0]


def state_tensors(state: Any, prefix: str = "") -> Iterable[tuple[str, torch.Tensor]]:
    """Every tensor of a nested checkpoint dict/list, labelled by its path (``student.fc.weight``)."""
    if isinstance(state, torch.Tensor):
        yield prefix, state
    elif isinstance(state, dict):
        for key, value in state.items():
            yield from state_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            yield from state_tensors(value, f"{prefix}[{i}]")
