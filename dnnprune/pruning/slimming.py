"""Network slimming (Liu et al., ICCV 2017): BatchNorm scales as channel importance, one global threshold.

Training with an L1 penalty on every BN scale |gamma| (`training.add_bn_l1_subgradient`) drives the
scales of unneeded channels towards zero. One threshold over the |gamma| of every prunable channel
group then picks the channels to remove; coupled channels (a residual addition, a depthwise conv)
are one group, scored by the mean |gamma| of its BatchNorms. Unlike the reference implementation,
every group keeps a floor (`Limits`), so a global threshold can never empty a layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from dnnprune.errors import PruningError
from dnnprune.pruning.structured import GlobalRanking, Limits, apply_plan
from dnnprune.surgery import ChannelGraph

PLAIN_LAMBDA = 1e-4
RESIDUAL_LAMBDA = 1e-5
_RESIDUAL_NAMES = ("BasicBlock", "Bottleneck", "InvertedResidual", "MBConv", "FusedMBConv", "ResBlock")


@dataclass
class SlimmingResult:
    removed: dict[str, int]
    widths_before: dict[str, int]
    widths_after: dict[str, int]
    threshold: float | None
    """The largest |gamma| removed: every removed channel scored at most this."""
    channels: int
    removed_total: int
    skipped: list[str]
    """Prunable groups without a BatchNorm: slimming has no score for them and leaves them whole."""


def bn_groups(model: nn.Module, graph: ChannelGraph) -> list[str]:
    """The prunable groups whose channels pass through at least one BatchNorm."""
    def has_bn(members: tuple[str, ...]) -> bool:
        return any(isinstance(model.get_submodule(m), nn.modules.batchnorm._BatchNorm) for m in members)

    return [g.name for g in graph.groups if has_bn(g.members)]


def is_residual(model: nn.Module) -> bool:
    """Residual nets get the paper's smaller default lambda (1e-5)."""
    return any(type(m).__name__ in _RESIDUAL_NAMES or hasattr(m, "downsample") for m in model.modules())


def default_lambda(model: nn.Module) -> float:
    return RESIDUAL_LAMBDA if is_residual(model) else PLAIN_LAMBDA


def check_slimmable(model: nn.Module, graph: ChannelGraph) -> list[str]:
    """The BN-bearing groups; a model without any cannot be slimmed, and the fix is named."""
    names = bn_groups(model, graph)
    if not names:
        raise PruningError(f"{type(model).__name__} has no BatchNorm on a prunable channel group, so network slimming "
                           "has nothing to rank; use --slimming-ratio 0 to run parameter pruning alone")
    return names


def slim(model: nn.Module, graph: ChannelGraph, ratio: float, limits: Limits) -> SlimmingResult:
    """Remove the `ratio` fraction of BN channels with the smallest |gamma|, physically, in place."""
    names = check_slimmable(model, graph)
    widths = graph.widths()
    with torch.no_grad():
        scores = {name: graph.importance(name, "bn_scale").abs() for name in names}
    plan = GlobalRanking(graph, scores, limits, normalize=False).plan(ratio)
    removed = apply_plan(graph, scores, plan)
    removed_scores = [float(scores[name][idx]) for name, idxs in removed.items() for idx in idxs]
    return SlimmingResult(
        removed={name: len(idxs) for name, idxs in removed.items()}, widths_before=widths,
        widths_after=graph.widths(), threshold=max(removed_scores) if removed_scores else None,
        channels=sum(widths[n] for n in names), removed_total=len(removed_scores),
        skipped=[g.name for g in graph.groups if g.name not in names])
