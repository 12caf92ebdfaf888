"""LeNet-5 (LeCun et al. 1998) with ReLU and max pooling; the first conv pads by 2 as LeCun padded 28x28 digits to 32x32."""

from __future__ import annotations

import torch
import torch.nn as nn

from dnnprune.errors import ModelError
from dnnprune.models.registry import register_model
from dnnprune.models.zoo._common import check_positive

_MIN_INPUT = 12  # a padded 5x5 conv, a pool, a 5x5 conv and a pool need this to leave a 1x1 map


class LeNet5(nn.Module):
    """conv6-5x5, pool, conv16-5x5, pool, FC120, FC84, FC classes."""

    def __init__(self, num_classes: int, in_channels: int, input_size: int) -> None:
        super().__init__()
        side = (input_size // 2 - 4) // 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * side * side, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("lenet5")
def lenet5(num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> nn.Module:
    """The first FC layer's width depends on the input size, so it is a constructor argument."""
    check_positive("lenet5", num_classes=num_classes, in_channels=in_channels)
    if not isinstance(input_size, int) or input_size < _MIN_INPUT:
        raise ModelError(f"lenet5: input_size must be an integer >= {_MIN_INPUT}, got {input_size!r}")
    return LeNet5(num_classes, in_channels, input_size)
