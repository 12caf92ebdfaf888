"""The only module that touches channel dependencies: a thin wrapper over Torch-Pruning.

A *channel group* is a set of coupled channels that must be removed together
(a conv's filters, the BN after it, the next conv's input channels, every
layer tied to it through a residual addition, a depthwise conv, a concat...).
Groups are named by their root layer, the first conv/linear whose output
channels they remove. Everything else in dnnprune speaks in these names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

from dnnprune.errors import PruningError
from dnnprune.patterns import select_layers

Criterion = str
_PRUNABLE_ROOTS = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass(frozen=True)
class ChannelGroup:
    name: str
    layer_type: str
    width: int
    members: tuple[str, ...]


class ChannelGraph:
    """Channel coupling of one model instance; prunes that instance in place."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int], *, exclude: Iterable[str] = (),
                 include: Iterable[str] = ()) -> None:
        self.model = model
        self.input_shape = tuple(input_shape)
        self._names = {module: name for name, module in model.named_modules()}
        self.output_layers = output_layers(model, self.input_shape)
        excluded = set(self.output_layers) | set(select_layers(model, exclude, what="exclude pattern") if exclude else ())
        self._ignored = [model.get_submodule(n) for n in excluded]
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self._example = torch.zeros(1, *self.input_shape, device=device)
        was_training = model.training
        model.eval()
        self.graph = tp.DependencyGraph().build_dependency(model, example_inputs=self._example, verbose=False)
        model.train(was_training)
        self._roots: dict[str, tuple[nn.Module, Callable[..., Any]]] = {}
        self.groups = self._collect_groups()
        if include:
            wanted = set(select_layers(model, include, within=[g.name for g in self.groups], what="layer pattern"))
            self.groups = [g for g in self.groups if g.name in wanted]

    # -- inspection ----------------------------------------------------------------------

    def _collect_groups(self) -> list[ChannelGroup]:
        groups = []
        for group in self.graph.get_all_groups(ignored_layers=self._ignored, root_module_types=_PRUNABLE_ROOTS):
            root = group[0].dep.target.module
            name = self._names.get(root)
            if name is None or name in self._roots:
                continue
            self._roots[name] = (root, group[0].dep.handler)
            members = tuple(dict.fromkeys(self._names[d.target.module] for d, _ in group if d.target.module in self._names))
            groups.append(ChannelGroup(name, type(root).__name__, self.width(name), members))
        return groups

    def group(self, name: str) -> ChannelGroup:
        for group in self.groups:
            if group.name == name:
                return group
        raise PruningError(f"layer {name!r} is not a prunable channel group of this model")

    def width(self, name: str) -> int:
        root, _ = self._roots[name]
        return int(self.graph.get_out_channels(root))

    def _tp_group(self, name: str, idxs: Sequence[int]) -> Any:
        root, handler = self._roots[name]
        return self.graph.get_pruning_group(root, handler, list(idxs))

    # -- scoring -------------------------------------------------------------------------

    def importance(self, name: str, criterion: Criterion, *, seed: int = 0) -> torch.Tensor:
        """One score per channel of the group; low scores are removed first.

        Taylor needs gradients in `.grad` (call `accumulate_gradients` first).
        """
        group = self._tp_group(name, range(self.width(name)))
        scorer = _importance(criterion, seed)
        with torch.no_grad():
            scores = scorer(group)
        if scores is None:
            raise PruningError(f"criterion {criterion!r} cannot score layer {name!r} (e.g. bn_scale on a layer without BatchNorm); choose l1 or l2")
        return scores.detach().float().cpu()

    # -- surgery -------------------------------------------------------------------------

    def prune(self, plan: dict[str, Sequence[int]]) -> None:
        """Remove the given channel indices of each named group, in place."""
        for name, idxs in plan.items():
            idxs = sorted(set(int(i) for i in idxs))
            if not idxs:
                continue
            width = self.width(name)
            if len(idxs) >= width:
                raise PruningError(f"pruning {len(idxs)} of {width} channels would empty layer {name!r}; keep at least one")
            self._tp_group(name, idxs).prune()


def channels_to_keep(width: int, ratio: float, *, min_channels: int = 1, min_fraction: float = 0.0,
                     max_ratio: float = 1.0) -> int:
    """How many channels survive a ratio, honouring the per-layer floor and cap."""
    floor = max(min_channels, math.ceil(min_fraction * width))
    removed = min(int(round(ratio * width)), int(math.floor(max_ratio * width)))
    return max(min(width, floor), width - removed)


def lowest(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the `count` lowest scores (ties broken by index, so results are deterministic)."""
    if count <= 0:
        return []
    order = sorted(range(scores.numel()), key=lambda i: (float(scores[i]), i))
    return order[:count]


def output_layers(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
    """The last conv/linear to run produces the logits; its outputs are never pruned."""
    executed: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, _i, _o, name=n: executed.append(name))
             for n, m in model.named_modules() if isinstance(m, _PRUNABLE_ROOTS)]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return executed[-1:]


def _importance(criterion: Criterion, seed: int) -> Callable[[Any], torch.Tensor]:
    if criterion == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1, normalizer=None)
    if criterion == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)
    if criterion == "bn_scale":
        return tp.importance.BNScaleImportance(normalizer=None)
    if criterion == "taylor":
        return tp.importance.GroupTaylorImportance(normalizer=None)
    if criterion == "random":
        generator = torch.Generator().manual_seed(seed)
        return lambda group: torch.rand(len(group[0].idxs), generator=generator)
    raise PruningError(f"unknown criterion {criterion!r}; choose l1, l2, bn_scale, taylor or random")


def accumulate_gradients(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                         device: torch.device | str = "cpu") -> int:
    """Fill `.grad` with the loss gradient over a few batches, for the Taylor criterion."""
    model.zero_grad(set_to_none=True)
    model.train()
    count = 0
    for inputs, targets in batches:
        loss = nn.functional.cross_entropy(model(inputs.to(device)), targets.to(device))
        loss.backward()
        count += 1
    model.eval()
    if count == 0:
        raise PruningError("the Taylor criterion needs at least one training batch")
    return count
