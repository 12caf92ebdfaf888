"""What every analysis engine shares: the evaluation batches, how one cell is evaluated, what it returns.

An engine (one per granularity: `engine.FilterAnalysis` for channels; a depth engine can join it) is
built from the model and the recipe section, which it validates without touching data, and then
measured on the batches. Whatever it removes, it reports *layers* (the removable units) each with
*cells* (one measurement per ratio), so every granularity yields the same report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset

from dnnprune.data import make_loader
from dnnprune.errors import DatasetError
from dnnprune.observe import Observer
from dnnprune.tasks import Metrics, Task

Batches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class MeasuredCell:
    ratio: float
    removed: int
    metrics: Metrics
    params: int
    macs: int


@dataclass
class MeasuredLayer:
    """One removable unit (a channel group, or a layer for depth pruning) and its cells, in ratio order."""

    name: str
    type: str
    width: int
    params: int
    macs: int
    members: list[str]
    cells: list[MeasuredCell]


@dataclass
class Measurement:
    baseline: Metrics
    layers: list[MeasuredLayer]
    fingerprint: str
    """`surgery.model_fingerprint`: `prune --analysis` refuses a report made for another structure."""
    groups: list[tuple[str, int]]
    """Every prunable unit of the model with its width (not only the analysed ones)."""
    params: int
    macs: int
    evaluations: int
    engine: dict[str, Any] = field(default_factory=dict)
    """Engine-specific counters for the report's timing (routes taken, Winograd calls, ...)."""


class Analysis(Protocol):
    """One granularity's engine, already validated against the model and the section."""

    def measure(self, batches: Batches, task: Task, observer: Observer, *, rank: int, world: int) -> Measurement:
        """Measure this process's share of the cells; every process returns the complete measurement."""


def load_batches(dataset: Dataset, batch_size: int, device: torch.device, channels_last: bool) -> Batches:
    """The evaluation data, loaded once for all cells (the batches `training.evaluate` would see)."""
    out = []
    for inputs, targets in make_loader(dataset, batch_size):
        inputs = inputs.to(device)
        if channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        out.append((inputs, targets.to(device)))
    if not out:
        raise DatasetError("the evaluation split is empty; check the dataset and --samples")
    return out


def evaluate_batches(task: Task, forward: Callable[[torch.Tensor], torch.Tensor], batches: Batches,
                     inputs: Callable[[int], torch.Tensor] | None = None) -> Metrics:
    """The task's metrics, accumulated batch by batch exactly as `training.evaluate` does.

    Batch i is fed `inputs(i)` when given (an activation cached part-way through the model), else its
    samples; the task always sees the samples themselves (a reconstruction is compared to them).
    """
    tally = task.tally()
    with torch.inference_mode():
        for i, (x, y) in enumerate(batches):
            tally.add(forward(x if inputs is None else inputs(i)), x, y)
    return tally.result()
