"""Pieces shared by the CIFAR zoo: conv-BN-ReLU, channel shuffle, and the :class:`ZooNet` layout.

No layer works in place, so a tapped tensor is never overwritten by a later ReLU or sum.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn


def conv_bn(
    cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True, bias: bool = False
) -> nn.Sequential:
    """Conv (``kernel``x``kernel``, same padding) -> BatchNorm -> optional ReLU."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=bias),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ChannelShuffle(nn.Module):
    """Interleave the channels of ``groups`` groups (Zhang et al. 2018), so grouped convs mix information."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ZooNet(nn.Sequential):
    """A CIFAR network as named parts run in order: ``body``, ``pool`` (global average, flattened), ``fc``.

    ``feature_taps`` name the stage outputs, shallow to deep; the last is the feature map that ``pool``
    averages. ``embedding_tap`` is ``"fc:input"``, the pooled embedding. Models return logits only.
    Convs get He (fan-out) initialisation, as in the reference implementations.
    """

    def __init__(
        self,
        body: Sequence[tuple[str, nn.Module]],
        width: int,
        num_classes: int,
        feature_taps: tuple[str, ...],
    ) -> None:
        pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        super().__init__(OrderedDict([*body, ("pool", pool), ("fc", nn.Linear(width, num_classes))]))
        self.feature_taps = feature_taps
        self.embedding_tap = "fc:input"
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
