"""CIFAR VGG (Simonyan & Zisserman 2015) with the small 512-512 classifier used by network-slimming papers."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from dnnprune.models.registry import register_model
from dnnprune.models.zoo._common import check_positive, kaiming_init

_CFGS: dict[str, list[int | Literal["M"]]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """`features` (3x3 convs, 5 max-pools), global average pool, `classifier`; 32x32 inputs or larger."""

    def __init__(self, cfg: list[int | Literal["M"]], num_classes: int, in_channels: int, batch_norm: bool) -> None:
        super().__init__()
        self.features = _make_features(cfg, in_channels, batch_norm)
        # A no-op at 32x32 (the map is already 1x1); lets larger inputs reach the same classifier.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, num_classes),
        )
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


def _make_features(cfg: list[int | Literal["M"]], in_channels: int, batch_norm: bool) -> nn.Sequential:
    """BN makes the conv bias redundant, so it is dropped there (fewer parameters to prune)."""
    layers: list[nn.Module] = []
    channels = in_channels
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers.append(nn.Conv2d(channels, item, kernel_size=3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(item))
        layers.append(nn.ReLU())
        channels = item
    return nn.Sequential(*layers)


def _build(name: str, num_classes: int, in_channels: int, batch_norm: bool) -> nn.Module:
    check_positive(name, num_classes=num_classes, in_channels=in_channels)
    return VGG(_CFGS[name.removesuffix("_bn")], num_classes, in_channels, batch_norm)


@register_model("vgg11")
def vgg11(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """VGG-11 (config A) without batch norm."""
    return _build("vgg11", num_classes, in_channels, batch_norm=False)


@register_model("vgg13")
def vgg13(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """VGG-13 (config B) without batch norm."""
    return _build("vgg13", num_classes, in_channels, batch_norm=False)


@register_model("vgg16")
def vgg16(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """VGG-16 (config D) without batch norm."""
    return _build("vgg16", num_classes, in_channels, batch_norm=False)


@register_model("vgg19")
def vgg19(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """VGG-19 (config E) without batch norm."""
    return _build("vgg19", num_classes, in_channels, batch_norm=False)


@register_model("vgg11_bn")
def vgg11_bn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """VGG-11 with batch norm; BN scales are what network slimming prunes by."""
    return _build("vgg11_bn", num_classes, in_channels, batch_norm=True)


@register_model("vgg13_bn")
def vgg13_bn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """VGG-13 with batch norm."""
    return _build("vgg13_bn", num_classes, in_channels, batch_norm=True)


@register_model("vgg16_bn")
def vgg16_bn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """VGG-16 with batch norm."""
    return _build("vgg16_bn", num_classes, in_channels, batch_norm=True)


@register_model("vgg19_bn")
def vgg19_bn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """VGG-19 with batch norm."""
    return _build("vgg19_bn", num_classes, in_channels, batch_norm=True)
