"""The model as a torch.fx graph, run from any point: where a cell's forward pass can start.

A *cut* is a node whose value alone carries everything later nodes need (no skip connection spans
it), so caching that one activation lets every cell of a layer skip the unpruned prefix. A layer's
*route* is the latest cut before the first node its pruning changes, and, where only channel-wise
layers (BN, ReLU, pooling) follow its root conv up to the next layer that mixes channels, a
*selection point*: there the unpruned activation with the removed channels dropped equals the pruned
layers' output (the engine checks this bit for bit before relying on it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from dnnprune.winograd import WinogradConvs

_CHANNELWISE = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid,
                nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d,
                nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool1d, nn.AvgPool1d)
_FRESH = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)


@dataclass(frozen=True)
class Route:
    """Where a layer's cells start: the cached activation at `start`; with `select`, the activation at
    `select` with the removed channels dropped (exact when the layers in between act channel by channel)."""

    start: int
    select: int | None = None


class Trace:
    """The model as an fx graph, and the points where a single activation carries everything forward."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int], device: torch.device) -> None:
        self.model = model
        self.module = torch.fx.symbolic_trace(model)
        self.nodes = list(self.module.graph.nodes)
        if sum(n.op == "placeholder" for n in self.nodes) != 1 or self.nodes[0].op != "placeholder":
            raise NoTrace("the model takes more than one input")
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        last = {n: max((self.pos[u] for u in n.users), default=self.pos[n]) for n in self.nodes}
        self.release: list[list[torch.fx.Node]] = [[] for _ in self.nodes]  # values no longer needed after node i
        for n, i in last.items():
            if n.op != "get_attr" and i > self.pos[n]:
                self.release[i].append(n)
        self.cuts = self._cuts(last)
        self.mutates = any(_maybe_inplace(model, n) for n in self.nodes)
        self.relu_in_place = {i for i, n in enumerate(self.nodes) if self._can_relu_in_place(n)}
        self.numel = self._numel(input_shape, device)

    def _cuts(self, last: dict[torch.fx.Node, int]) -> list[int]:
        cuts: list[int] = []
        live: set[torch.fx.Node] = set()
        for i, node in enumerate(self.nodes):
            if node.op == "output":
                break
            if node.op != "get_attr" and last[node] > i:
                live.add(node)
            live -= {n for n in live if last[n] <= i}
            if live == {node}:
                cuts.append(i)
        return cuts

    def _can_relu_in_place(self, node: torch.fx.Node) -> bool:
        """A ReLU whose input is a fresh conv/BN/linear output used nowhere else: same values, no new tensor."""
        if node.op != "call_module" or type(self.model.get_submodule(str(node.target))) is not nn.ReLU:
            return False
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], torch.fx.Node):
            return False
        source = node.args[0]
        return (source.op == "call_module" and len(source.users) == 1
                and isinstance(self.model.get_submodule(str(source.target)), _FRESH))

    def _numel(self, input_shape: Sequence[int], device: torch.device) -> dict[int, int]:
        """Elements per sample of each cut's activation."""
        sizes: dict[int, int] = {}
        with torch.inference_mode():
            self.run(0, torch.zeros(1, *input_shape, device=device), record=sizes)
        return sizes

    def route(self, members: Sequence[str], root: str) -> Route:
        """The latest cut before the first node pruning changes, and where channel selection can start."""
        def touches(target: str) -> bool:
            return any(target == m or target.startswith(m + ".") or m.startswith(target + ".") for m in members)

        found = []
        for node in self.nodes:
            if node.op == "call_module" and touches(str(node.target)):
                found.append(self.pos[node])
            elif node.op == "get_attr" and touches(str(node.target)):
                found.extend(self.pos[u] for u in node.users)
        if not found:
            return Route(0)
        first = min(found)
        start = max((c for c in self.cuts if c < first), default=0)
        return Route(start, self._selection_point(self.nodes[first], root, set(members)))

    def _selection_point(self, node: torch.fx.Node, root: str, members: set[str]) -> int | None:
        """The node before the first layer that mixes the pruned channels, if only channel-wise layers lead there."""
        if node.op != "call_module" or str(node.target) != root:
            return None
        while True:
            users = list(node.users)
            if len(users) != 1 or users[0].op != "call_module":
                return None
            user = users[0]
            module = self.model.get_submodule(str(user.target))
            if str(user.target) in members and not isinstance(module, _CHANNELWISE):
                index = self.pos[node]
                return index if index in self.cuts and list(user.args) == [node] and not user.kwargs else None
            if not isinstance(module, _CHANNELWISE):
                return None
            node = user

    def run(self, start: int, value: torch.Tensor, stop: int | None = None,
            record: dict[int, int] | None = None, convs: WinogradConvs | None = None) -> torch.Tensor:
        """Execute the nodes after `start` given its value; the value at `stop`, else the output.
        With `convs`, eligible convolutions run as Winograd (equal to float rounding, not bit for bit)."""
        env: dict[torch.fx.Node, Any] = {self.nodes[start]: value}
        start_node = self.nodes[start]
        cuts = set(self.cuts) if record is not None else set()

        def load(node: torch.fx.Node) -> Any:
            if node not in env and node.op == "get_attr":
                env[node] = _fetch(self.model, self.module, str(node.target))
            return env[node]

        for i in range(start + 1, len(self.nodes)):
            node = self.nodes[i]
            if node.op == "output":
                return torch.fx.node.map_arg(node.args[0], load)
            if node.op == "get_attr":
                continue
            args = torch.fx.node.map_arg(node.args, load)
            kwargs = torch.fx.node.map_arg(node.kwargs, load)
            if i in self.relu_in_place and node.args[0] is not start_node:
                env[node] = torch.relu_(args[0])
            elif node.op == "call_module":
                module = self.model.get_submodule(str(node.target))
                if convs is not None and isinstance(module, nn.Conv2d) and len(args) == 1 and not kwargs:
                    env[node] = convs(module, args[0])
                else:
                    env[node] = module(*args, **kwargs)
            elif node.op == "call_function":
                env[node] = node.target(*args, **kwargs)  # type: ignore[operator]
            elif node.op == "call_method":
                env[node] = getattr(args[0], str(node.target))(*args[1:], **kwargs)
            else:
                raise NoTrace(f"unexpected fx node {node.op}")
            if i in cuts and isinstance(env[node], torch.Tensor):
                record[i] = env[node][0].numel()  # type: ignore[index]
            if i == stop:
                return env[node]
            for gone in self.release[i]:
                env.pop(gone, None)
        raise NoTrace("the traced graph has no output")


class NoTrace(Exception):
    """The model cannot be run from a cut; its cells fall back to full forward passes."""


def _fetch(model: nn.Module, traced: nn.Module, target: str) -> Any:
    """Live attributes come from the model (pruning replaces them); fx's own constants from the trace."""
    for root in (model, traced):
        value: Any = root
        try:
            for part in target.split("."):
                value = getattr(value, part)
        except AttributeError:
            continue
        return value
    raise NoTrace(f"fx attribute {target} not found")


def _maybe_inplace(model: nn.Module, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return bool(getattr(model.get_submodule(str(node.target)), "inplace", False))
    if node.kwargs.get("inplace"):
        return True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return node.op in ("call_method", "call_function") and ((name.endswith("_") and not name.endswith("__"))
                                                             or name.startswith("__i"))


def select_channels(value: torch.Tensor, keep: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """The kept channels of an activation, in the memory layout the pruned layers would produce (`like`'s)."""
    out = value.index_select(1, keep)
    channels_last = like.is_contiguous(memory_format=torch.channels_last) if like is not None else (
        value.dim() == 4 and value.is_contiguous(memory_format=torch.channels_last))
    if out.dim() == 4 and channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out
