"""The depth engine: remove each unit alone (a residual block, a same-shape conv, a hidden Linear) and
measure the task's metrics, for `analyze --granularity layer`.

A unit is a "layer" of the report with one cell at ratio 1.0 (the unit taken out whole), so the table,
CSV, PNG and the order read exactly like a filter analysis. Hidden Linear layers are bridged by
least squares on training samples (never on the validation samples the cells are measured on).
"""

from __future__ import annotations

import copy
from fnmatch import fnmatchcase

import torch
from torch import nn

from dnnprune.analysis.measurement import Batches, MeasuredCell, MeasuredLayer, Measurement, evaluate_batches
from dnnprune.checkpoint import meta_of
from dnnprune.distributed import gather, share_by_cost
from dnnprune.errors import RecipeError
from dnnprune.metrics import count_macs
from dnnprune.observe import Observer
from dnnprune.pruning.depth import check_units, units_fingerprint
from dnnprune.pruning.layers import Unit, remove_unit
from dnnprune.recipe import AnalyzeSection
from dnnprune.tasks import Task


class LayerAnalysis:
    """Building it finds the units and applies the section's include/exclude patterns (no data needed)."""

    needs_calibration = True

    def __init__(self, model: nn.Module, section: AnalyzeSection, device: torch.device, strategy: str = "fast") -> None:
        meta = meta_of(model)
        self.input_shape = tuple(meta.input_shape)
        self.work = copy.deepcopy(model).to(device).eval()
        self.all_units = check_units(self.work, self.input_shape)
        self.units = [u for u in self.all_units if _wanted(u.name, section)]
        if not self.units:
            raise RecipeError("analyze.layers/exclude leave no removable unit to analyze; loosen the patterns")
        self.fingerprint = units_fingerprint(meta.arch, self.all_units)
        self.calibration: torch.Tensor | None = None

    def measure(self, batches: Batches, task: Task, observer: Observer, *, rank: int = 0, world: int = 1) -> Measurement:
        mine = share_by_cost(self.units, lambda u: float(max(u.macs, 0) + 1), world, key=lambda u: u.name)[rank]
        bar = observer.begin("analyze layers" + (f" (rank {rank} of {world})" if world > 1 else ""), len(mine))
        measured = {}
        for unit in mine:
            measured[unit.name] = self._without(unit, batches, task)
            observer.update(bar, advance=1, info=unit.name)
        observer.end(bar, keep=True)
        measured = {name: cell for part in gather(measured, world) for name, cell in part.items()}
        baseline = evaluate_batches(task, self.work, batches)
        layers = [MeasuredLayer(name=u.name, type=u.kind, width=1, params=u.params, macs=u.macs,
                                members=list(u.members), cells=[measured[u.name]]) for u in self.units]
        return Measurement(baseline=baseline, layers=layers, fingerprint=self.fingerprint,
                           groups=[(u.name, 1) for u in self.all_units],
                           params=sum(p.numel() for p in self.work.parameters()),
                           macs=sum(count_macs(self.work, self.input_shape).values()), evaluations=len(self.units),
                           engine={"strategy": "remove-and-evaluate"})

    def _without(self, unit: Unit, batches: Batches, task: Task) -> MeasuredCell:
        clone = copy.deepcopy(self.work)
        remove_unit(clone, unit, self.calibration)
        metrics = evaluate_batches(task, clone, batches)
        macs = sum(count_macs(clone, self.input_shape).values())
        return MeasuredCell(ratio=1.0, removed=1, metrics=metrics, params=sum(p.numel() for p in clone.parameters()),
                            macs=macs)


def _wanted(name: str, section: AnalyzeSection) -> bool:
    included = not section.layers or any(fnmatchcase(name, p) for p in section.layers)
    return included and not any(fnmatchcase(name, p) for p in section.exclude)
