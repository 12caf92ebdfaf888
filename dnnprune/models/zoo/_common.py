"""Helpers shared by the zoo files, kept private so the registry stays the only public surface."""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from dnnprune.errors import ModelError


def kaiming_init(model: nn.Module) -> nn.Module:
    """He init for ReLU nets; PyTorch's default init trains deep plain nets (VGG-19) poorly."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
    return model


def check_positive(model: str, **values: int | float | Sequence[int]) -> None:
    """Reject zero or negative sizes with a message naming the argument, instead of a torch shape error."""
    for key, value in values.items():
        items = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in items):
            raise ModelError(f"{model}: {key} must be positive, got {value!r}")


def check_dropout(model: str, dropout: float) -> None:
    """nn.Dropout accepts p=1, which silently zeroes every activation in training."""
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ModelError(f"{model}: dropout must be in [0, 1), got {dropout!r}")
