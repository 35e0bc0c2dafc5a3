"""Feature taps: read intermediate tensors of any ``nn.Module`` by module path with forward hooks.

Tap keys (see :mod:`kdkit.terms.base`):

* ``"logits"``: the model's output (for dict outputs, the ``"out"`` entry; for tuples the first item);
* ``"layer3"``: the output of the submodule at that path (``model.get_submodule("layer3")``);
* ``"fc:input"``: the first positional input of that submodule (e.g. the penultimate embedding).

Models are never edited to expose features: :class:`Taps` registers hooks once and every forward
pass refills its dict. :func:`dry_run` runs one batch and reports every tap's shape.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .errors import KdkitError
from .registry import did_you_mean
from .terms.base import LOGITS

INPUT_SUFFIX = ":input"


def main_output(out: Any) -> Tensor:
    """The task output of a model call: a tensor, the ``"out"`` entry of a dict, or a tuple's first item."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict):
        if "out" in out:
            return out["out"]
        raise KdkitError(
            f"model returned a dict without an 'out' entry (keys: {sorted(out)}); tap a module instead"
        )
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise KdkitError(f"cannot read a tensor from a model output of type {type(out).__name__}")


def _tensor_of(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    if isinstance(value, dict) and "out" in value:
        return value["out"]
    raise KdkitError(f"tapped a value of type {type(value).__name__}, which holds no tensor")


def split_key(key: str) -> tuple[str, bool]:
    """``"fc:input"`` -> ``("fc", True)``; ``"layer3"`` -> ``("layer3", False)``."""
    if key.endswith(INPUT_SUFFIX):
        return key[: -len(INPUT_SUFFIX)], True
    return key, False


def module_paths(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def resolve_module(model: nn.Module, path: str, who: str = "model") -> nn.Module:
    """The submodule at ``path``, or a clear error naming the nearest valid path."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise KdkitError(
            f"{who} has no module '{path}'{did_you_mean(path, module_paths(model))}; "
            f"`kdkit inspect CONFIG` lists the modules"
        ) from None


class Taps:
    """Forward hooks that store the tensors at ``keys`` on every forward pass.

    Use :meth:`__call__` to run the model and get ``{key: tensor}`` including ``"logits"``; the
    model's raw output of that call stays in :attr:`output` (a detector's dict of head outputs).
    Hooks stay registered until :meth:`remove`; the stored tensors keep their autograd graph.
    """

    def __init__(self, model: nn.Module, keys: Iterable[str], who: str = "model") -> None:
        self.model = model
        self.keys = sorted(set(keys) - {LOGITS})
        self._store: dict[str, Tensor] = {}
        self.output: Any = None
        self._handles = []
        for key in self.keys:
            path, want_input = split_key(key)
            module = resolve_module(model, path, who)
            self._handles.append(module.register_forward_hook(self._hook(key, want_input)))

    def _hook(self, key: str, want_input: bool):
        def store(_module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            self._store[key] = _tensor_of(inputs[0] if want_input else output)

        return store

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        self._store = {}
        out = self.output = self.model(*args, **kwargs)
        found = dict(self._store)
        self._store = {}
        missing = [k for k in self.keys if k not in found]
        if missing:
            raise KdkitError(
                f"taps {missing} did not fire during the forward pass (module not used by forward?)"
            )
        found[LOGITS] = main_output(out)
        return found

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@torch.no_grad()
def dry_run(
    model: nn.Module, sample: Tensor, keys: Iterable[str], who: str = "model"
) -> dict[str, torch.Size]:
    """Run one batch through ``model`` and return every tap's shape (batch dimension included)."""
    was_training = model.training
    model.eval()
    taps = Taps(model, keys, who)
    try:
        found = taps(sample)
    finally:
        taps.remove()
        model.train(was_training)
    return {key: value.shape for key, value in found.items()}


@torch.no_grad()
def module_shapes(model: nn.Module, sample: Tensor, depth: int = 2) -> list[tuple[str, str, tuple[int, ...]]]:
    """(path, type, output shape) of every module up to ``depth`` dots deep, in call order."""
    rows: list[tuple[str, str, tuple[int, ...]]] = []
    handles = []
    for name, module in model.named_modules():
        if name and name.count(".") < depth:

            def record(mod: nn.Module, _inputs: Any, output: Any, name: str = name) -> None:
                try:
                    rows.append((name, type(mod).__name__, tuple(_tensor_of(output).shape)))
                except KdkitError:
                    pass

            handles.append(module.register_forward_hook(record))
    was_training = model.training
    model.eval()
    try:
        model(sample)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return rows
