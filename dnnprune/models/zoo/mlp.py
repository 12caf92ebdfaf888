"""Fully connected nets; the default is LeNet-300-100 (Han et al. 2015's MNIST pruning baseline)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from dnnprune.models.registry import register_model
from dnnprune.models.zoo._common import check_positive


class MLP(nn.Module):
    """Flatten, then Linear+ReLU per hidden width, then the output layer."""

    def __init__(self, num_classes: int, in_features: int, hidden: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for out in hidden:
            layers += [nn.Linear(width, out), nn.ReLU()]
            width = out
        layers.append(nn.Linear(width, num_classes))
        self.classifier = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


@register_model("mlp")
def mlp(
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int = 28,
    hidden: Sequence[int] = (300, 100),
    input_shape: Sequence[int] | None = None,
) -> nn.Module:
    """`hidden` is a tuple by default (no mutable default); a JSON list from a checkpoint works too.
    `input_shape` (C,H,W), where given, sets the input width: a table's rows (1, 1, F) are not square."""
    hidden = list(hidden)
    check_positive("mlp", num_classes=num_classes, in_channels=in_channels, input_size=input_size, hidden=hidden)
    features = in_channels * input_size * input_size
    if input_shape is not None:
        check_positive("mlp", input_shape=list(input_shape))
        features = math.prod(int(d) for d in input_shape)
    return MLP(num_classes, features, hidden)
