"""Layer (depth) pruning: the units a network can lose whole, and their removal.

A unit is one of
- a residual block, replaced by its shortcut: an identity, or the block's own downsample path
  when the block changes the shape (torchvision BasicBlock/Bottleneck, inverted residuals with a
  residual connection, the zoo's CIFAR ResNets);
- a convolution whose input and output shapes match (stride 1, as many channels out as in) in a
  plain chain, removed with the BatchNorm right after it;
- a hidden Linear layer of an MLP or autoencoder chain, removed with the activation after it; the
  next Linear is bridged to the previous layer's output and initialised by least squares on
  calibration activations (so it computes what the two layers computed, as far as one affine map
  can), then fine-tuned by the caller.
Removals are ordinary module replacements (Identity, or the block's shortcut submodule) and
attribute changes (the bridged layer's `in_features`), which the checkpoint records, so a
layer-pruned model rebuilds in a new process from its metadata alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
import torch.nn as nn

from dnnprune.checkpoint import SHORTCUT_ATTRIBUTE, mark_shortcut
from dnnprune.errors import PruningError
from dnnprune.metrics import count_macs

UnitKind = Literal["block", "conv", "linear"]
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.ELU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish,
                nn.Dropout, nn.Identity)
_RCOND = 1e-10
"""Eigenvalues of the centred Gram matrix below this fraction of the largest count as zero variance."""
BRIDGE_RIDGE = 1e-2
"""Ridge of the bridge fit, as a fraction of the inputs' mean variance. With about as many calibration
samples as input features (784 pixels, 1,024 samples) the plain fit interpolates noise: weights in
the hundreds, and a bridged Fashion-MNIST accordion recovered to 79 % val top-1 in 300 fine-tune
steps, against 85 % from the ridge fit. Where the samples outnumber the features, it costs little."""


@dataclass(frozen=True)
class Unit:
    """One removable piece: `name` is the module replaced; `members` are every module it takes away."""

    name: str
    kind: UnitKind
    members: tuple[str, ...]
    shortcut: str | None = None
    """For a block that changes shape: its submodule that replaces it."""
    bridge: str | None = None
    """For a hidden Linear: the next Linear, whose input is re-wired to this unit's input."""
    params: int = 0
    macs: int = 0


# ----------------------------------------------------------------------------- finding units


def find_units(model: nn.Module, input_shape: Sequence[int]) -> list[Unit]:
    """Every unit whose removal leaves a model that still runs and returns the same output shape."""
    macs = count_macs(model, tuple(input_shape))
    output_shape = _output_shape(model, input_shape)
    units: list[Unit] = []
    taken: set[str] = set()
    for name, module in model.named_modules():
        if not name or any(name.startswith(t + ".") for t in taken):
            continue
        unit = _block_unit(name, module) or _chain_unit(model, name, module)
        if unit is None or not _still_runs(model, unit, input_shape, output_shape):
            continue
        if unit.kind == "block":
            taken.add(name)
        units.append(_sized(model, unit, macs))
    return units


def _block_unit(name: str, module: nn.Module) -> Unit | None:
    """A residual block: `x + f(x)` where the block keeps the shape, `shortcut(x) + f(x)` where not."""
    if any(getattr(module, flag, False) is True for flag in ("use_res_connect", "use_residual", "apply_residual")):
        return Unit(name, "block", (name,))
    for attribute in ("downsample", "shortcut"):
        if not hasattr(module, attribute) or isinstance(module, nn.Sequential):
            continue
        path = getattr(module, attribute)
        if path is None or isinstance(path, nn.Identity):
            return Unit(name, "block", (name,))
        if isinstance(path, nn.Module):
            return Unit(name, "block", (name,), shortcut=attribute)
    return None


def _chain_unit(model: nn.Module, name: str, module: nn.Module) -> Unit | None:
    """A conv or hidden Linear inside an nn.Sequential chain."""
    parent_name, _, index = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential) or not index.isdigit():
        return None
    position = int(index)
    siblings = list(parent.children())
    prefix = f"{parent_name}." if parent_name else ""
    if isinstance(module, nn.Conv2d) and _same_shape_conv(module):
        after = position + 1
        members = [name]
        if after < len(siblings) and isinstance(siblings[after], nn.modules.batchnorm._BatchNorm):
            members.append(f"{prefix}{after}")
        return Unit(name, "conv", tuple(members))
    if isinstance(module, nn.Linear):
        following = _next_linear(siblings, position)
        if following is None or siblings[following].bias is None:
            return None  # the bridge needs the next layer's bias to absorb the removed layer's offset
        members = [name] + [f"{prefix}{i}" for i in range(position + 1, following)
                            if not isinstance(siblings[i], nn.Identity)]
        return Unit(name, "linear", tuple(members), bridge=f"{prefix}{following}")
    return None


def _same_shape_conv(conv: nn.Conv2d) -> bool:
    return (conv.in_channels == conv.out_channels and conv.groups == 1 and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and all(2 * p == k - 1 for p, k in zip(conv.padding, conv.kernel_size)))  # type: ignore[arg-type]


def _next_linear(siblings: list[nn.Module], position: int) -> int | None:
    """The next Linear after `position`, reached through element-wise modules only."""
    for index in range(position + 1, len(siblings)):
        module = siblings[index]
        if isinstance(module, nn.Linear):
            return index
        if not isinstance(module, _ELEMENTWISE):
            return None
    return None


def _output_shape(model: nn.Module, input_shape: Sequence[int]) -> tuple[int, ...]:
    model_device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return tuple(model(torch.zeros(1, *input_shape, device=model_device)).shape)
    finally:
        model.train(was_training)


def _still_runs(model: nn.Module, unit: Unit, input_shape: Sequence[int], output_shape: tuple[int, ...]) -> bool:
    """Try the removal (without the least-squares fit) and undo it."""
    undo = _replace(model, unit)
    try:
        return _output_shape(model, input_shape) == output_shape
    except (RuntimeError, ValueError, IndexError, TypeError):
        return False
    finally:
        undo()


def _sized(model: nn.Module, unit: Unit, macs: dict[str, int]) -> Unit:
    """What removing the unit saves; a hidden Linear's bridge replaces two layers, so it can save less
    than the layer's own size, or nothing (removing a bottleneck widens the layer after it)."""
    modules = [model.get_submodule(m) for m in unit.members]
    params = sum(p.numel() for m in modules for p in m.parameters())
    mac = sum(v for k, v in macs.items() if any(k == m or k.startswith(m + ".") for m in unit.members))
    if unit.bridge is not None:
        first, follower = model.get_submodule(unit.name), model.get_submodule(unit.bridge)
        bridge_macs = first.in_features * follower.out_features
        positions = macs.get(unit.bridge, 0) // max(1, follower.in_features * follower.out_features)
        params += follower.weight.numel() - bridge_macs
        mac += macs.get(unit.bridge, 0) - bridge_macs * max(1, positions)
    if unit.shortcut is not None:
        kept = getattr(model.get_submodule(unit.name), unit.shortcut)
        params -= sum(p.numel() for p in kept.parameters())
        mac -= sum(v for k, v in macs.items() if k.startswith(f"{unit.name}.{unit.shortcut}"))
    return Unit(unit.name, unit.kind, unit.members, unit.shortcut, unit.bridge, params, mac)


# ----------------------------------------------------------------------------- removing units


def remove_unit(model: nn.Module, unit: Unit, calibration: torch.Tensor | None = None,
                ridge: float = BRIDGE_RIDGE) -> None:
    """Take the unit out of the model, in place; a Linear unit's bridge is fitted on `calibration`
    (ridge 0: plain least squares, exact where the removed layer was affine)."""
    if unit.kind == "linear":
        _bridge(model, unit, calibration, ridge)
        return
    _replace(model, unit)


def strip_unit(model: nn.Module, unit: Unit) -> None:
    """Remove the unit structurally only (a bridge gets fresh weights): for sizing what removals leave."""
    _replace(model, unit)


def _replace(model: nn.Module, unit: Unit) -> Callable[[], None]:
    """Swap the unit's modules for what replaces them; returns a function that puts them back."""
    saved = [(name, model.get_submodule(name)) for name in unit.members]
    if unit.kind == "linear":
        saved.append((unit.bridge, model.get_submodule(unit.bridge)))  # type: ignore[arg-type]
        first = model.get_submodule(unit.name)
        follower = model.get_submodule(unit.bridge)  # type: ignore[arg-type]
        stand_in = nn.Linear(first.in_features, follower.out_features, bias=follower.bias is not None)
        stand_in.to(follower.weight.device)
        _set(model, unit.bridge, stand_in)  # type: ignore[arg-type]
    for name in unit.members:
        _set(model, name, nn.Identity())
    if unit.shortcut is not None:
        block = dict(saved)[unit.name]
        _set(model, unit.name, mark_shortcut(getattr(block, unit.shortcut), unit.shortcut))
    defused = _defuse_inplace_after(model, unit) if unit.kind == "conv" else None

    def undo() -> None:
        if defused is not None:
            defused.inplace = True
        for name, module in saved:
            _set(model, name, module)
            if unit.shortcut is not None and hasattr(getattr(module, unit.shortcut, None), SHORTCUT_ATTRIBUTE):
                delattr(getattr(module, unit.shortcut), SHORTCUT_ATTRIBUTE)

    return undo


def _defuse_inplace_after(model: nn.Module, unit: Unit) -> nn.Module | None:
    """The in-place activation that followed the removed conv now writes over its own input, which an
    earlier activation saved for backward (VGG's ReLU after ReLU) or a shortcut still reads (RegNet's
    `proj(x) + f(x)`); it is made out-of-place (recorded in the checkpoint's structure). Returns it."""
    parent_name, _, index = unit.members[-1].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    for follower in list(parent.children())[int(index) + 1:]:
        if isinstance(follower, nn.Identity):
            continue
        if getattr(follower, "inplace", False) is True:
            follower.inplace = False
            return follower
        return None
    return None


def _bridge(model: nn.Module, unit: Unit, calibration: torch.Tensor | None, ridge: float) -> None:
    """Replace Linear_i (+ its activation) and re-fit Linear_{i+1} as one affine map from Linear_i's input."""
    if calibration is None or calibration.shape[0] < 2:
        raise PruningError(f"removing the hidden layer {unit.name!r} needs calibration samples to fit its bridge")
    first = model.get_submodule(unit.name)
    follower = model.get_submodule(unit.bridge)  # type: ignore[arg-type]
    if follower.bias is None:
        raise PruningError(f"cannot bridge into {unit.bridge!r}: it has no bias to absorb the removed layer's offset")
    inputs, targets = _activations(model, first, follower, calibration)
    weight, bias = least_squares(inputs, targets, ridge=ridge)
    bridge = nn.Linear(first.in_features, follower.out_features, bias=True).to(follower.weight.device)
    with torch.no_grad():
        bridge.weight.copy_(weight.to(bridge.weight))
        bridge.bias.copy_(bias.to(bridge.bias))
    _set(model, unit.bridge, bridge)  # type: ignore[arg-type]
    for name in unit.members:
        _set(model, name, nn.Identity())


def _activations(model: nn.Module, first: nn.Module, follower: nn.Module,
                 calibration: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs of the removed layer, outputs of the next Linear) on the calibration samples."""
    seen: dict[str, torch.Tensor] = {}

    def keep_input(_module: nn.Module, args: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        seen["x"] = args[0].detach().flatten(0, -2)

    def keep_output(_module: nn.Module, _args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen["y"] = output.detach().flatten(0, -2)

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    handles = [first.register_forward_hook(keep_input), follower.register_forward_hook(keep_output)]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(calibration.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return seen["x"], seen["y"]


def least_squares(inputs: torch.Tensor, targets: torch.Tensor, ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """W, b minimising ||inputs W^T + b - targets||^2 + ridge * n * mean_var * ||W||^2, in float64.

    The data are centred first, so the bias is fitted exactly and the scale of the inputs does not
    matter (the ridge is relative to the inputs' mean variance); the centred normal equations are
    solved by a pseudo-inverse that drops only directions with (relatively) no variance (dead or
    constant units, duplicated columns), so with ridge 0 an affine relation is recovered exactly and
    a rank-deficient one still gets a finite, minimum-norm answer.
    """
    x, y = inputs.double(), targets.double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    centred = x - x_mean
    values, vectors = torch.linalg.eigh(centred.T @ centred)
    keep = values > _RCOND * values.max().clamp_min(torch.finfo(torch.float64).tiny)
    basis = vectors[:, keep]
    shrink = values[keep] + ridge * values.clamp_min(0).mean()
    weight = (basis / shrink) @ (basis.T @ (centred.T @ (y - y_mean)))
    bias = y_mean - x_mean @ weight
    return weight.T.float(), bias.float()


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def unit_named(units: Sequence[Unit], name: str) -> Unit:
    for unit in units:
        if unit.name == name:
            return unit
    raise PruningError(f"{name!r} is not a removable unit of this model; removable: "
                       f"{', '.join(u.name for u in units[:8])}{', ...' if len(units) > 8 else ''}")

