"""MobileNetV2 (Sandler et al. 2018) for 32x32 inputs: stride-1 stem and stride 1 in the 24-channel stage."""

from __future__ import annotations

import torch
import torch.nn as nn

from dnnprune.models.registry import register_model
from dnnprune.models.zoo._common import check_dropout, check_positive, kaiming_init

# expansion t, output channels c, repeats n, first stride s; the ImageNet table with stage 2's stride 2 -> 1.
_SETTING = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round widths to a multiple of 8 like the reference, never losing more than 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear project; residual only where shape is kept."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_ch * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(in_ch, hidden, 1))
        layers.append(_conv_bn(hidden, hidden, 3, stride=stride, groups=hidden))
        layers.append(_conv_bn(hidden, out_ch, 1, act=False))
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2Cifar(nn.Module):
    """`features` (stem, 17 blocks, 1x1 head conv), global average pool, `classifier`."""

    def __init__(self, num_classes: int, in_channels: int, width_mult: float, dropout: float) -> None:
        super().__init__()
        channels = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [_conv_bn(in_channels, channels, 3)]
        for t, c, n, s in _SETTING:
            out = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        layers.append(_conv_bn(channels, last, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(last, num_classes))
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


@register_model("mobilenetv2_cifar")
def mobilenetv2_cifar(
    num_classes: int = 10, in_channels: int = 1, width_mult: float = 1.0, dropout: float = 0.2
) -> nn.Module:
    """Depthwise convs and linear bottlenecks make channel pruning harder than on VGG: a useful test."""
    check_positive("mobilenetv2_cifar", num_classes=num_classes, in_channels=in_channels, width_mult=width_mult)
    check_dropout("mobilenetv2_cifar", dropout)
    return MobileNetV2Cifar(num_classes, in_channels, width_mult, dropout)
