"""CIFAR AlexNet: 3x3 convs and three pools for 32x32 inputs; the FC layers hold most of the weights."""

from __future__ import annotations

import torch
import torch.nn as nn

from dnnprune.models.registry import register_model
from dnnprune.models.zoo._common import check_dropout, check_positive, kaiming_init


class AlexNet(nn.Module):
    """Five convs (64, 192, 384, 256, 256), pooled to 256x4x4, then 4096-4096-classes."""

    def __init__(self, num_classes: int, in_channels: int, dropout: float) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 192, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        # A no-op at 32x32; fixes the FC input size for other input sizes.
        self.pool = nn.AdaptiveAvgPool2d((4, 4))
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(256 * 4 * 4, 4096),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(),
            nn.Linear(4096, num_classes),
        )
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


@register_model("alexnet")
def alexnet(num_classes: int = 10, in_channels: int = 1, dropout: float = 0.5) -> nn.Module:
    """The classic over-parameterised FC head is the point: it is what weight pruning shrinks most."""
    check_positive("alexnet", num_classes=num_classes, in_channels=in_channels)
    check_dropout("alexnet", dropout)
    return AlexNet(num_classes, in_channels, dropout)
