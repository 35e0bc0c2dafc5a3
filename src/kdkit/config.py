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
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError
from .registry import DATASETS, MODELS, REFINERS, TERMS, Registry, did_you_mean

Loc = tuple[str | int, ...]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    """A network: a registered zoo name, ``torchvision:<name>`` or ``timm:<name>``."""

    name: str
    weights: Path | None = None
    num_classes: int | None = Field(None, description="default: the dataset's number of classes")
    kwargs: dict[str, Any] = {}


class AugmentConfig(Strict):
    """Training augmentation. Classification: padded random crop + flip. Segmentation: random scale,
    crop (padding images with 0 and masks with the ignore index), flip; masks use nearest neighbours."""

    crop_padding: int = Field(4, ge=0, description="classification: zero padding of the random crop")
    flip: bool = True
    scale: tuple[float, float] = Field((1.0, 1.0), description="segmentation: random rescale range")
    crop: tuple[int, int] | None = Field(None, description="segmentation: [H, W] crop; default image size")

    @model_validator(mode="after")
    def _ordered_scale(self) -> AugmentConfig:
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be [low, high] with 0 < low <= high, got {list(self.scale)}")
        return self


class MixConfig(Strict):
    """A second dataset mixed into the training split at ``ratio`` = target images per mixed-in image
    (Enhanced Spirit Distillation's r; 0 means mixed-in images only)."""

    name: str
    root: str | None = None
    split: str = "train"
    params: dict[str, Any] = {}
    ratio: float = Field(1.0, ge=0)


class DataConfig(Strict):
    """A registered dataset; ``params`` go to its builder (``eval_params`` override them for evaluation)."""

    name: str = "embedded"
    root: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    params: dict[str, Any] = {}
    eval_params: dict[str, Any] = {}
    batch_size: int = Field(128, ge=1, description="global batch, split over processes")
    eval_batch_size: int = Field(256, ge=1)
    num_workers: int = Field(0, ge=0)
    augment: AugmentConfig = AugmentConfig()
    mix: MixConfig | None = Field(None, description="unlabelled proximity-domain images mixed into training")


class EvalConfig(Strict):
    """How segmentation is evaluated: whole images or overlapping sliding windows, and the
    HP-Acc threshold of Spirit Distillation (Eq. 7-8)."""

    mode: Literal["whole", "slide"] = "whole"
    crop: tuple[int, int] | None = Field(None, description="slide: window [H, W]")
    stride: tuple[int, int] | None = Field(None, description="slide: step [H, W]; default 2/3 of the window")
    hp_threshold: float = Field(0.75, gt=0, lt=1)
    metric: Literal["miou", "miou_per_image"] = Field(
        "miou", description="headline: dataset mIoU or mean per-image mIoU (Spirit Distillation Eq. 5)"
    )

    @model_validator(mode="after")
    def _window(self) -> EvalConfig:
        if self.mode == "slide" and self.crop is None:
            raise ValueError("mode 'slide' needs crop: [H, W]")
        return self


class TermConfig(BaseModel):
    """A registered term with its weight; other keys are the term's constructor arguments."""

    model_config = ConfigDict(extra="allow")
    name: str
    weight: float = 1.0

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RefinerConfig(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OptimizerConfig(Strict):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)


class ScheduleConfig(Strict):
    """Learning-rate schedule in the stage's unit (epochs, or steps for step-based stages)."""

    name: Literal["multistep", "cosine", "poly", "constant"] = "multistep"
    milestones: list[float] = []
    gamma: float = 0.1
    power: float = 0.9
    min_factor: float = Field(0.0, ge=0, description="floor of the lr multiplier (cosine, poly)")
    warmup: float = Field(0.0, ge=0, description="linear warm-up length, same unit as the stage")


class StageConfig(Strict):
    """One stage: its terms, trainable student parameters, optimizer, schedule and length.

    ``eval_every`` is in the stage's unit: epochs when the stage sets ``epochs`` (an evaluation at the
    end of every ``eval_every``-th epoch), steps when it sets ``steps`` (every ``eval_every`` steps,
    counted from the stage's start). The stage's last step always evaluates, and each evaluation
    writes a checkpoint.
    """

    name: str = "main"
    epochs: int | None = Field(None, ge=1)
    steps: int | None = Field(None, ge=1)
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: list[str] = Field(["*"], description="glob patterns on student parameter names")
    terms: list[TermConfig] | None = Field(None, description="default: the run's terms")
    data: DataConfig | None = Field(None, description="default: the run's data")
    eval_every: int = Field(
        1, ge=1, description="epochs (or steps for step-based stages) between evaluations"
    )

    @model_validator(mode="after")
    def _one_length(self) -> StageConfig:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("set exactly one of 'epochs' and 'steps'")
        return self


class RuntimeConfig(Strict):
    device: str = "auto"
    threads: int | Literal["auto"] = Field(
        0,
        description="CPU intra-op threads; 0 or auto: OMP_NUM_THREADS if set, else the free cores "
        "(available CPUs less the load average, shared among torchrun's local processes)",
    )
    precision: Literal["fp32", "bf16", "auto"] = "fp32"  # auto: bf16 where the device computes it natively
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = False
    sync_batchnorm: bool = Field(True, description="under torchrun, batch norm over the global batch")
    seed: int = 0
    out_dir: str = "runs"
    checkpoint_every_steps: int = Field(0, ge=0, description="0: at the end of each epoch only")
    log_every: int = Field(20, ge=1)
    progress: bool = True

    @model_validator(mode="after")
    def _threads_not_negative(self) -> RuntimeConfig:
        if isinstance(self.threads, int) and self.threads < 0:
            raise ValueError("runtime.threads must be a positive count, or 0 / auto for the default")
        return self


class RunConfig(Strict):
    name: str = "run"
    task: Literal["classification", "segmentation"] = "classification"
    data: DataConfig = DataConfig()
    evaluation: EvalConfig = EvalConfig()
    teacher: ModelConfig | None = None
    student: ModelConfig
    terms: list[TermConfig] = [TermConfig(name="ce")]
    refiners: list[RefinerConfig] = []
    stages: list[StageConfig] = [StageConfig(epochs=1)]
    runtime: RuntimeConfig = RuntimeConfig()

    def stage_terms(self, stage: StageConfig) -> list[TermConfig]:
        return self.terms if stage.terms is None else stage.terms

    def stage_data(self, stage: StageConfig) -> DataConfig:
        return self.data if stage.data is None else stage.data


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


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML (what a run saves as ``config.yaml``)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
