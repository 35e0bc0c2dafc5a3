"""torchvision's segmentation models (``torchvision:deeplabv3_resnet50``, ``fcn_resnet101``,
``lraspp_mobilenet_v3_large``, ...) built offline, with the zoo's tap attributes.

Built with ``weights=None, weights_backbone=None`` (torchvision's default backbone weights would be
downloaded); ``aux_loss`` passes through, so ``num_classes=21, aux_loss=True`` gives the key layout
of torchvision's COCO checkpoints (``backbone.*``, ``classifier.*``, ``aux_classifier.*``), which
then load from a local file with :func:`kdkit.models.load_weights`. The models return torchvision's
``{"out": ..., "aux": ...}`` dict; taps read ``"out"``.

* ``feature_taps``: ``backbone.layer1``..``backbone.layer4`` for ResNets (output stride 8); for
  MobileNetV3, the last block before each strided block from stride 4 on, plus the last block
  (``backbone.3``, ``.6``, ``.12``, ``.16``; output stride 16);
* ``embedding_tap``: the input of the final 1x1 classifier conv, ``classifier.4:input`` for
  DeepLabV3 and FCN, ``classifier.high_classifier:input`` for LR-ASPP (whose output also adds
  ``low_classifier`` applied to ``backbone.6``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

RESNET_STAGES = ("backbone.layer1", "backbone.layer2", "backbone.layer3", "backbone.layer4")


def segmentation_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models.segmentation)


def build_segmentation(name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """torchvision's segmentation builder ``name`` without weights; ``kwargs`` (``aux_loss``, ...) pass on."""
    import torchvision

    model = torchvision.models.get_model(
        name, weights=None, weights_backbone=None, num_classes=num_classes, **kwargs
    )
    model.feature_taps = _feature_taps(model.backbone)
    model.embedding_tap = (
        "classifier.high_classifier:input" if name.startswith("lraspp") else "classifier.4:input"
    )
    return model


def _feature_taps(backbone: nn.Module) -> tuple[str, ...]:
    if hasattr(backbone, "layer4"):
        return RESNET_STAGES
    blocks = [name for name, _ in backbone.named_children()]
    strided = [i for i, (_, block) in enumerate(backbone.named_children()) if getattr(block, "_is_cn", False)]
    # strided[0] ends the stride-2 stage; each later one ends a stage at stride 4, 8, ...
    return (*(f"backbone.{blocks[i - 1]}" for i in strided[1:]), f"backbone.{blocks[-1]}")
