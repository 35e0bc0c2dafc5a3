"""Load and save model weights from local files; nothing is ever downloaded or unpickled beyond tensors.

Reads ``.safetensors`` and PyTorch ``.pt``/``.pth``/``.bin`` files (with ``weights_only=True``), as a
raw state dict or a checkpoint holding one under ``state_dict``, ``model`` or ``student``; a DDP
``module.`` prefix is stripped. Writes safetensors atomically.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..engine.checkpoint import FILE_MODE
from ..errors import KdkitError

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
CHECKPOINT_KEYS = ("state_dict", "model", "student")
DDP_PREFIX = "module."
SHOWN = 3  # keys named per kind of mismatch
REFUSED = "WeightsUnpickler error: "  # torch.load's marker for objects that weights_only refuses


def _reason(err: Exception) -> str:
    text = str(err).split(REFUSED, 1)[-1].strip()
    return text.splitlines()[0].split(". ")[0] if text else type(err).__name__


def _read(path: Path) -> object:
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", *TORCH_SUFFIXES):
        raise KdkitError(
            f"cannot read weights file {path}: unknown suffix '{suffix}' (use .safetensors, .pt, .pth, .bin)"
        )
    try:
        if suffix == ".safetensors":
            return load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # neither reader runs code from the file: any failure means an unreadable file
        if REFUSED in str(err):
            problem = "it holds objects other than tensors, which kdkit never unpickles"
            fix = "; re-save it as a state dict or as .safetensors"
        else:
            problem, fix = f"corrupt or not a {suffix} file", ""
        raise KdkitError(f"cannot read weights file {path}: {problem} ({_reason(err)}){fix}") from err


def _state_dict(obj: object, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, Mapping):
        for key in CHECKPOINT_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        found = f"keys {sorted(map(str, obj))[:5]}" if isinstance(obj, Mapping) else type(obj).__name__
        raise KdkitError(
            f"weights file {path} holds no state dict (found {found}); "
            f"expected tensors by name, or a checkpoint with one of {list(CHECKPOINT_KEYS)}"
        )
    return dict(obj)


def _named(keys: list[str]) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def load_weights(
    model: nn.Module, path: str | os.PathLike[str], strict: bool = True
) -> tuple[list[str], list[str]]:
    """Load a local weights file into ``model``; returns (missing_keys, unexpected_keys) as load_state_dict.

    With ``strict=False`` missing and unexpected keys are allowed; shape mismatches never are.
    """
    path = Path(path)
    if not path.is_file():
        raise KdkitError(f"weights file not found: {path}; check the 'weights' entry of the config")
    state = _state_dict(_read(path), path)
    expected = model.state_dict()
    if not any(k.startswith(DDP_PREFIX) for k in expected):
        state = {k.removeprefix(DDP_PREFIX): v for k, v in state.items()}

    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if strict and missing:
        problems.append(f"missing keys {_named(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys {_named(unexpected)}")
    mismatched = [
        f"'{key}' (file {tuple(state[key].shape)} vs model {tuple(value.shape)})"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    if mismatched:
        problems.append(f"shape mismatch at {_named(mismatched)}")
    if problems:
        raise KdkitError(
            f"weights file {path} does not fit the model: {'; '.join(problems)}; "
            "check the model name and num_classes it was trained with"
        )
    return model.load_state_dict(state, strict=strict)


def save_weights(
    model_or_state_dict: nn.Module | Mapping[str, Tensor],
    path: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write weights as safetensors, atomically (a temp file in the same directory, then ``os.replace``).

    Tensors are copied to contiguous CPU memory, so views and tied weights (shared storage) save fine.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise KdkitError(f"save_weights writes safetensors: name the file '*.safetensors', not {path}")
    state = (
        model_or_state_dict.state_dict()
        if isinstance(model_or_state_dict, nn.Module)
        else model_or_state_dict
    )
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise KdkitError(f"cannot save weights to {path}: entries {_named(bad)} are not tensors")
    if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise KdkitError(f"cannot save weights to {path}: metadata keys and values must be strings")
    tensors = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in state.items()}

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, FILE_MODE)  # safetensors creates the file 0600; give it a new file's usual mode
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
