"""One small registry type shared by models, datasets, terms and refiners.

Registering is one decorator::

    @TERMS.register("kd", "Hinton et al. 2015: KL between softened logits, T^2 scaled")
    class KD(Term): ...

``kdkit list [kind]`` prints every registry with these one-line descriptions.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


class UnknownNameError(KeyError):
    """A name that is not registered; the message names the nearest registered one."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


def nearest(name: str, choices: list[str] | tuple[str, ...]) -> str | None:
    """The registered name closest to ``name``, or None when nothing is close."""
    found = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return found[0] if found else None


def did_you_mean(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """' (did you mean 'x'?)' or a short list of valid choices."""
    close = nearest(name, choices)
    if close is not None:
        return f" (did you mean '{close}'?)"
    shown = ", ".join(sorted(choices)[:12])
    return f" (valid: {shown}{', ...' if len(choices) > 12 else ''})"


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Callable[..., Any]
    description: str


class Registry:
    """Maps names to builders (classes or functions) with one-line descriptions."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(
        self, name: str, description: str = ""
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def add(obj: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            doc = description or ((obj.__doc__ or "").strip().splitlines() or [""])[0]
            self._entries[name] = Entry(name, obj, doc)
            return obj

        return add

    def get(self, name: str) -> Callable[..., Any]:
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownNameError(f"unknown {self.kind} '{name}'{did_you_mean(name, self.names())}")
        return entry.obj

    def build(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> Iterator[Entry]:
        for name in self.names():
            yield self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)


MODELS = Registry("model")
DATASETS = Registry("dataset")
TERMS = Registry("term")
REFINERS = Registry("refiner")

REGISTRIES: dict[str, Registry] = {
    "models": MODELS,
    "datasets": DATASETS,
    "terms": TERMS,
    "refiners": REFINERS,
}
