"""torchvision classification models by name, built untrained (weights are never downloaded)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from torch import nn
from torchvision import models

from dnnprune.errors import ModelError

# These two default to auxiliary heads that change forward()'s return type; we want plain logits.
_NO_AUX = {"googlenet", "inception_v3"}
# Where those heads live in a state dict saved with them: they feed only the training loss.
_AUX_PREFIXES = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}


class MNASNet(models.MNASNet):
    """torchvision's MNASNet, which also loads a state dict that lost its `_metadata` (safetensors files,
    rebuilt dicts): torchvision then refuses it ("version should be set to 1 or 2"); the state dict of a
    model built here has this model's own version."""

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              *args: Any) -> None:
        if local_metadata.get("version") is None:
            local_metadata = {**local_metadata, "version": self._version}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def create_torchvision(name: str, num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build `torchvision.models.<name>`; pretrained weights come in through `dnnprune import` instead."""
    _check_name(name)
    if "weights" in kwargs or "weights_backbone" in kwargs:
        raise ModelError(
            f"torchvision.{name}: weights are never downloaded; build it untrained and load "
            "weights with `dnnprune import WEIGHTS --arch torchvision.NAME`"
        )
    if name in _NO_AUX:
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", True)
    try:
        model = models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"bad arguments for torchvision.{name}: {message}") from None
    if in_channels != 3:
        _replace_first_conv(model, name, in_channels)
    if type(model) is models.MNASNet:
        model.__class__ = MNASNet
    return model


def auxiliary_keys(name: str, keys: Iterable[str]) -> list[str]:
    """The keys of `torchvision.<name>`'s auxiliary training heads among `keys` (googlenet's aux1/aux2,
    inception_v3's AuxLogits): weights saved from a model trained with them carry these tensors."""
    return [key for key in keys if key.startswith(_AUX_PREFIXES.get(name, ()))]


def _check_name(name: str) -> None:
    """Only classification models: detection/segmentation builders take other arguments and outputs."""
    known = models.list_models(module=models)
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"did you mean {', '.join('torchvision.' + c for c in close)}? " if close else ""
    raise ModelError(
        f"unknown torchvision model {name!r}; {hint}list them with "
        "`python -c 'import dnnprune.models as m; print(m.torchvision_names())'`"
    )


def _replace_first_conv(model: nn.Module, name: str, in_channels: int) -> None:
    """Swap the stem for one taking `in_channels`, at the same attribute path so state-dict keys stay put."""
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels <= 0:
        raise ModelError(f"torchvision.{name}: in_channels must be a positive integer, got {in_channels!r}")
    path, conv = next(((p, m) for p, m in model.named_modules() if isinstance(m, nn.Conv2d)), ("", None))
    if conv is None or conv.groups != 1:
        raise ModelError(f"torchvision.{name}: no plain first Conv2d to adapt to in_channels={in_channels}")
    stem = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, stem)
