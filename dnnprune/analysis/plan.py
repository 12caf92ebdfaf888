"""The cells of a filter analysis: which channels each (layer, ratio) pair removes, fixed before any data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dnnprune.errors import PruningError, RecipeError
from dnnprune.recipe import AnalyzeSection
from dnnprune.surgery import ChannelGraph, channels_to_keep

CRITERIA = ("l1", "l2", "bn_scale", "random")
"""Criteria that need no gradients: a cell's channels are chosen on the unpruned model's weights alone."""


@dataclass(frozen=True)
class Cell:
    layer: str
    ratio: float
    removed: int


@dataclass
class Plan:
    """What will be measured; built (and validated) before any data is touched."""

    graph: ChannelGraph
    layers: list[str]
    cells: list[Cell]
    widths: dict[str, int]
    indices: dict[tuple[str, float], list[int]]
    """The channels each cell removes: `ChannelGraph.choose` on scores of the unpruned model, as `prune` does."""


def plan_analysis(model: nn.Module, section: AnalyzeSection, input_shape: Sequence[int]) -> Plan:
    """Check the request against the model and fix the channels each cell removes."""
    if section.criterion not in CRITERIA:
        raise RecipeError(f"analyze.criterion: {section.criterion!r} is not available for sensitivity analysis; "
                          f"choose one of {', '.join(CRITERIA)}")
    graph = ChannelGraph(model, input_shape, exclude=section.exclude, include=section.layers)
    if not graph.all_groups:
        locked = f" ({len(graph.locked)} locked: {next(iter(graph.locked.values()))})" if graph.locked else ""
        raise PruningError(f"the model ({type(model).__name__}) has no prunable layer{locked}: no conv/linear layer "
                           "has output channels that can be removed (the output layer never is); nothing to analyze")
    if not graph.groups:
        raise RecipeError("analyze.layers/exclude leave no layer to analyze; loosen the patterns")
    layers = [g.name for g in graph.groups]
    widths = {g.name: g.width for g in graph.groups}
    cells, indices = [], {}
    for name in layers:
        scores = _scores(graph, name, section)
        for ratio in section.ratios:
            idxs = graph.choose(name, scores, widths[name] - channels_to_keep(widths[name], ratio))
            indices[(name, ratio)] = idxs
            cells.append(Cell(name, ratio, len(idxs)))
    return Plan(graph, layers, cells, widths, indices)


def _scores(graph: ChannelGraph, name: str, section: AnalyzeSection) -> torch.Tensor:
    try:
        return graph.importance(name, section.criterion, seed=section.seed)
    except PruningError as exc:
        raise PruningError(f"{exc}; or leave the layer out with analyze.exclude: [{name!r}]") from None
