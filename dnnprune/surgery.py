"""The only module that touches channel dependencies: a thin wrapper over Torch-Pruning.

A *channel group* is a set of coupled channels that must be removed together
(a conv's filters, the BN after it, the next conv's input channels, every
layer tied to it through a residual addition, a depthwise conv, a concat...).
Groups are named by their root layer, the first conv/linear whose output
channels they remove. Everything else in dnnprune speaks in these names.

Torch-Pruning 1.6 offers no public switch for two things this module needs, so while it calls into
Torch-Pruning it replaces two private functions of `torch_pruning.dependency.index_mapping` and puts
them back afterwards (`_TP_PATCHED`; tests/test_surgery.py fails, naming them, if they move):

* `update_reshape_index_mapping` skips reshapes that reorder channels (a channel shuffle), which it
  otherwise maps as flattens or divides by zero on (ShuffleNet cannot even be traced without this);
  the groups whose channels cross them are locked, so the skipped mapping is never used for surgery;
* `update_index_mapping` runs once after each change instead of before every group Torch-Pruning
  builds (quadratic on DenseNet: building and scoring DenseNet-201's groups at 32x32 takes 3 s instead of 31 s).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping as _index_mapping

from dnnprune.errors import PruningError
from dnnprune.metrics import hooked_forward
from dnnprune.patterns import select_layers
from dnnprune.tasks import Task, make_task

Criterion = str
_PRUNABLE_ROOTS = (nn.modules.conv._ConvNd, nn.Linear)
_RECOVERABLE = (IndexError, ValueError, ZeroDivisionError, AssertionError, KeyError)


@dataclass(frozen=True)
class ChannelGroup:
    """Coupled channels, named by the first layer (in forward order) whose filters they remove.

    `outputs` are the conv/linear layers that lose filters; the other members only lose inputs (or are
    BatchNorms and friends). `divisor` > 1 when a grouped convolution needs its channel blocks to
    shrink equally: remove the same positions in each of the `divisor` blocks (`ChannelGraph.choose`).
    """

    name: str
    layer_type: str
    width: int
    members: tuple[str, ...]
    outputs: tuple[str, ...] = ()
    divisor: int = 1


class ChannelGraph:
    """Channel coupling of one model instance; prunes that instance in place.

    `all_groups` lists every prunable group (the output layer aside) in forward order; `groups` is the
    subset left after `exclude`/`include`. `locked` maps groups that cannot be pruned safely to why
    (e.g. channels that pass through a channel shuffle).
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int], *, exclude: Iterable[str] = (),
                 include: Iterable[str] = ()) -> None:
        self.model = model
        self.input_shape = tuple(input_shape)
        self._names = {module: name for name, module in model.named_modules()}
        self.order = execution_order(model, self.input_shape)
        self.output_layers = self.order[-1:]
        self.locked: dict[str, str] = {}
        _refuse_untraceable(model)
        excluded = set(select_layers(model, exclude, what="exclude pattern")) if exclude else set()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        was_training = model.training
        model.eval()
        frozen = [p for p in model.parameters() if not p.requires_grad]
        for parameter in frozen:  # the graph is traced through autograd: a frozen layer would leave no trace
            parameter.requires_grad_(True)
        try:
            with _patched_torch_pruning(), torch.enable_grad():
                self.graph = tp.DependencyGraph().build_dependency(
                    model, example_inputs=torch.zeros(1, *self.input_shape, device=device), verbose=False)
        finally:
            for parameter in frozen:
                parameter.requires_grad_(False)
            model.train(was_training)
        self._roots: dict[str, tuple[nn.Module, Callable[..., Any]]] = {}
        self._stale = False
        self.all_groups = self._collect_groups()
        self.groups = [g for g in self.all_groups if not self._excluded(g, excluded)]
        if include:
            wanted = set(select_layers(model, include, within=[g.name for g in self.groups], what="layer pattern"))
            self.groups = [g for g in self.groups if g.name in wanted]

    # -- inspection ----------------------------------------------------------------------

    def _collect_groups(self) -> list[ChannelGroup]:
        position = {name: i for i, name in enumerate(self.order)}
        ignored = {self.model.get_submodule(n) for n in self.output_layers}
        covered: set[nn.Module] = set()
        groups = []
        with _patched_torch_pruning(self.graph, refresh=True):
            for module in list(self.graph.module2node):
                if module in covered or module not in self._names or not isinstance(module, _PRUNABLE_ROOTS):
                    continue
                group = self._full_group(module)
                if group is None:
                    covered.add(module)
                    continue
                outputs = self._outputs(group, position)
                covered.update(self.model.get_submodule(n) for n in outputs)
                covered.add(module)
                if ignored & {self.model.get_submodule(n) for n in outputs}:
                    continue
                groups.append(self._describe(module, group, outputs))
        return sorted(self._without_locked(groups), key=lambda g: position.get(g.name, len(position)))

    def _without_locked(self, groups: list[ChannelGroup]) -> list[ChannelGroup]:
        """A group sharing a filter-producing layer with a locked one is the same coupled set: lock it too."""
        kept = []
        for group in groups:
            reason = next((self.locked[n] for n in group.outputs if n in self.locked), None)
            if reason is None:
                kept.append(group)
            else:
                self.locked.setdefault(group.name, reason)
                self._roots.pop(group.name, None)
        return kept

    def _full_group(self, module: nn.Module) -> Any:
        name = self._names[module]
        pruner = self.graph.get_pruner_of_module(module)
        width = pruner.get_out_channels(module) if pruner is not None else None
        if width is None:
            return None
        try:
            group = self.graph.get_pruning_group(module, pruner.prune_out_channels, list(range(width)))
        except _RECOVERABLE as exc:
            self.locked[name] = f"torch-pruning cannot map its channels ({type(exc).__name__})"
            return None
        features_last = isinstance(module, nn.Linear)
        mixer = next((_op_name(d.target) for d, _ in group if _mixes_channels(d.target, features_last)), None)
        merged = next((self._names.get(d.target.module, type(d.target.module).__name__) for d, idxs in group
                       if isinstance(d.target.module, nn.Module) and not self._fits(d, idxs, width)), None)
        if mixer is None and merged is not None:  # several channels onto one: cutting one cuts the others too
            self.locked[name] = (f"its {width} channels map onto fewer of {merged}'s (e.g. a Linear's features "
                                 "viewed as one channel, or halves multiplied together as in a GLU)")
            return None
        if mixer is not None:
            self.locked[name] = (f"its channels pass through {mixer} (a reshape or transpose that moves channels "
                                 "out of place, e.g. a channel shuffle or attention heads)")
            return None
        return group

    def _fits(self, dep: Any, idxs: Any, width: int) -> bool:
        """Each of the group's channels maps to channels of its own in this dependency, within the layer's
        count (a Linear's features unsqueezed into one conv channel mapped 16 onto 1, past its end)."""
        if type(dep.target.module).__name__ == "_OutputOp":  # the model's output: nothing there is cut
            return True
        mapped = {int(i) for i in idxs}
        if len(mapped) < width:
            return False
        module = dep.target.module
        pruner = self.graph.get_pruner_of_module(module)
        if pruner is None:
            return True
        outgoing = self.graph.is_out_channel_pruning_fn(dep.handler)
        count = pruner.get_out_channels(module) if outgoing else pruner.get_in_channels(module)
        return count is None or not mapped or max(mapped) < count

    def _outputs(self, group: Any, position: dict[str, int]) -> list[str]:
        names = [self._names[d.target.module] for d, _ in group
                 if isinstance(d.target.module, _PRUNABLE_ROOTS) and d.target.module in self._names
                 and self.graph.is_out_channel_pruning_fn(d.handler)]
        return sorted(dict.fromkeys(names), key=lambda n: position.get(n, len(position)))

    def _describe(self, module: nn.Module, group: Any, outputs: list[str]) -> ChannelGroup:
        width = int(self.graph.get_out_channels(module))
        root = next((self.model.get_submodule(n) for n in outputs
                     if int(self.graph.get_out_channels(self.model.get_submodule(n))) == width), module)
        name = self._names[root]
        self._roots[name] = (root, self.graph.get_pruner_of_module(root).prune_out_channels)
        members = tuple(dict.fromkeys(self._names[d.target.module] for d, _ in group if d.target.module in self._names))
        return ChannelGroup(name, type(root).__name__, width, members, tuple(outputs), _divisor(group))

    def _excluded(self, group: ChannelGroup, excluded: set[str]) -> bool:
        """Excluding a layer keeps its filters (and a BatchNorm its channels): such groups are left alone."""
        hits = excluded & set(group.members)
        return any(n in group.outputs or not isinstance(self.model.get_submodule(n), _PRUNABLE_ROOTS) for n in hits)

    def group(self, name: str) -> ChannelGroup:
        for group in self.groups:
            if group.name == name:
                return group
        raise PruningError(f"layer {name!r} is not a prunable channel group of this model")

    def width(self, name: str) -> int:
        root, _ = self._root(name)
        return int(self.graph.get_out_channels(root))

    def _root(self, name: str) -> tuple[nn.Module, Callable[..., Any]]:
        if name not in self._roots:
            why = f" ({self.locked[name]})" if name in self.locked else ""
            raise PruningError(f"layer {name!r} is not a prunable channel group of this model{why}")
        return self._roots[name]

    def widths(self) -> dict[str, int]:
        """Current width of every group, in forward order."""
        return {g.name: self.width(g.name) for g in self.all_groups}

    def _tp_group(self, name: str, idxs: Sequence[int]) -> Any:
        root, handler = self._root(name)
        with _patched_torch_pruning(self.graph, refresh=self._stale):
            self._stale = False
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
            raise PruningError(f"criterion {criterion!r} cannot score layer {name!r} (e.g. bn_scale on a layer "
                               "without BatchNorm); choose l1 or l2")
        return scores.detach().float().cpu()

    def choose(self, name: str, scores: torch.Tensor, count: int) -> list[int]:
        """The `count` lowest-scoring channels, as whole positions of the group's blocks.

        For a group without grouped convolutions this is `lowest(scores, count)`; otherwise `count` is
        rounded down to a multiple of the divisor and the same positions go in every block.
        """
        divisor = self._divisor(name)
        if divisor == 1:
            return lowest(scores, count)
        block = scores.numel() // divisor
        positions = lowest(scores.reshape(divisor, block).mean(dim=0), count // divisor)
        return sorted(p + b * block for b in range(divisor) for p in positions)

    def _divisor(self, name: str) -> int:
        return next((g.divisor for g in self.all_groups if g.name == name), 1)

    def zero_channels(self, plan: dict[str, Sequence[int]]) -> Callable[[], None]:
        """Make the planned channels carry exact zeros without removing them; returns an undo.

        Zeroes the filters (and bias) of every layer that would lose those outputs and the scale and
        shift of every BatchNorm in the group, so the masked model computes what the pruned one does.
        Cheap enough to evaluate many candidate plans (sensitivity analysis) without surgery.
        """
        saved: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for name, idxs in plan.items():
                if len(idxs) == 0:
                    continue
                for dep, mapped in self._tp_group(name, sorted({int(i) for i in idxs})):
                    for tensor, dim in self._zeroable(dep):
                        index = torch.as_tensor(list(mapped), dtype=torch.long, device=tensor.device)
                        saved.append((tensor, dim, index, tensor.index_select(dim, index).clone()))
                        tensor.index_fill_(dim, index, 0.0)

        def undo() -> None:
            with torch.no_grad():
                for tensor, dim, index, values in reversed(saved):
                    tensor.index_copy_(dim, index, values)

        return undo

    def _zeroable(self, dep: Any) -> list[tuple[torch.Tensor, int]]:
        module = dep.target.module
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return [(t, 0) for t in (module.weight, module.bias) if t is not None]
        if isinstance(module, _PRUNABLE_ROOTS) and self.graph.is_out_channel_pruning_fn(dep.handler):
            dim = 1 if getattr(module, "transposed", False) else 0
            return [(module.weight, dim)] + ([(module.bias, 0)] if module.bias is not None else [])
        return []

    # -- surgery -------------------------------------------------------------------------

    def prune(self, plan: dict[str, Sequence[int]]) -> None:
        """Remove the given channel indices of each named group, in place; a frozen parameter stays frozen
        (Torch-Pruning makes new Parameters, which would otherwise be trained by the next fine-tune)."""
        frozen = {key for key, parameter in self.model.named_parameters() if not parameter.requires_grad}
        try:
            self._prune(plan)
        finally:
            for key, parameter in self.model.named_parameters():
                if key in frozen:
                    parameter.requires_grad_(False)

    def _prune(self, plan: dict[str, Sequence[int]]) -> None:
        for name, idxs in plan.items():
            idxs = sorted({int(i) for i in idxs})
            if not idxs:
                continue
            width = self.width(name)
            if idxs[0] < 0 or idxs[-1] >= width:
                raise PruningError(f"channel indices for layer {name!r} must be in 0..{width - 1}")
            if len(idxs) >= width:
                raise PruningError(f"pruning {len(idxs)} of {width} channels would empty layer {name!r}; "
                                   "keep at least one")
            self._check_blocks(name, idxs, width)
            self._tp_group(name, idxs).prune()
            self._stale = True
        self.all_groups = [replace(g, width=self.width(g.name)) for g in self.all_groups]
        self.groups = [replace(g, width=self.width(g.name)) for g in self.groups]

    def snapshot(self) -> Callable[[], None]:
        """Save what in-place pruning changes; the returned function restores it (model and graph alike).

        Lets one working copy be pruned and restored many times (sensitivity analysis) without copying
        a tensor or re-tracing: pruning replaces parameters and buffers instead of writing into them, so
        shallow copies of the module tables, of the graph's maps and of each node's module suffice.
        """
        dg = self.graph
        modules = {id(m): m for m in self.model.modules()}
        modules.update({id(m): m for m in dg.module2node if isinstance(m, nn.Module)})
        saved_modules = [(m, _module_state(vars(m))) for m in modules.values()]
        saved_objects = [(obj, _shallow(vars(obj))) for obj in (dg, self)]
        saved_nodes = [(node, node.module) for node in dg.module2node.values()]

        def restore() -> None:
            for module, state in saved_modules:
                module.__dict__.clear()
                module.__dict__.update(_module_state(state))
            for obj, state in saved_objects:
                obj.__dict__.clear()
                obj.__dict__.update(_shallow(state))
            for node, module in saved_nodes:
                node.module = module

        return restore

    def _check_blocks(self, name: str, idxs: list[int], width: int) -> None:
        divisor = self._divisor(name)
        if divisor == 1:
            return
        block = width // divisor
        per_block = [{i - b * block for i in idxs if b * block <= i < (b + 1) * block} for b in range(divisor)]
        if any(part != per_block[0] for part in per_block) or len(per_block[0]) == block:
            raise PruningError(f"layer {name!r} feeds a grouped convolution: remove the same positions in each of its "
                               f"{divisor} blocks of {block} channels (ChannelGraph.choose does this)")


# Modules whose channel coupling torch-pruning cannot trace: Swin's shifted-window attention rolls and
# re-windows its channels, and tracing it grew past 12 GB before failing.
_UNTRACEABLE = ("ShiftedWindowAttention", "ShiftedWindowAttentionV2")


def _refuse_untraceable(model: nn.Module) -> None:
    found = sorted({type(m).__name__ for m in model.modules() if type(m).__name__ in _UNTRACEABLE})
    if found:
        raise PruningError(f"channel pruning cannot trace {', '.join(found)} (window attention re-shapes its "
                           "channels); compress this model with `quantize`, or `double-prune --slimming-ratio 0` "
                           "(magnitude pruning only)")


def model_fingerprint(arch: str, graph: ChannelGraph) -> str:
    """Identifies a model's prunable structure, so an analysis is never applied to another model."""
    text = json.dumps([arch, [[g.name, g.width] for g in graph.all_groups]])
    return hashlib.sha256(text.encode()).hexdigest()


def channels_to_keep(width: int, ratio: float, *, min_channels: int = 1, min_fraction: float = 0.0,
                     max_ratio: float = 1.0) -> int:
    """How many channels survive a ratio, honouring the per-layer floor and cap."""
    floor = max(min_channels, math.ceil(min_fraction * width))
    removed = min(round(ratio * width), math.floor(max_ratio * width))
    return max(min(width, floor), width - removed)


def lowest(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the `count` lowest scores (ties broken by index, so results are deterministic)."""
    if count <= 0:
        return []
    order = sorted(range(scores.numel()), key=lambda i: (float(scores[i]), i))
    return order[:count]


def output_layers(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
    """The last conv/linear to run produces the logits; its outputs are never pruned."""
    return execution_order(model, input_shape)[-1:]


def execution_order(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
    """Conv/linear layer names in the order a forward pass first runs them."""
    executed: dict[str, None] = {}
    hooks = [(m, lambda mod, _i, _o, name=n: executed.setdefault(name))
             for n, m in model.named_modules() if isinstance(m, _PRUNABLE_ROOTS)]
    hooked_forward(model, input_shape, hooks)
    return list(executed)


def _shallow(state: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.copy() if isinstance(v, (dict, list, set)) else v) for k, v in state.items()}


def _module_state(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of a module's __dict__ whose parameter/buffer/submodule tables are copies too."""
    copied = dict(state)
    for key in ("_parameters", "_buffers", "_modules"):
        if key in copied:
            copied[key] = type(copied[key])(copied[key])
    return copied


def _divisor(group: Any) -> int:
    """Grouped (not depthwise) convolutions need equal-size channel blocks: lcm of their group counts."""
    divisor = 1
    for dep, _ in group:
        module = dep.target.module
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and not _depthwise(module):
            divisor = math.lcm(divisor, module.groups)
    return divisor


def _depthwise(conv: nn.Module) -> bool:
    return conv.groups == conv.in_channels == conv.out_channels


def _op_name(node: Any) -> str:
    grad_fn = getattr(node, "grad_fn", None)
    return grad_fn.name() if grad_fn is not None and hasattr(grad_fn, "name") else type(node.module).__name__


def _mixes_channels(node: Any, features_last: bool = False) -> bool:
    """A transpose/permute involving the channel dim, a view that folds a 2-D tensor's rows into its
    features, or a view of a tensor that is neither 2-D nor 4-D unless (`features_last`: channels a
    Linear made) it only merges the dims before the features."""
    grad_fn = getattr(node, "grad_fn", None)
    if grad_fn is None or not hasattr(grad_fn, "name"):
        return False
    kind = grad_fn.name()
    if kind.startswith("TransposeBackward"):
        dims = {getattr(grad_fn, "_saved_dim0", 1), getattr(grad_fn, "_saved_dim1", 1)}
        return any(d < 2 for d in dims)
    if kind.startswith("PermuteBackward"):
        dims = tuple(getattr(grad_fn, "_saved_dims", (0, 2)))
        return len(dims) < 2 or dims[1] != 1
    if kind.startswith(("ViewBackward", "ReshapeAliasBackward", "UnsafeViewBackward")):
        size = getattr(grad_fn, "_saved_self_sym_sizes", None) or getattr(grad_fn, "_saved_self_sizes", None)
        if size is None or len(size) == 4:
            return False
        out = _output_shape(grad_fn)
        if len(size) == 2:  # features must stay whole: (rows, features) folded otherwise mixes rows into them
            return out is not None and not _keeps_features(tuple(size), out)
        return not (features_last and out is not None and _merges_leading_dims(tuple(size), out))
    return False


def _keeps_features(size: tuple[int, ...], out: tuple[int, ...]) -> bool:
    """A 2-D (rows, features) view that keeps each feature a channel: rows split or merged, into tokens or
    a channels-last map (ConvNeXt), or (rows, features, 1, 1) for a conv. Features spread over a map
    ((B, C x H x W) -> (B, C, H, W)) are left to no group."""
    if out[-1] == size[-1]:  # rows split into (batch, tokens) or (batch, H, W): channels-last features
        return True
    return len(out) == 4 and out[1] == size[-1] and out[2] * out[3] == 1


def _output_shape(grad_fn: Any) -> tuple[int, ...] | None:
    metadata = getattr(grad_fn, "_input_metadata", None)  # a backward node's inputs are its op's outputs
    return tuple(metadata[0].shape) if metadata else None


def _merges_leading_dims(size: tuple[int, ...], out: tuple[int, ...]) -> bool:
    """(batch, tokens, features) viewed as (batch x tokens, features), as a Linear on token sequences
    does (a transformer's MLP): the last dim, where a Linear's features are, is untouched."""
    return len(size) >= 2 and len(out) == 2 and out[-1] == size[-1] and out[0] == math.prod(size[:-1])


_TP_PATCHED = ("update_reshape_index_mapping", "update_index_mapping")
"""The private Torch-Pruning functions (in `torch_pruning.dependency.index_mapping`) replaced while it runs."""


def _require_patchable() -> None:
    missing = [name for name in _TP_PATCHED if not callable(getattr(_index_mapping, name, None))]
    if missing:
        raise PruningError(f"torch-pruning {getattr(tp, '__version__', '?')} has no "
                           f"torch_pruning.dependency.index_mapping.{missing[0]}, which dnnprune relies on; "
                           "install the tested version: pip install 'torch-pruning>=1.6,<1.7'")


@contextmanager
def _patched_torch_pruning(graph: Any = None, *, refresh: bool = False) -> Iterator[None]:
    """Torch-Pruning with channel-reordering reshapes left unmapped and, given a built `graph`, its index
    mappings frozen (recomputed first when `refresh`: something was pruned since). See the module docstring."""
    _require_patchable()
    reshape, update = _index_mapping.update_reshape_index_mapping, _index_mapping.update_index_mapping

    def guarded_reshape(dependency_graph: Any, node: Any) -> None:
        if any(_mixes_channels(n) for n in (node, *node.inputs, *node.outputs)):
            return
        try:
            reshape(dependency_graph, node)
        except ZeroDivisionError:  # a reshape whose channel counts Torch-Pruning infers as 0: leave it unmapped
            pass

    _index_mapping.update_reshape_index_mapping = guarded_reshape
    try:
        if graph is not None:
            if refresh:
                update(graph)
            _index_mapping.update_index_mapping = lambda _graph: None
        yield
    finally:
        _index_mapping.update_reshape_index_mapping = reshape
        _index_mapping.update_index_mapping = update


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
                         device: torch.device | str = "cpu", *, task: Task | None = None) -> int:
    """Fill `.grad` with the gradient of the task's loss over a few batches, for the Taylor criterion.

    `task` defaults to the one stored with the model, so an autoencoder is scored by its reconstruction
    loss rather than by a cross-entropy that means nothing for it.
    """
    task = task or make_task(getattr(getattr(model, "dnnprune_meta", None), "task", None))
    model.zero_grad(set_to_none=True)
    model.train()
    count = 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        task.loss(model(inputs), inputs, targets).backward()
        count += 1
    model.eval()
    if count == 0:
        raise PruningError("the Taylor criterion needs at least one training batch")
    return count
