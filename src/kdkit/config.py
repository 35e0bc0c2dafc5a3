"""Typed run configuration: YAML files, ``--set a.b=value`` overrides, one-line validation errors.

A run is ``task``, ``data``, ``evaluation``, ``teacher``, ``student``, ``terms``, ``refiners``,
``stages`` and ``runtime``.
The YAML is a view of the Python API: model, dataset and term entries name a registered builder and
pass their remaining keys to its signature, which is checked here (unknown keys are errors naming the
nearest valid key). A file may start from another with ``base: other.yaml`` (deep-merged, lists replaced).
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .errors import ConfigError
from .registry import DATASETS, MODELS, REFINERS, TERMS, Registry, did_you_mean
from .schema import (  # noqa: F401 - the schema is part of this module's API
    AugmentConfig,
    DataConfig,
    EvalConfig,
    MixConfig,
    ModelConfig,
    OptimizerConfig,
    RefinerConfig,
    RunConfig,
    RuntimeConfig,
    ScheduleConfig,
    StageConfig,
    Strict,
    TermConfig,
)

Loc = tuple[str | int, ...]


# --------------------------------------------------------------------------- loading


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys (task, data, student, ...)")
    base = data.pop("base", None)
    if base is not None:
        data = _merge(_read_yaml((path.parent / base).resolve()), data)
    return data


def _parse_dotted(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for part in path.replace("[", ".").replace("]", "").split("."):
        if part:
            parts.append(int(part) if part.isdigit() else part)
    return parts


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.0.c=value`` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected KEY=VALUE, e.g. --set stages.0.epochs=5")
    key, raw = assignment.split("=", 1)
    parts = _parse_dotted(key.strip())
    if not parts:
        raise ConfigError(f"--set {assignment}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(
            f"--set {assignment}: the value is not valid YAML ({problem}); quote it, e.g. --set 'key=[a, b]'"
        ) from None
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                raise ConfigError(
                    f"--set {assignment}: index {part} is out of range (list has {len(node)} items)"
                )
            node = node[part]
        else:
            if part not in node or node[part] is None:
                node[part] = [] if isinstance(nxt, int) else {}
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or last > len(node):
            raise ConfigError(
                f"--set {assignment}: index {last} is out of range (list has {len(node)} items)"
            )
        if last == len(node):
            node.append(value)
        else:
            node[last] = value
    else:
        node[last] = value


def _line_of(text: str | None, loc: Loc) -> int | None:
    """The 1-based line in YAML ``text`` where the node at ``loc`` sits (the deepest one found)."""
    if not text:
        return None
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if node is None:
            break
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The schema class that holds the field at ``loc`` (to suggest the nearest valid key)."""
    model: Any = RunConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = (
            model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        )
        if field is None:
            return None
        model = _schema_class(field.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _schema_class(annotation: Any) -> Any:
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _schema_class(arg)
        if found is not None:
            return found
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _fmt_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(error: dict[str, Any]) -> str:
    loc: Loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    kind = error["type"]
    if kind == "extra_forbidden":
        model = _model_at(loc)
        hint = did_you_mean(str(loc[-1]), list(model.model_fields)) if model else ""
        return f"{_fmt_loc(loc)}: unknown key{hint}"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"{_fmt_loc(loc)}: {error['input']!r} is not allowed (expected {expected})"
    if kind == "missing":
        return f"{_fmt_loc(loc)}: required key is missing"
    return f"{_fmt_loc(loc)}: {error['msg']}" if loc else error["msg"]


def _where(source: str, text: str | None, loc: Loc) -> str:
    line = _line_of(text, loc)
    return f"{source}:{line}" if line else source


def validate(data: dict[str, Any], source: str = "config", text: str | None = None) -> RunConfig:
    """Validate a raw dict into a :class:`RunConfig`; errors become one-line :class:`ConfigError`."""
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(f"{_where(source, text, loc)}: {_describe(first)}{more}") from None
    check_terms(config, source, text)
    check_models_and_data(config, source, text)
    return config


def check_models_and_data(config: RunConfig, source: str = "config", text: str | None = None) -> None:
    """Models and datasets are registered, and weights files exist, before anything is built."""
    from . import data as _registers_datasets  # noqa: F401
    from . import models as _registers_models  # noqa: F401

    for role in ("teacher", "student"):
        model: ModelConfig | None = getattr(config, role)
        if model is None:
            continue
        if ":" not in model.name and model.name not in MODELS:
            raise ConfigError(
                f"{_where(source, text, (role, 'name'))}: {role}.name: unknown model "
                f"'{model.name}'{did_you_mean(model.name, MODELS.names())} "
                "(or use torchvision:<name> / timm:<name>)"
            )
        if model.weights is not None and not model.weights.is_file():
            raise ConfigError(
                f"{_where(source, text, (role, 'weights'))}: {role}.weights: file not found: {model.weights} "
                f"(train one with `kdkit train`, or fix the path)"
            )
    datas = [(("data",), config.data)] + [
        (("stages", i, "data"), s.data) for i, s in enumerate(config.stages) if s.data
    ]
    datas += [((*loc, "mix"), data.mix) for loc, data in datas if data.mix is not None]
    for loc, data in datas:
        if data.name not in DATASETS:
            raise ConfigError(
                f"{_where(source, text, (*loc, 'name'))}: {_fmt_loc(loc)}.name: unknown dataset "
                f"'{data.name}'{did_you_mean(data.name, DATASETS.names())}"
            )


def check_terms(config: RunConfig, source: str = "config", text: str | None = None) -> None:
    """Every term and refiner names a registered one and only keys its constructor accepts."""
    from . import refiners as _registers_refiners  # noqa: F401
    from . import terms as _registers_terms  # noqa: F401

    groups: list[tuple[Loc, list[Any], Registry]] = [(("refiners",), config.refiners, REFINERS)]
    groups += [(("terms",), config.terms, TERMS)]
    groups += [(("stages", i, "terms"), s.terms, TERMS) for i, s in enumerate(config.stages) if s.terms]
    for i, stage in enumerate(config.stages):
        if not config.stage_terms(stage):
            loc: Loc = ("terms",) if stage.terms is None else ("stages", i, "terms")
            raise ConfigError(
                f"{_where(source, text, loc)}: {_fmt_loc(loc)}: empty list; stage '{stage.name}' needs at "
                "least one term, e.g. terms: [{name: ce}]"
            )
    for prefix, entries, registry in groups:
        for i, entry in enumerate(entries):
            loc = (*prefix, i)
            if registry is TERMS and not (math.isfinite(entry.weight) and entry.weight >= 0):
                raise ConfigError(
                    f"{_where(source, text, (*loc, 'weight'))}: {_fmt_loc((*loc, 'weight'))}: term "
                    f"'{entry.name}' has weight {entry.weight}; a weight must be a finite number >= 0 "
                    "(0 switches the term off)"
                )
            if entry.name not in registry:
                raise ConfigError(
                    f"{_where(source, text, (*loc, 'name'))}: {_fmt_loc(loc)}.name: "
                    f"unknown {registry.kind} '{entry.name}'{did_you_mean(entry.name, registry.names())}"
                )
            accepted = _accepted_args(registry.get(entry.name))
            for key in entry.params:
                if accepted is not None and key not in accepted:
                    known = accepted | ({"weight"} if registry is TERMS else set())
                    raise ConfigError(
                        f"{_where(source, text, (*loc, key))}: {_fmt_loc((*loc, key))}: "
                        f"unknown argument of {registry.kind} '{entry.name}'"
                        f"{did_you_mean(key, sorted(known))}"
                    )


def _accepted_args(builder: Any) -> set[str] | None:
    """Keyword names a builder accepts, or None when it takes ``**kwargs``."""
    params = inspect.signature(builder).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.name != "self"}


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), base: dict | None = None
) -> RunConfig:
    """Load a YAML config (or start from ``base``), apply ``--set`` overrides, validate."""
    text = None
    source = "config"
    if path is not None:
        path = Path(path)
        data = _read_yaml(path)
        text, source = path.read_text(), str(path)
    else:
        data = dict(base or {})
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        return validate(data, source, text)
    except ConfigError as exc:
        culprit = _override_at_fault(str(exc), source, overrides)
        if culprit is None:
            raise
        where = re.compile(rf"^{re.escape(source)}(:\d+)?: ")
        raise ConfigError(f"--set {culprit}: {where.sub('', str(exc), count=1)}") from None


def _override_at_fault(message: str, source: str, overrides: Sequence[str]) -> str | None:
    """The (last) ``--set`` assignment whose key is, contains or lies inside the key an error names.

    Validation messages read ``<source>[:line]: <key>...: <problem>``; an error at ``stages[0]`` is
    caused by ``--set stages.0.epochs=...`` and one at ``stages[0].epochs`` by ``--set stages=[...]``.
    """
    rest = re.sub(rf"^{re.escape(source)}(:\d+)?: ", "", message, count=1)
    failing = re.match(r"[A-Za-z_][\w\[\].]*", rest)
    if failing is None:
        return None
    failing_key = failing.group(0).rstrip(".")
    for assignment in reversed(overrides):
        key = _fmt_loc(tuple(_parse_dotted(assignment.split("=", 1)[0].strip())))
        if not key:
            continue
        for inner, outer in ((failing_key, key), (key, failing_key)):
            if inner == outer or inner.startswith(outer + ".") or inner.startswith(outer + "["):
                return assignment
    return None


# Config fields added after runs were first recorded, with their defaults: left out where they hold the
# default, so that a run recorded before a field existed compares equal to the same run recorded after
# (the demo teachers' cache key, grouping the seeds of one method in a comparison).
LATER_FIELDS: dict[tuple[str, ...], Any] = {
    ("teacher", "input"): None,
    ("student", "input"): None,
    ("runtime", "teacher_cache"): {"enabled": False, "topk": 0, "dir": None},
    ("data", "augment", "resized_crop"): None,
    ("data", "augment", "color_jitter"): None,
    ("data", "augment", "randaugment"): None,
    ("data", "augment", "mixup"): None,
}


def without_later_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a dumped config, modified in place and returned) without the :data:`LATER_FIELDS` that
    hold their default."""
    for (*path, key), default in LATER_FIELDS.items():
        node: Any = data
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(key, default) == default:
            node.pop(key, None)
    return data


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML (what a run saves as ``config.yaml``)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
