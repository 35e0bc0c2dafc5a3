"""Model zoo: the CIFAR networks of the KD literature, plus ``torchvision:<name>`` and ``timm:<name>``.

Every model is built by :func:`build_model`. Zoo models return logits only and declare where their
features are: ``feature_taps`` (stage outputs, shallow to deep; the last is the map that gets pooled)
and ``embedding_tap`` (``"fc:input"``, the pooled embedding). Taps read them with forward hooks.

Segmentation models (:mod:`.seg_resnet`, :mod:`.seg_compact`, :mod:`.spirit`, and torchvision's through
:mod:`.seg_torchvision`) return logits at the input resolution; their ``feature_taps`` are backbone
stages and ``embedding_tap`` is the input of the final 1x1 classifier conv.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import KdkitError
from ..registry import MODELS, did_you_mean
from . import (  # noqa: F401  (they register)
    cifar_resnet,
    detection,
    mobilenetv2,
    seg_compact,
    seg_resnet,
    shufflenetv1,
    shufflenetv2,
    spirit,
    vgg,
    wrn,
)
from .hub import build_hub_model
from .weights import load_weights, save_weights

__all__ = ["build_model", "load_weights", "save_weights"]


def build_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a zoo model (``"resnet8"``) or a hub model (``"torchvision:resnet18"``, ``"timm:resnet18"``).

    ``kwargs`` go to the model's constructor. Hub models are never given pretrained weights.
    """
    source, is_hub, hub_name = name.partition(":")
    if not is_hub and name not in MODELS:
        raise KdkitError(
            f"unknown model '{name}'{did_you_mean(name, MODELS.names())}; "
            "torchvision and timm models are named 'torchvision:<name>' and 'timm:<name>'"
        )
    try:
        if is_hub:
            return build_hub_model(source, hub_name, num_classes, **kwargs)
        return MODELS.build(name, num_classes=num_classes, **kwargs)
    except TypeError as err:  # an option the constructor does not take
        if not kwargs:
            raise
        raise KdkitError(f"cannot build model '{name}' with options {sorted(kwargs)}: {err}") from err
