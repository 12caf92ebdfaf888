"""Accordion autoencoders (A2E, Kelso & Lee 2021): MLP autoencoders whose widths expand and contract
more than once, so that layer (depth) pruning has whole layers to take away.

- `a2e` (task: reconstruction): one autoencoder; trained on normal samples only, its per-sample
  reconstruction error is the anomaly score (credit-card fraud, one-class Fashion-MNIST).
- `a2e_classifier` (task: classification), two designs (`design`):
  - `experts` (default): generative classification, one small accordion per class; a sample's
    logit for class k is minus its reconstruction error under the k-th autoencoder (times a
    learned scale), so the class whose autoencoder explains the sample best wins. Cross-entropy
    on those logits trains every autoencoder to reconstruct its own class better than the others do.
  - `shared`: one accordion encoder shared by all classes (its widths expand and contract, ending
    in the code) and a linear head on the code. The input-facing layer is paid for once, not
    once per class, so removing the accordion's expansions takes most of the weights away.

Each autoencoder is one flat `nn.Sequential` (Flatten, then Linear + activation per hidden width,
then a Linear back to the input size): every hidden Linear is a unit that layer pruning can remove
by bridging its neighbours.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn as nn

from dnnprune.errors import ModelError
from dnnprune.models.registry import register_model
from dnnprune.models.zoo._common import check_positive

Activation = Literal["tanh", "relu", "elu", "leaky_relu"]
_ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU}
_MAX_FEATURES = 1 << 22


Design = Literal["experts", "shared"]


def accordion(in_features: int, widths: Sequence[int], activation: str, out_features: int | None = None) -> nn.Sequential:
    """Flatten -> [Linear -> act] per width -> Linear to `out_features` (default: back to `in_features`;
    no activation, so any real output)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for out in widths:
        layers += [nn.Linear(width, out), _ACTIVATIONS[activation]()]
        width = out
    layers.append(nn.Linear(width, in_features if out_features is None else out_features))
    return nn.Sequential(*layers)


class A2E(nn.Module):
    """One accordion autoencoder; returns the reconstruction, flattened to (batch, features)."""

    def __init__(self, in_features: int, widths: Sequence[int], activation: str) -> None:
        super().__init__()
        self.net = accordion(in_features, widths, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class A2EClassifier(nn.Module):
    """One accordion per class; logits are minus each autoencoder's per-sample reconstruction error."""

    def __init__(self, num_classes: int, in_features: int, widths: Sequence[int], activation: str) -> None:
        super().__init__()
        self.experts = nn.ModuleList(accordion(in_features, widths, activation) for _ in range(num_classes))
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        errors = torch.stack([(expert(x) - flat).pow(2).mean(dim=1) for expert in self.experts], dim=1)
        return -errors * self.log_scale.exp()


class A2ESharedClassifier(nn.Module):
    """One accordion encoder for every class, a linear head on its code (the last width)."""

    def __init__(self, num_classes: int, in_features: int, widths: Sequence[int], activation: str) -> None:
        super().__init__()
        self.net = accordion(in_features, widths, activation, out_features=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _features(model: str, input_shape: Sequence[int] | None, in_features: int | None) -> int:
    if in_features is None and input_shape is None:
        raise ModelError(f"{model}: give input_shape (C,H,W) or in_features")
    features = in_features if in_features is not None else math.prod(int(s) for s in input_shape)  # type: ignore[union-attr]
    check_positive(model, in_features=features)
    if features > _MAX_FEATURES:
        raise ModelError(f"{model}: {features} input features is more than {_MAX_FEATURES}; use a smaller input")
    return features


def _check(model: str, widths: Sequence[int], activation: str) -> list[int]:
    widths = list(widths)
    if not widths:
        raise ModelError(f"{model}: widths must list at least one hidden width")
    check_positive(model, widths=widths)
    if activation not in _ACTIVATIONS:
        raise ModelError(f"{model}: activation must be one of {', '.join(_ACTIVATIONS)}, got {activation!r}")
    return widths


@register_model("a2e", task="reconstruction")
def a2e(input_shape: Sequence[int] | None = (1, 1, 30), in_channels: int = 1, in_features: int | None = None,
        widths: Sequence[int] = (64, 16, 64, 16, 64), activation: Activation = "tanh") -> nn.Module:
    """Accordion autoencoder; `input_shape` comes from the data (tabular rows are (1, 1, F); the default is
    the credit-card layout's 30 features)."""
    del in_channels  # implied by input_shape; accepted so every zoo model takes it
    return A2E(_features("a2e", input_shape, in_features), _check("a2e", widths, activation), activation)


@register_model("a2e_classifier")
def a2e_classifier(num_classes: int = 10, input_shape: Sequence[int] | None = (1, 28, 28), in_channels: int = 1,
                   in_features: int | None = None, widths: Sequence[int] = (128, 32, 128, 32, 128),
                   activation: Activation = "relu", design: Design = "experts") -> nn.Module:
    """`experts`: generative, one accordion autoencoder per class; `shared`: one accordion encoder and a head."""
    del in_channels
    check_positive("a2e_classifier", num_classes=num_classes)
    if design not in ("experts", "shared"):
        raise ModelError(f"a2e_classifier: design must be 'experts' or 'shared', got {design!r}")
    features = _features("a2e_classifier", input_shape, in_features)
    widths = _check("a2e_classifier", widths, activation)
    if design == "shared":
        return A2ESharedClassifier(num_classes, features, widths, activation)
    return A2EClassifier(num_classes, features, widths, activation)
