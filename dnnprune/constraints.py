"""Encodings held while a model trains, so a fine-tuned checkpoint still saves in its encoding.

- sparse: pruned positions stay zero. The weight becomes `original * mask`: pruned entries get no
  gradient, and momentum, weight decay or Adam cannot move what the model sees.
- kmeans: Deep Compression's centroid fine-tuning. The codes are frozen and each centroid is a
  parameter trained by the mean gradient of its weights (Deep Compression sums them, which makes a
  float learning rate thousands of times too large); the zero centroid stays at 0.
- linear: the codes are frozen and the per-channel scales are trained, each by its codes'
  projection of their weights' gradients.
On exit, also after an exception, the parametrizations are removed and every weight is put back
exactly on its grid (`codecs.on_grid`), so `save` re-encodes it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from dnnprune.codecs import (
    Encoding,
    KMeansSpec,
    LinearSpec,
    as_encoding,
    linear_codes,
    on_grid,
)
from dnnprune.codecs.linear import round_significand
from dnnprune.errors import DnnpruneError


class _Holder(nn.Module):
    """A parametrization that keeps one encoding; `settled` is the weight it stands for now, on the CPU."""

    def settled(self, original: torch.Tensor) -> torch.Tensor:
        return self(original).detach().cpu().float()


class _Masked(_Holder):
    """weight = original x mask: the zeros of the mask stay zero whatever the optimizer does."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return original * self.mask


class _SharedWeight(_Holder):
    """weight = codebook[codes]. Autograd sums a cluster's gradients into its centroid; dividing by the
    cluster's size makes the step the float step projected onto the centroid (its members' mean), so
    the learning rate that trains the float model trains the codes too. Summed, a centroid of thousands
    of weights moved thousands of times too far: training a k-means LeNet-5 at lr 0.05 ended at chance."""

    def __init__(self, codes: torch.Tensor, codebook: torch.Tensor, shape: torch.Size) -> None:
        super().__init__()
        self.register_buffer("codes", codes)
        sizes = torch.bincount(codes.reshape(-1).long(), minlength=codebook.numel()).clamp(min=1)
        self.register_buffer("step", (codebook != 0).float() / sizes.to(codebook.dtype))
        self.codebook = nn.Parameter(codebook.clone())
        self.codebook.register_hook(lambda grad: grad * self.step)
        self.shape = shape

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        return self.codebook[self.codes].reshape(self.shape)

    def settled(self, original: torch.Tensor) -> torch.Tensor:
        codebook = torch.where(self.step > 0, self.codebook.detach(), torch.zeros_like(self.codebook))
        return codebook.cpu().float()[self.codes.cpu()].reshape(self.shape)


class _ScaledCodes(_Holder):
    """weight = codes x scale per output channel, with the scales trained. A scale's gradient is divided
    by its channel's sum of squared codes: the float step projected onto that channel's codes, for the
    same reason as the centroids."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, shape: torch.Size) -> None:
        super().__init__()
        self.register_buffer("codes", codes)
        norms = codes.reshape(codes.shape[0], -1).to(scales.dtype).pow(2).sum(1).clamp(min=1)
        self.register_buffer("step", 1.0 / norms)
        self.scales = nn.Parameter(scales.clone())
        self.scales.register_hook(lambda grad: grad * self.step)
        self.shape = shape

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        return (self.codes * self.scales[:, None]).reshape(self.shape)

    def settled(self, original: torch.Tensor) -> torch.Tensor:
        scales = round_significand(self.scales.detach().cpu())
        return (self.codes.cpu() * scales[:, None]).reshape(self.shape)


@contextmanager
def held_encodings(model: nn.Module, encodings: Mapping[str, Encoding | Mapping[str, Any]]) -> Iterator[None]:
    """Train inside this block and every encoded parameter keeps its encoding (see the module doc)."""
    specs = {name: as_encoding(spec) for name, spec in encodings.items()}
    targets = {name: _target(model, name) for name in specs}
    held: dict[str, tuple[nn.Module, str, _Holder, bool]] = {}
    try:
        for name, (module, attribute) in targets.items():
            holder = _hold(module, attribute, name, specs[name])
            if holder is not None:
                trainable = getattr(module, attribute).requires_grad
                held[name] = (module, attribute, holder, trainable)
                _attach(module, attribute, holder)
                if not trainable:  # a weight the caller froze: its codebook or scales stay as they are too
                    holder.requires_grad_(False)
        yield
    except BaseException:
        _release(held, specs, strict=False)
        raise
    _release(held, specs, strict=True)


def _target(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module and parameter name an encoding key `<module>.<param>` points at."""
    module_name, _, attribute = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise DnnpruneError(f"the encodings name {name!r}, but the model has no module {module_name!r} any more; "
                            "drop that entry from the checkpoint's encodings") from None
    is_parameter = attribute in module._parameters or parametrize.is_parametrized(module, attribute)
    if not is_parameter:
        raise DnnpruneError(f"the encodings name {name!r}, but {module_name or 'the model'} has no parameter "
                            f"{attribute!r}; drop that entry from the checkpoint's encodings")
    return module, attribute


def _hold(module: nn.Module, attribute: str, name: str, spec: Encoding) -> _Holder | None:
    """The parametrization for one weight, or None when an outer `held_encodings` already holds it."""
    if parametrize.is_parametrized(module, attribute):
        if any(isinstance(p, _Holder) for p in module.parametrizations[attribute]):
            return None
        raise DnnpruneError(f"{name} is already parametrized; remove its parametrizations before training")
    weight = getattr(module, attribute).detach()
    try:
        grid = on_grid(weight, spec)
    except DnnpruneError as exc:
        raise DnnpruneError(f"{name}: {exc}") from None
    if not torch.equal(grid, weight.cpu()):
        raise DnnpruneError(f"{name} is not on its {spec.describe()} grid; re-encode it before training")
    device = weight.device
    values = spec.values
    if isinstance(values, KMeansSpec):
        codebook, codes = torch.unique(grid, return_inverse=True)
        return _SharedWeight(codes.to(device), codebook.to(device), weight.shape)
    if isinstance(values, LinearSpec):
        codes, scales = linear_codes(grid, values.bits)
        return _ScaledCodes(codes.to(device), scales.to(device), weight.shape)
    return _Masked(grid != 0).to(device)


def _attach(module: nn.Module, attribute: str, holder: _Holder) -> None:
    parametrize.register_parametrization(module, attribute, holder, unsafe=True)
    if not isinstance(holder, _Masked):
        module.parametrizations[attribute].original.requires_grad_(False)


def _release(held: dict[str, tuple[nn.Module, str, _Holder, bool]], specs: dict[str, Encoding], *, strict: bool) -> None:
    """Remove the parametrizations and put each weight on its grid; after an error, never raise another."""
    failure: DnnpruneError | None = None
    for name, (module, attribute, holder, requires_grad) in held.items():
        if not parametrize.is_parametrized(module, attribute):
            continue
        settled = holder.settled(module.parametrizations[attribute].original)
        parametrize.remove_parametrizations(module, attribute, leave_parametrized=False)
        parameter = getattr(module, attribute)
        parameter.requires_grad_(requires_grad)
        try:
            settled = on_grid(settled, specs[name])
        except DnnpruneError as exc:
            cause = ("it holds NaN or inf: check the input checkpoint's weights, or lower the learning rate"
                     if not bool(torch.isfinite(settled).all()) else "lower the learning rate")
            failure = failure or DnnpruneError(f"{name} left its {specs[name].describe()} grid during training "
                                               f"({exc}); {cause}")
        with torch.no_grad():
            parameter.copy_(settled.to(parameter.device, parameter.dtype))
    if strict and failure is not None:
        raise failure

