"""CIFAR ResNets (He et al. 2016, section 4.2): 6n+2 layers, widths 16/32/64, option-B shortcuts."""

from __future__ import annotations

import torch
import torch.nn as nn

from dnnprune.models.registry import register_model
from dnnprune.models.zoo._common import check_positive, kaiming_init


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs; a 1x1 conv+BN shortcut where the shape changes, else identity."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """Stem conv, three stages of `blocks` BasicBlocks, global average pool, `fc`."""

    def __init__(self, blocks: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = _make_stage(16, 16, blocks, stride=1)
        self.layer2 = _make_stage(16, 32, blocks, stride=2)
        self.layer3 = _make_stage(32, 64, blocks, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """Only the first block of a stage changes stride or width."""
    layers = [BasicBlock(in_planes, planes, stride)]
    layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


@register_model("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """ResNet-20 (n=3, ~0.27M parameters)."""
    check_positive("resnet20", num_classes=num_classes, in_channels=in_channels)
    return ResNetCifar(3, num_classes, in_channels)


@register_model("resnet56")
def resnet56(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """ResNet-56 (n=9, ~0.85M parameters), the usual structured-pruning benchmark."""
    check_positive("resnet56", num_classes=num_classes, in_channels=in_channels)
    return ResNetCifar(9, num_classes, in_channels)
