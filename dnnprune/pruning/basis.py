"""`--target-basis original`: a size target counted from the model the lineage started with.

Chained steps (remove blocks, then channels) each see only their own input, so a user who wants
3.78x fewer MACs than the original had to divide by what the earlier steps removed. The checkpoint's
lineage already records, for every prune, the size after it and the reduction it made, so the
original's size is the first such entry's size times its reduction; the target handed to the job is
then the factor still to go from the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch.nn as nn

from dnnprune.checkpoint import meta_of
from dnnprune.errors import PruningError
from dnnprune.metrics import count_macs, count_parameters
from dnnprune.recipe import PruneSection

LARGEST = 1e18
"""No real network has this many parameters or MACs; a crafted lineage claiming more is refused."""
COUNTED = ("params", "macs")
"""What the lineage records with its reduction; bytes and latency are not recorded, so not rebased."""


@dataclass(frozen=True)
class Basis:
    """What the original was, what the input is, and the factor asked of the original."""

    metric: str
    original: int
    input: int
    factor: float

    @property
    def already(self) -> float:
        return self.original / self.input

    def block(self, reached_from_input: float) -> dict[str, Any]:
        """The report's view: the target and what was reached, both counted from the original."""
        reached = reached_from_input * self.already
        return {"basis": "original", "original": self.original, "input": self.input, "factor_of_original": self.factor,
                "input_reduction_of_original": self.already, "reached_of_original": reached,
                "met_of_original": reached >= self.factor}


def original_size(lineage: Sequence[Any], metric: str) -> int | None:
    """The size before the first step that changed it, from that step's recorded size and reduction."""
    for entry in lineage:
        metrics = entry.metrics if hasattr(entry, "metrics") else {}
        if metric not in metrics:
            continue
        size, reduction = metrics.get(metric), metrics.get(f"{metric}_reduction")
        if not _positive_number(size) or not _positive_number(reduction) or not size * reduction < LARGEST:
            raise PruningError(f"the checkpoint's lineage records a {entry.command!r} step without a usable {metric} "
                               f"reduction, so the original's {metric} are unknown; use --target-basis input")
        return round(size * reduction)
    return None


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")


def rebase(model: nn.Module, section: PruneSection) -> tuple[PruneSection, Basis | None]:
    """The section with its target factor counted from the input; the basis, where it was the original."""
    if section.target_basis == "input" or section.target is None or section.target_factor is None:
        return section, None
    if section.target not in COUNTED:
        raise PruningError(f"--target-basis original counts {' or '.join(COUNTED)} from the lineage, not "
                           f"{section.target}; use --target-basis input")
    meta = meta_of(model)
    now = count_parameters(model) if section.target == "params" else sum(count_macs(model, tuple(meta.input_shape)).values())
    original = original_size(meta.lineage, section.target) or now
    basis = Basis(section.target, original, now, section.target_factor)
    factor = section.target_factor / basis.already
    if factor <= 1.0:
        raise PruningError(f"this checkpoint already has {basis.already:.2f}x fewer {section.target} than the original, "
                           f"so a {section.target_factor:g}x target leaves nothing to prune; raise the factor or use "
                           "--target-basis input")
    return section.model_copy(update={"target_factor": factor}), basis
