"""The analysis report: per layer, its cells' metrics, how sensitive it is, and the order to prune in.

`prune --order sensitivity --analysis A.json` reads `model.fingerprint`, `order` and each layer's
`suggested_ratio`; users read the rest, so the keys stay stable across granularities and tasks.
Sensitivity is measured in the task's primary metric (`Task.drop`: points for top-1 or ROC-AUC, a
relative increase for MSE), so one budget means the same thing for any model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from dnnprune.analysis.measurement import MeasuredLayer, Measurement
from dnnprune.recipe import AnalyzeSection
from dnnprune.reports import Report
from dnnprune.tasks import Metrics, Task


class ModelSummary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arch: str
    fingerprint: str
    groups: list[tuple[str, int]]
    checkpoint_sha256: str | None
    params: int
    macs: int


class CellReport(BaseModel):
    """One (layer, ratio) measurement; the task's metric values (top1, top5, loss / mse, roc_auc, ...)
    sit beside these fields, so a cell reads like a row of the CSV."""

    model_config = ConfigDict(extra="allow")

    ratio: float
    removed: int
    params: int
    macs: int

    def metrics(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class LayerReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    type: str
    width: int
    params: int
    macs: int
    members: list[str]
    cells: list[CellReport]
    sensitivity: float
    """Mean drop of the primary metric over the grid (`Task.drop`: positive = worse)."""
    loss_increase: float
    suggested_ratio: float
    """Largest grid ratio whose drop stays within the budget; 0 when none does."""


class Timing(BaseModel):
    """Where the time went; the engine's fields are None where a granularity has no such thing."""

    model_config = ConfigDict(extra="forbid")

    seconds: float
    cells: int
    evaluations: int
    seconds_per_cell: float
    processes: int
    threads_per_process: int
    batch_size: int
    strategy: str | None = None
    channels_last: bool | None = None
    work_gmacs: float | None = None
    prefix_cache: bool | None = None
    fallback_layers: list[str] | None = None
    winograd: bool | None = None
    winograd_convs: int | None = None
    evaluations_by_route: dict[str, int] | None = None


class AnalyzeReport(Report):
    model: ModelSummary
    dataset: str | None
    criterion: str
    granularity: str
    ratios: list[float]
    samples: int
    split: str
    seed: int
    primary_metric: str
    higher_is_better: bool
    baseline: dict[str, Any]
    budget: float
    layers: list[LayerReport]
    order: list[str]
    """Least sensitive first: the order `prune --order sensitivity` visits the layers in."""
    timing: Timing

    def metric_names(self) -> list[str]:
        """The task's metric names, in the order the baseline lists them (the CSV's columns)."""
        return [key for key in self.baseline if key != "samples"]


def layer_report(layer: MeasuredLayer, baseline: Metrics, task: Task, budget: float) -> LayerReport:
    cells = [CellReport(ratio=c.ratio, removed=c.removed, params=c.params, macs=c.macs, **c.metrics.values)
             for c in layer.cells]
    drops = [task.drop(baseline.value, c.metrics.value) for c in layer.cells]
    losses = [_number(c.metrics.values.get("loss")) - _number(baseline.values.get("loss")) for c in layer.cells]
    return LayerReport(name=layer.name, type=layer.type, width=layer.width, params=layer.params, macs=layer.macs,
                       members=layer.members, cells=cells, sensitivity=_mean(drops), loss_increase=_mean(losses),
                       suggested_ratio=suggested_ratio([c.ratio for c in layer.cells], drops, budget)
                       if _saves(layer) else 0.0)


def _saves(layer: MeasuredLayer) -> bool:
    """A unit whose removal grows the model (a bottleneck Linear, whose bridge is wider than the two layers it
    replaces) is never suggested, however little accuracy it costs."""
    return layer.params > 0 and layer.macs >= 0


def suggested_ratio(ratios: Sequence[float], drops: Sequence[float], budget: float) -> float:
    """Largest grid ratio whose drop stays within the budget; 0 when none does (an undefined drop never does)."""
    ok = [ratio for ratio, drop in zip(ratios, drops) if drop <= budget + 1e-12]
    return max(ok) if ok else 0.0


def sensitivity_order(layers: Sequence[LayerReport]) -> list[str]:
    """Least sensitive first (the paper's out-of-order pruning); ties by loss increase, then model order.
    A layer whose sensitivity is undefined (NaN) goes last."""
    ranked = sorted(enumerate(layers), key=lambda item: (math.isnan(item[1].sensitivity), _key(item[1].sensitivity),
                                                         _key(item[1].loss_increase), item[0]))
    return [layer.name for _, layer in ranked]


def build_report(measurement: Measurement, task: Task, *, arch: str, checkpoint_sha256: str | None,
                 dataset: str | None, section: AnalyzeSection, split: str, timing: Timing) -> AnalyzeReport:
    """The typed report from an engine's measurement (whatever the granularity)."""
    baseline = measurement.baseline
    layers = [layer_report(layer, baseline, task, section.budget) for layer in measurement.layers]
    model = ModelSummary(arch=arch, fingerprint=measurement.fingerprint, groups=measurement.groups,
                         checkpoint_sha256=checkpoint_sha256, params=measurement.params, macs=measurement.macs)
    return AnalyzeReport(model=model, dataset=dataset, criterion=section.criterion, granularity=section.granularity,
                         ratios=sorted({c.ratio for layer in measurement.layers for c in layer.cells}),
                         samples=baseline.samples, split=split, seed=section.seed,
                         primary_metric=task.primary, higher_is_better=task.higher_is_better,
                         baseline=baseline.as_dict(), budget=section.budget, layers=layers,
                         order=sensitivity_order(layers), timing=timing)


def _number(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _key(value: float) -> float:
    return 0.0 if math.isnan(value) else value
