"""The student of Spirit Distillation (Wu et al. 2021, "Spirit Distillation: Precise Real-time Semantic
Segmentation of Road Scenes with Insufficient Data").

The teacher is split at a module path into the activation map generator (AMG) and the teacher head
(Sec. IV.A.1); the closer the source and target domains, the deeper the split. The student's feature
extractor (FE) is a copy of the AMG in which convolutions are replaced by freshly initialised group
convolutions with gcd(in, out) groups (Sec. V.B, Appendix A Table IV), so every FE activation has the
AMG's shape; its head is a SegNet-like decoder whose convolutions are grouped the same way (Table V).
The whole student is randomly initialised. The distillation loss L_D (Eq. 2, MSE between AMG and FE
outputs) is then a plain feature term between teacher tap ``split`` and student tap ``"extractor"``;
constrained optimisation freezes ``extractor`` and trains ``head``, then fine-tunes all.

Which convolutions are grouped (``grouping``):

- ``"gcd"``: every convolution, the literal words of Table IV ("group convolution for all convolution
  layers"). On the DeepLabV3-R50 teacher this leaves 0.18M parameters and 10.6 GFLOPs at 512x1024,
  2.6% of the paper's constructed teacher (front + head; every 3x3 becomes depthwise and every 1x1
  nearly so), 50 times smaller than the 9.5M parameters / 169.4 GFLOPs / 41.8% the paper reports
  (Table II, Fig. 1).
- ``"separable"`` (default): spatial convolutions (kernel > 1) and shortcut projections (convolutions
  inside a ``downsample``/``shortcut`` module) are grouped by gcd(in, out); the remaining 1x1
  convolutions (a bottleneck's reduce/expand) stay dense, so every bottleneck becomes a
  depthwise-separable block. On the R50 teacher at 512x1024 (Cityscapes max-pooled by 2, Sec. V.C.2)
  this gives 9.51M parameters and 169.4 GFLOPs, 41.7% of the constructed teacher's 405.6 GFLOPs
  (Table II: 405.7): Table II's 9.5M / 169.4 / 41.8%. It is our reading; the paper gives no code.

For a front without bottleneck 1x1 convolutions (basic blocks, ``mini_deeplab_*``) both rules give the
same network.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import KdkitError
from ..registry import MODELS
from ..taps import main_output

PROBE = (1, 3, 64, 64)  # dry-run input that measures the extractor's output channels
GROUPINGS = ("separable", "gcd")
SHORTCUT_NAMES = frozenset({"downsample", "shortcut"})  # torchvision/timm ResNets, kdkit's BasicBlock


def _check_grouping(grouping: str) -> None:
    if grouping not in GROUPINGS:
        raise KdkitError(f"unknown Spirit grouping '{grouping}': use one of {list(GROUPINGS)}")


def groups_for(path: str, conv: nn.Conv2d, grouping: str = "separable") -> int:
    """The group count of the student's copy of ``conv`` at module ``path`` under ``grouping`` (see the
    module docstring): gcd(in, out), or 1 for a 1x1 convolution outside a shortcut under "separable"."""
    _check_grouping(grouping)
    pointwise = all(k == 1 for k in conv.kernel_size)
    if grouping == "separable" and pointwise and not SHORTCUT_NAMES.intersection(path.split(".")):
        return 1
    return math.gcd(conv.in_channels, conv.out_channels)


def grouped_conv(conv: nn.Conv2d, groups: int | None = None) -> nn.Conv2d:
    """A freshly initialised conv like ``conv`` (channels, kernel, stride, padding, dilation, bias)
    with ``groups`` groups (default ``gcd(in_channels, out_channels)``)."""
    groups = math.gcd(conv.in_channels, conv.out_channels) if groups is None else groups
    return nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        groups=groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    ).train(conv.training)


def grouped_copy(module: nn.Module, grouping: str = "gcd") -> nn.Module:
    """A deep copy of ``module`` with every ``nn.Conv2d`` replaced by a fresh :func:`grouped_conv`
    (Table IV) with :func:`groups_for` groups under ``grouping``.

    Everything else (BatchNorm, pooling, structure, module paths) is copied unchanged, so every
    intermediate output keeps its shape.
    """
    if isinstance(module, nn.Conv2d):
        return grouped_conv(module, groups_for("", module, grouping))
    _check_grouping(grouping)
    clone = copy.deepcopy(module)
    for path, conv in list(clone.named_modules()):
        if isinstance(conv, nn.Conv2d):
            parent, _, name = path.rpartition(".")
            setattr(clone.get_submodule(parent), name, grouped_conv(conv, groups_for(path, conv, grouping)))
    return clone


def _runs_children_in_order(module: nn.Module) -> bool:
    """Containers whose forward calls every child once, in order (torchvision's IntermediateLayerGetter)."""
    return isinstance(module, nn.Sequential) or type(module).__name__ == "IntermediateLayerGetter"


def split_points(model: nn.Module) -> list[str]:
    """Module paths :func:`split_model` can cut after: the first child of ``model`` (by convention the
    backbone, which receives the image) unless ``model`` is sequential, and every child of a sequential
    container among those, recursively."""
    children = list(model.named_children())
    if not _runs_children_in_order(model):
        children = children[:1]
    return [point for name, child in children for point in (name, *_sequential_points(child, name + "."))]


def _sequential_points(module: nn.Module, prefix: str) -> list[str]:
    if not _runs_children_in_order(module):
        return []
    return [
        point
        for name, child in module.named_children()
        for point in (prefix + name, *_sequential_points(child, f"{prefix}{name}."))
    ]


def _front(model: nn.Module, parts: list[str]) -> nn.Module:
    children = list(model.named_children())
    names = [name for name, _ in children]
    index = names.index(parts[0])
    child = children[index][1]
    last = child if len(parts) == 1 else _front(child, parts[1:])
    if not _runs_children_in_order(model) or index == 0:
        return last
    return nn.Sequential(OrderedDict([*children[:index], (parts[0], last)]))


def _rest(model: nn.Module, front_ids: set[int], prefix: str = "") -> list[str]:
    paths = []
    for name, child in model.named_children():
        if id(child) in front_ids:
            continue
        if any(id(m) in front_ids for m in child.modules()):
            paths += _rest(child, front_ids, f"{prefix}{name}.")
        else:
            paths.append(prefix + name)
    return paths


def split_model(model: nn.Module, path: str) -> tuple[nn.Module, list[str]]:
    """Split ``model`` after module ``path``: the activation map generator (the modules that map the
    image to the output of ``path``, sharing ``model``'s parameters) and the paths of the modules
    left to the teacher head.

    ``"backbone"`` gives the whole backbone; ``"backbone.layer3"`` a sequential front that ends
    with ``layer3`` (a shallower split, for a larger gap between the domains, Sec. IV.A.1).
    """
    points = split_points(model)
    if path not in points:
        raise KdkitError(
            f"cannot split the teacher at '{path}': the activation map generator must end at one of {points}"
        )
    front = _front(model, path.split("."))
    return front, _rest(model, {id(m) for m in front.modules()})


class SegNetDecoder(nn.Sequential):
    """The student head of Table V: per stage, bilinear x2 then ``depth`` x (3x3 conv + BN + ReLU)
    with gcd(in, out) groups (Sec. V.B); then ``classifier``, a dense 1x1 conv to the classes.

    Table V ends with "Stage3: Bilinear" at full resolution with 2 channels (the classes), so the
    classes already exist before the last upsampling: the classifier sits at stage 2's resolution
    and stage 3 is the upsampling to the input size done by :class:`SpiritStudent`. (A 1x1 conv
    commutes with bilinear upsampling, so this equals classifying after it, at a quarter of the
    cost.) The table lists no classifier layer and the grouping rule is stated for the Conv+BN+ReLU
    layers; the classifier is kept dense so every class sees every channel.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: Sequence[int] = (512, 512),
        depths: Sequence[int] = (3, 4),
    ) -> None:
        if len(widths) != len(depths):
            raise KdkitError(f"decoder widths {list(widths)} and depths {list(depths)} differ in length")
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        cin = in_channels
        for i, (width, depth) in enumerate(zip(widths, depths), start=1):
            layers: list[nn.Module] = [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)]
            for _ in range(depth):
                groups = math.gcd(cin, width)
                conv = nn.Conv2d(cin, width, 3, padding=1, groups=groups, bias=False)
                layers += [conv, nn.BatchNorm2d(width), nn.ReLU()]
                cin = width
            stages[f"stage{i}"] = nn.Sequential(*layers)
        stages["classifier"] = nn.Conv2d(cin, num_classes, 1)
        super().__init__(stages)


class SpiritStudent(nn.Module):
    """``head(extractor(x))`` bilinearly upsampled to the input size (an extractor's dict output gives
    its ``"out"``). ``feature_taps`` is ``("extractor",)``, the FE output that mimics the AMG;
    ``embedding_tap`` the input of the decoder's classifier."""

    def __init__(self, extractor: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor
        self.head = head
        self.feature_taps = ("extractor",)
        self.embedding_tap = "head.classifier:input"

    def forward(self, x: Tensor) -> Tensor:
        logits = self.head(main_output(self.extractor(x)))
        return F.interpolate(logits, x.shape[-2:], mode="bilinear", align_corners=False)


@torch.no_grad()
def _out_channels(extractor: nn.Module) -> int:
    was_training = extractor.training
    extractor.eval()
    try:
        weight = next(extractor.parameters())
        out = main_output(extractor(torch.zeros(PROBE, device=weight.device, dtype=weight.dtype)))
    finally:
        extractor.train(was_training)
    return out.shape[1]


@MODELS.register(
    "spirit",
    "Spirit Distillation student (Wu et al. 2021): group-conv copy of the teacher front + SegNet decoder",
)
def spirit(
    num_classes: int,
    teacher: str,
    teacher_kwargs: dict[str, Any] | None = None,
    split: str = "backbone",
    widths: Sequence[int] = (512, 512),
    depths: Sequence[int] = (3, 4),
    grouping: str = "separable",
) -> SpiritStudent:
    """The student for ``teacher`` (a model name, built without weights) split at ``split``.

    ``teacher_kwargs`` go to the teacher's builder (its ``num_classes`` defaults to ``num_classes``;
    the teacher head is dropped). ``widths``/``depths``: the decoder stages (Table V: 512/512, 3/4).
    ``grouping``: which extractor convolutions are grouped, ``"separable"`` (default, reproduces
    Table II's size) or ``"gcd"`` (every one); see the module docstring. The decoder's convolutions
    are 3x3 and grouped by gcd under both.
    """
    from . import build_model  # the package imports this module

    kwargs = dict(teacher_kwargs or {})
    model = build_model(teacher, kwargs.pop("num_classes", num_classes), **kwargs)
    front, _ = split_model(model, split)
    extractor = grouped_copy(front, grouping)
    return SpiritStudent(extractor, SegNetDecoder(_out_channels(extractor), num_classes, widths, depths))
