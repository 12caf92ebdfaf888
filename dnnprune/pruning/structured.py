"""How many channels each layer loses: uniform, per-pattern, global threshold, or solved for a target.

A plan maps a channel-group name to the number of channels to remove; which channels go is decided
by the criterion's scores (`ChannelGraph.choose`). Every plan honours the per-layer floor and cap, so
no layer is ever emptied.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Collection, Literal, Sequence

import torch
import torch.nn as nn

from dnnprune.checkpoint import META_ATTRIBUTE
from dnnprune.codecs.state import encoded_nbytes
from dnnprune.errors import PruningError
from dnnprune.latency import LayerTable, input_spatial_sizes, is_depthwise
from dnnprune.metrics import count_macs, count_parameters
from dnnprune.patterns import select_layers
from dnnprune.recipe import PruneSection
from dnnprune.surgery import ChannelGraph, channels_to_keep

Plan = dict[str, int]
Metric = Literal["params", "macs", "bytes", "latency"]
METRICS: tuple[Metric, ...] = ("params", "macs", "bytes", "latency")


@dataclass(frozen=True)
class Limits:
    """The per-layer floor (min_channels, min_fraction) and cap (max_ratio) every plan obeys."""

    min_channels: int = 1
    min_fraction: float = 0.0
    max_ratio: float = 0.95
    round_to: int = 1

    @classmethod
    def of(cls, config: PruneSection) -> Limits:
        return cls(config.min_channels, config.min_fraction, config.max_ratio, config.round_to)

    def keep(self, width: int, ratio: float) -> int:
        """Channels left; rounded up to a multiple of `round_to` (odd widths make CPU kernels slow)."""
        keep = channels_to_keep(width, ratio, min_channels=self.min_channels, min_fraction=self.min_fraction,
                                max_ratio=self.max_ratio)
        if self.round_to > 1 and keep < width:
            keep = min(width, math.ceil(keep / self.round_to) * self.round_to)
        return keep

    def removable(self, width: int) -> int:
        return width - self.keep(width, 1.0)


# ----------------------------------------------------------------------------- scores and plans


def score_groups(graph: ChannelGraph, criterion: str, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """One score per channel for every prunable group (low = removed first)."""
    return {g.name: graph.importance(g.name, criterion, seed=seed) for g in graph.groups}


def ratio_plan(graph: ChannelGraph, ratios: dict[str, float], limits: Limits) -> Plan:
    """Remove `ratio` of each named group's channels (of its current width)."""
    widths = {g.name: g.width for g in graph.groups}
    return {name: widths[name] - limits.keep(widths[name], ratio) for name, ratio in ratios.items()}


def uniform_ratios(graph: ChannelGraph, ratio: float, fixed: dict[str, float] | None = None) -> dict[str, float]:
    """The same ratio everywhere, except the layers a pattern fixed."""
    fixed = fixed or {}
    return {g.name: fixed.get(g.name, ratio) for g in graph.groups}


def pattern_ratios(model: nn.Module, graph: ChannelGraph, patterns: dict[str, float]) -> dict[str, float]:
    """Resolve `pattern -> ratio` to group names; the last matching pattern wins.

    A pattern selects a group when it matches one of the layers whose filters the group removes.
    """
    resolved: dict[str, float] = {}
    for pattern, ratio in patterns.items():
        matched = set(select_layers(model, [pattern], what="ratio pattern"))
        hits = [g.name for g in graph.groups if matched & set(g.outputs)]
        if not hits:
            shown = ", ".join(g.name for g in graph.groups[:6]) + (", ..." if len(graph.groups) > 6 else "")
            raise PruningError(f"ratio pattern {pattern!r} matches no prunable layer (excluded, locked or an output "
                               f"layer); prunable layers: {shown}")
        resolved.update(dict.fromkeys(hits, ratio))
    return resolved


class GlobalRanking:
    """All channels of the scored groups ranked together, so one threshold can cut across layers; each
    group still keeps its floor. Scores are normalised per group (by their mean) unless they are
    already comparable across layers (network slimming's |gamma|)."""

    def __init__(self, graph: ChannelGraph, scores: dict[str, torch.Tensor], limits: Limits, *,
                 normalize: bool = True) -> None:
        self.widths = {g.name: g.width for g in graph.groups if g.name in scores}
        self.caps = {name: limits.removable(width) for name, width in self.widths.items()}
        self.limits = limits
        entries = []
        for name, values in scores.items():
            ranked = values / values.abs().mean().clamp_min(1e-12) if normalize else values
            width = max(1, values.numel())
            entries.extend((float(v), i / width, name, i) for i, v in enumerate(ranked))
        # Equal scores (an untrained net's gammas are all 1) are taken in turn from every group, not one
        # group after the other.
        self.entries = sorted(entries)

    def plan(self, fraction: float, fixed: Plan | None = None) -> Plan:
        """Remove the `fraction` of all channels with the lowest normalised scores."""
        fixed = fixed or {}
        budget = round(fraction * sum(self.widths.values())) - sum(fixed.values())
        counts = {name: fixed.get(name, 0) for name in self.widths}
        for _, _, name, _ in self.entries:
            if budget <= 0:
                break
            if name not in fixed and counts[name] < self.caps[name]:
                counts[name] += 1
                budget -= 1
        return {name: self._rounded(name, count) if name not in fixed else count for name, count in counts.items()}

    def _rounded(self, name: str, count: int) -> int:
        width = self.widths[name]
        return width - self.limits.keep(width, count / width) if count else 0


# ----------------------------------------------------------------------------- applying and measuring


def apply_plan(graph: ChannelGraph, scores: dict[str, torch.Tensor], plan: Plan) -> dict[str, list[int]]:
    """Remove the lowest-scoring channels the plan asks for, in place; returns the removed indices."""
    removed = {name: graph.choose(name, scores[name], count) for name, count in plan.items() if count > 0}
    graph.prune(removed)
    return removed


def model_size(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """Parameters, MACs (batch 1) and tensor bytes as the checkpoint stores them (parameters and buffers)."""
    return {"params": count_parameters(model), "macs": sum(count_macs(model, tuple(input_shape)).values()),
            "bytes": stored_bytes(model)}


def dense_bytes(model: nn.Module) -> int:
    """The tensors' bytes held dense, as in memory (float32 weights, zeros included)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())


def stored_bytes(model: nn.Module) -> int:
    """The tensors' bytes in the checkpoint: an encoded (sparse or quantized) weight counts its stored parts,
    so a bytes target on a sparse model is what its file loses, not what a dense copy would."""
    meta = getattr(model, META_ATTRIBUTE, None)
    encodings = getattr(meta, "encodings", None) or {}
    total = 0
    for name, tensor in model.state_dict().items():
        if name in encodings:
            total += encoded_nbytes(tensor.detach().cpu(), encodings[name])
        else:
            total += tensor.numel() * tensor.element_size()
    return total


def pruned_size(model: nn.Module, input_shape: Sequence[int], scores: dict[str, torch.Tensor], plan: Plan,
                exclude: Sequence[str] = ()) -> dict[str, int]:
    """The size a plan gives, measured on a really pruned copy (the original is untouched)."""
    clone = copy.deepcopy(model)
    apply_plan(ChannelGraph(clone, input_shape, exclude=exclude), scores, plan)
    return model_size(clone, input_shape)


# ----------------------------------------------------------------------------- targets


@dataclass
class TargetSolution:
    plan: Plan
    knob: float
    factor: float
    size: dict[str, int]
    given_back: int = 0
    """Channels restored after the knob's plan (`give_back`): the widths then differ from the knob's."""


def measured_once(measure: Callable[[Plan], dict[str, int]]) -> Callable[[Plan], dict[str, int]]:
    """`measure` (a surgery on a copy) run once per distinct plan: bisection and give-back revisit plans."""
    cache: dict[tuple[tuple[str, int], ...], dict[str, int]] = {}

    def cached(plan: Plan) -> dict[str, int]:
        key = tuple(sorted(plan.items()))
        if key not in cache:
            cache[key] = measure(plan)
        return cache[key]
    return cached


def solve_target(measure: Callable[[Plan], dict[str, int]], plan_at: Callable[[float], Plan], metric: Metric,
                 factor: float, base: dict[str, int], *, tolerance: float = 1e-3) -> TargetSolution:
    """Smallest knob in [0, 1] (a ratio or a global fraction) whose plan is `factor` times smaller.

    Size falls monotonically with the knob, so bisection on real measurements finds it. Raises when
    even the knob at 1 (every layer at its cap) falls short, naming the best reachable factor. Pass a
    `measured_once` measure: the bisection revisits plans (nearby knobs round to the same widths).
    """
    def reduction(plan: Plan) -> tuple[float, dict[str, int]]:
        size = measure(plan)
        return base[metric] / max(1, size[metric]), size

    best, size = reduction(plan_at(1.0))
    if best < factor:
        raise PruningError(f"cannot make the model {factor:g}x smaller in {metric} without emptying layers: the most "
                           f"the limits allow (max_ratio, min_channels, min_fraction, excluded layers) is {best:.2f}x")
    low, high = 0.0, 1.0
    while high - low > tolerance:
        middle = (low + high) / 2
        if reduction(plan_at(middle))[0] >= factor:
            high = middle
        else:
            low = middle
    reached, size = reduction(plan_at(high))
    return TargetSolution(plan_at(high), high, reached, size)


def give_back(solution: TargetSolution, measure: Callable[[Plan], dict[str, int]], metric: Metric, factor: float,
              base: dict[str, int], scores: dict[str, torch.Tensor], round_to: int, *, held: Collection[str] = (),
              slack: float = 1.01) -> TargetSolution:
    """Give channels back, `round_to` at a time, while the target still holds: the knob's plan passes it
    by up to a whole width step in every layer at once (resnet20 asked for 1.5x fewer MACs in multiples
    of 8 got 2.54x). Each step restores the group whose best removed channels score highest per unit of
    size added; `held` groups (pinned ratios) keep their cuts. A group's value is priced once and again
    only after it took a step (a real measurement per trial on a 50-group network would take minutes)."""
    plan, size = dict(solution.plan), solution.size
    ranked = {name: torch.sort(values / values.abs().mean().clamp_min(1e-12)).values for name, values in scores.items()}

    def priced(name: str) -> tuple[float, Plan, dict[str, int]] | None:
        cut = plan[name]
        if cut == 0 or name in held or name not in ranked:
            return None
        trial = {**plan, name: cut - min(cut, max(1, round_to))}
        trial_size = measure(trial)
        restored = float(ranked[name][trial[name]:cut].sum())
        return restored / max(trial_size[metric] - size[metric], 1), trial, trial_size

    def passed_by_far() -> bool:
        return base[metric] / max(1, size[metric]) > slack * factor

    values = {name: offer for name in plan if (offer := priced(name)) is not None} if passed_by_far() else {}
    while values and passed_by_far():
        name = max(values, key=lambda key: values[key][0])
        trial = {**plan, name: values[name][1][name]}
        trial_size = measure(trial)
        if base[metric] / max(1, trial_size[metric]) < factor:
            del values[name]
            continue
        plan, size = trial, trial_size
        offer = priced(name)
        if offer is None:
            del values[name]
        else:
            values[name] = offer
    given = sum(solution.plan.values()) - sum(plan.values())
    return TargetSolution(plan, solution.knob, base[metric] / max(1, size[metric]), size, given_back=given)


def parse_target(text: str) -> tuple[Metric, float]:
    """`macs:3` -> ("macs", 3.0): three times fewer MACs."""
    metric, _, number = text.partition(":")
    if metric not in METRICS or not number:
        raise PruningError(f"--target takes METRIC:FACTOR with METRIC one of {', '.join(METRICS)}, e.g. macs:3; got {text!r}")
    try:
        value = float(number)
    except ValueError:
        raise PruningError(f"--target factor must be a number, e.g. macs:3; got {text!r}") from None
    if not math.isfinite(value) or value <= 1.0:
        raise PruningError(f"--target factor must be greater than 1 (3 means 3x fewer); got {value:g}")
    return metric, value  # type: ignore[return-value]


# ----------------------------------------------------------------------------- latency-aware widths


def latency_widths(model: nn.Module, graph: ChannelGraph, plan: Plan, table: LayerTable, input_shape: Sequence[int],
                   limits: Limits, *, search: int, may_grow: bool = False) -> Plan:
    """Each planned group's fastest width within `search` channels of the plan, from measured layer times.

    A width is timed as the sum of the group's layers at that width: the layers that produce its
    channels (out = width) and those that consume them (in = width; a Linear after a flatten scales).
    With `may_grow` False a group never keeps more channels than planned, so a size target still holds.
    """
    spatial = input_spatial_sizes(model, input_shape)
    widths = {g.name: g.width for g in graph.groups}
    keep = {name: widths[name] - plan.get(name, 0) for name in widths}
    roles = layer_roles(model, graph)
    for group in graph.groups:
        if not plan.get(group.name) and not may_grow:
            continue
        floor = limits.keep(group.width, 1.0)
        planned = keep[group.name]
        reach = min(search, math.ceil(_REACH * group.width))
        candidates = range(max(floor, planned - reach), min(group.width, planned + (reach if may_grow else 0)) + 1)
        costs = {c: group_cost(model, group.name, c, keep, roles, spatial, table.layer_ms) for c in candidates}
        fastest = min(costs.values())
        if costs.get(planned, float("inf")) > fastest * (1 + _WORTH_IT):  # timing noise never moves a width
            keep[group.name] = max(c for c, ms in costs.items() if ms <= fastest * (1 + _WORTH_IT))
    table.save()
    return {name: widths[name] - keep[name] for name in widths if widths[name] - keep[name] > 0 or name in plan}


_REACH = 0.125
"""A width moves by at most this fraction of the layer (and at most `search` channels)."""
_WORTH_IT = 0.05
"""A width moves only to one measured at least this much faster (relative), and then to the widest such."""


LayerCost = Callable[[nn.Module, int, int, tuple[int, ...]], float]
"""(layer, in channels, out channels, input spatial size) -> its cost (measured ms, or MACs)."""


@dataclass(frozen=True)
class LayerRoles:
    """Per group, its conv/linear layers as (layer, "out" | "in", group width when built); and per layer, the
    group whose channels it produces (`owner`) or reads (`feeder`)."""

    rows: dict[str, list[tuple[str, str, int]]]
    owner: dict[str, str]
    feeder: dict[str, str]

    def __contains__(self, group: object) -> bool:
        return group in self.rows

    def width_of(self, group: str) -> int:
        return next((w for _, _, w in self.rows.get(group, [])), 1)


def layer_roles(model: nn.Module, graph: ChannelGraph) -> LayerRoles:
    """The roles of every group's conv/linear layers (built once: costs look them up per candidate width)."""
    rows: dict[str, list[tuple[str, str, int]]] = {}
    for group in graph.groups:
        for name in group.members:
            module = model.get_submodule(name)
            if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                continue
            rows.setdefault(group.name, []).append((name, "out" if name in group.outputs else "in", group.width))
    owner = {layer: g for g, entries in rows.items() for layer, role, _ in entries if role == "out"}
    feeder = {layer: g for g, entries in rows.items() for layer, role, _ in entries if role == "in"}
    return LayerRoles(rows, owner, feeder)


def group_cost(model: nn.Module, group: str, width: int, keep: dict[str, int], roles: LayerRoles,
               spatial: dict[str, tuple[int, ...]], layer_cost: LayerCost) -> float:
    """What the layers that produce or consume `group` cost with it at `width` and every other group at `keep`
    (0 for a group without conv/linear layers)."""
    total = 0.0
    for layer, role, group_width in roles.rows.get(group, []):
        module = model.get_submodule(layer)
        current_in = module.in_features if isinstance(module, nn.Linear) else module.in_channels
        current_out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        source = roles.feeder.get(layer)
        cin = current_in if source is None else current_in // max(1, roles.width_of(source)) * keep[source]
        cout = keep[roles.owner[layer]] if layer in roles.owner else current_out
        if role == "out":
            cout = width
            if module.__class__ is not nn.Linear and getattr(module, "groups", 1) > 1 and module.groups == current_in:
                cin = width  # depthwise: its inputs are its outputs
        else:
            cin = current_in // max(1, group_width) * width
        total += layer_cost(module, cin, cout, spatial.get(layer, ()))
    return total


def layer_macs(layer: nn.Module, in_channels: int, out_channels: int, spatial: tuple[int, ...]) -> float:
    """Multiply-accumulates of one conv or linear layer per sample at these channel counts."""
    if isinstance(layer, nn.Linear):
        return float(in_channels * out_channels)
    groups = out_channels if is_depthwise(layer) else layer.groups
    outputs = 1
    for size, kernel, stride, pad, dilation in zip(spatial, layer.kernel_size, layer.stride, _padding(layer),
                                                   layer.dilation):
        outputs *= max(1, (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1)
    return float(in_channels // max(1, groups) * out_channels * math.prod(layer.kernel_size) * outputs)


def _padding(layer: nn.Module) -> tuple[int, ...]:
    if isinstance(layer.padding, str):  # "same" keeps the size; "valid" pads nothing
        return tuple(d * (k - 1) // 2 for k, d in zip(layer.kernel_size, layer.dilation)) if layer.padding == "same" \
            else (0,) * len(layer.kernel_size)
    return tuple(layer.padding)
