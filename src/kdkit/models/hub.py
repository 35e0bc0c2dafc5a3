"""Builders for ``torchvision:<name>`` and ``timm:<name>`` models, always without pretrained weights.

Weights come from local files through :func:`kdkit.models.load_weights`; kdkit never downloads.
Where they can be inferred, the built model gets the zoo's tap attributes:

* ``embedding_tap``: ``"<classifier>:input"``; the classifier is timm's ``get_classifier()`` or,
  for torchvision, the last ``nn.Linear`` with ``num_classes`` outputs;
* ``feature_taps``: from timm's ``feature_info`` modules, or torchvision's trunk (the children of
  ``features``, ``layers`` or ``trunk_output``, else of the model); one dry run at 64x64 keeps the
  last candidate at each resolution from stride 4 on, as 4-D maps larger than 1x1 (so ViT tokens
  and channels-last Swin maps are left out).

Attributes that cannot be inferred stay unset, and the config must name the taps. torchvision's
segmentation models are built by :mod:`kdkit.models.seg_torchvision` (also without backbone weights).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import KdkitError
from ..registry import MODELS, did_you_mean
from ..taps import module_shapes
from .seg_torchvision import build_segmentation, segmentation_names

SOURCES = ("torchvision", "timm")
DOWNLOAD_KWARGS = ("weights", "pretrained", "weights_backbone")
TRUNKS = ("features", "layers", "trunk_output")
PROBE_SIZE = 64


def build_hub_model(source: str, name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """``source`` is ``"torchvision"`` or ``"timm"``; ``kwargs`` go to the library's constructor."""
    asked = [k for k in DOWNLOAD_KWARGS if k in kwargs]
    if asked:
        raise KdkitError(
            f"'{source}:{name}' got {asked[0]}=...: kdkit never downloads weights; "
            "drop it and point the config's weights entry at a local file"
        )
    if source == "torchvision":
        return _torchvision(name, num_classes, kwargs)
    if source == "timm":
        return _timm(name, num_classes, kwargs)
    raise KdkitError(
        f"unknown model source '{source}'{did_you_mean(source, SOURCES)}; "
        "name hub models 'torchvision:<name>' or 'timm:<name>'"
    )


def _torchvision(name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import torchvision
    except (ImportError, RuntimeError) as err:  # RuntimeError: a torchvision build for another torch
        raise KdkitError(
            f"torchvision cannot be imported ({err}); "
            f"install the torchvision release built for torch {torch.__version__}"
        ) from err
    segmentation = segmentation_names()
    detection = torchvision.models.list_models(module=torchvision.models.detection)
    names = torchvision.models.list_models(module=torchvision.models) + segmentation + detection
    if name not in names:
        raise KdkitError(f"unknown torchvision model '{name}'{did_you_mean(name, names)}")
    if name in segmentation:
        return build_segmentation(name, num_classes, kwargs)
    if name in detection:  # detectors go through kdkit's wrappers (the Detector contract)
        if name not in MODELS:
            wrapped = sorted(n for n in detection if n in MODELS)
            raise KdkitError(
                f"torchvision detector '{name}' has no kdkit wrapper; wrapped: {', '.join(wrapped)}"
            )
        return MODELS.build(name, num_classes=num_classes, **kwargs)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    linears = [
        path
        for path, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.out_features == num_classes
    ]
    trunk = next((t for t in TRUNKS if isinstance(getattr(model, t, None), nn.Sequential)), None)
    holder = model.get_submodule(trunk) if trunk else model
    prefix = f"{trunk}." if trunk else ""
    candidates = [prefix + child for child, _ in holder.named_children()]
    _set_taps(model, candidates, linears[-1] if linears else None)
    return model


def _timm(name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise KdkitError("timm is not installed: pip install 'kdkit[timm]'") from None
    if not timm.is_model(name):
        raise KdkitError(f"unknown timm model '{name}'{did_you_mean(name, timm.list_models())}")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    classifier = model.get_classifier()
    paths = {id(m): path for path, m in model.named_modules()}
    head = paths.get(id(classifier)) if isinstance(classifier, nn.Linear) else None
    candidates = [info["module"] for info in getattr(model, "feature_info", None) or []]
    _set_taps(model, candidates, head)
    return model


def _set_taps(model: nn.Module, candidates: list[str], classifier: str | None) -> None:
    if classifier:
        model.embedding_tap = f"{classifier}:input"
    stages = _stage_taps(model, candidates)
    if stages:
        model.feature_taps = stages


def _stage_taps(model: nn.Module, candidates: list[str]) -> tuple[str, ...] | None:
    """The last candidate at each resolution from stride 4 on (4-D, square, over 1x1), shallow to deep."""
    if not candidates:
        return None
    depth = max(c.count(".") for c in candidates) + 1
    try:
        rows = module_shapes(model, torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE), depth)
    except Exception:  # best effort: a model that rejects this input size just gets no default taps
        return None
    wanted = set(candidates)
    last_at: dict[int, str] = {}
    for path, _kind, shape in rows:
        if path in wanted and len(shape) == 4 and shape[2] == shape[3] and 1 < shape[2] <= PROBE_SIZE // 4:
            last_at[shape[2]] = path
    if len(last_at) < 2:
        return None
    return tuple(last_at[size] for size in sorted(last_at, reverse=True))
