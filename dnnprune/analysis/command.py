"""`analyze(model, section)`: the library command behind `dnnprune analyze`."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from dnnprune.analysis.engine import FilterAnalysis, Strategy
from dnnprune.analysis.layers import LayerAnalysis
from dnnprune.analysis.measurement import Analysis, load_batches
from dnnprune.analysis.report import AnalyzeReport, Timing, build_report
from dnnprune.checkpoint import meta_of
from dnnprune.errors import RecipeError
from dnnprune.lineage import command
from dnnprune.loaders import calibration_inputs, split_dataset, subset_size
from dnnprune.observe import Observer
from dnnprune.recipe import AnalyzeSection, DataSection, without_effect
from dnnprune.training import task_of

EngineFactory = Callable[[nn.Module, AnalyzeSection, torch.device, Strategy], Analysis]

_ENGINES: dict[str, EngineFactory] = {"filter": FilterAnalysis, "layer": LayerAnalysis}  # type: ignore[dict-item]
"""One engine per granularity: channels (`engine.py`) or whole units (`layers.py`)."""


@command("analyze", lineage=False)
def analyze(model: nn.Module, section: AnalyzeSection, *, data: DataSection, device: torch.device,
            observer: Observer, rank: int = 0, world: int = 1, strategy: Strategy = "fast",
            val_data: Dataset | None = None) -> tuple[nn.Module, AnalyzeReport]:
    """Prune each unit alone over the ratio grid, measure the model's task metrics, rank the units.

    The model is left untouched. The request is checked against the model before any data is read;
    then the validation subset (`section.samples`, class-stratified) is loaded, or `val_data` used as
    given. Under torchrun (`world > 1`, process group initialised) each process measures its share of
    the cells and all of them return the same, complete report. `strategy` other than "fast" exists
    for tests and benchmarks (see `engine.Strategy`).
    """
    start = time.perf_counter()
    meta = meta_of(model)
    task = task_of(model)
    analysis = _engine(section)(model, section, device, strategy)
    if getattr(analysis, "needs_calibration", False):
        analysis.calibration = calibration_inputs(meta, data, section.calibration_samples, section.seed).to(device)  # type: ignore[attr-defined]
    batch_size = section.batch_size or data.batch_size
    dataset = val_data if val_data is not None else split_dataset(
        meta, data, "val", subset_size(section, "samples", meta, data, "val"), section.seed)
    batches = load_batches(dataset, batch_size, device, section.channels_last)
    measurement = analysis.measure(batches, task, observer, rank=rank, world=world)
    seconds = time.perf_counter() - start
    cells = sum(len(layer.cells) for layer in measurement.layers)
    timing = Timing(seconds=seconds, cells=cells, evaluations=measurement.evaluations,
                    seconds_per_cell=seconds / max(1, cells), processes=world,
                    threads_per_process=torch.get_num_threads(), batch_size=batch_size, **measurement.engine)
    report = build_report(measurement, task, arch=meta.arch, checkpoint_sha256=meta.file_sha256,
                          dataset=data.dataset or meta.dataset, section=section, split="val", timing=timing)
    return model, report


def _engine(section: AnalyzeSection) -> EngineFactory:
    """The one place a granularity is chosen."""
    if section.granularity == "layer":
        _refuse_channel_options(section)
    return _ENGINES[section.granularity]


_CHANNEL_OPTIONS = ("ratios", "criterion", "channels_last", "winograd")


def _refuse_channel_options(section: AnalyzeSection) -> None:
    """A layer analysis removes each unit whole: ratios and channel rankings would be recorded but do nothing."""
    unused = without_effect(section, _CHANNEL_OPTIONS, "analyze", "a channel analysis")
    if unused:
        raise RecipeError(f"{unused} (each unit is removed whole)")
