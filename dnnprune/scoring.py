"""`score`: the task's metrics, size, MACs, bytes on disk, CPU latency and NetScore of one checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from pydantic import Field

from dnnprune.checkpoint import meta_of
from dnnprune.lineage import command
from dnnprune.loaders import dataset_name, dataset_size, eval_loader, split_dataset
from dnnprune.metrics import measure_latency, netscore, size_summary
from dnnprune.observe import Observer
from dnnprune.recipe import DataSection, LatencySection, ScoreSection
from dnnprune.reports import Report
from dnnprune.tasks import Task, make_task
from dnnprune.thresholds import choose_on_val, is_detector
from dnnprune.training import evaluate

NETSCORE_UNITS = {"a": "the primary metric in percent (top-1 accuracy, or ROC-AUC for anomaly detection)",
                  "p": "parameters in millions", "m": "multiply-accumulates in millions (batch 1)"}


class ScoreReport(Report):
    checkpoint: str | None
    arch: str
    dataset: str | None
    split: str
    dataset_samples: int | None = Field(None, description="samples in the three splits together (--split all scores "
                                                          "every one)")
    split_samples: int | None = Field(None, description="samples the split holds (`samples` takes a subset of them)")
    task: dict[str, Any]
    threshold_source: str | None = Field(None, description="where an anomaly detector's threshold came from, or why "
                                                           "there is none")
    primary_metric: str
    metrics: dict[str, Any]
    params: int
    nonzero_params: int
    macs: int
    macs_per_layer: dict[str, int]
    fp32_bytes: int
    disk_bytes: int | None
    bits_per_weight: float | None
    compression_vs_fp32: float | None
    netscore: dict[str, Any]
    latency: list[dict[str, Any]]

    def lineage_metrics(self) -> dict[str, Any]:
        return {self.primary_metric: self.metrics.get(self.primary_metric)}


@command("score", lineage=False)
def score(model: nn.Module, section: ScoreSection, *, data: DataSection, device: torch.device, observer: Observer,
          checkpoint_path: Path | None = None) -> tuple[nn.Module, ScoreReport]:
    """Every number of one checkpoint; latency is always measured on the CPU."""
    meta = meta_of(model)
    split = section.split
    task = make_task(meta.task)
    threshold, source = _anomaly_threshold(model, data, device, split) if is_detector(model) else (None, None)
    loader = eval_loader(meta, data, split=split, samples=section.samples)  # type: ignore[arg-type]
    metrics = evaluate(model.to(device), loader, device, task=task, threshold=threshold)
    model.to("cpu")
    size = size_summary(model, meta.input_shape)
    disk_bytes = checkpoint_path.stat().st_size if checkpoint_path is not None else None
    report = ScoreReport(
        checkpoint=str(checkpoint_path) if checkpoint_path else None, arch=meta.arch, dataset=dataset_name(meta, data), split=split,
        dataset_samples=dataset_size(meta, data, whole=split == "all"), split_samples=len(split_dataset(meta, data, split)),
        task=meta.task.model_dump(mode="json"), threshold_source=source, primary_metric=task.primary, metrics=metrics.as_dict(), **size,
        disk_bytes=disk_bytes,
        bits_per_weight=(disk_bytes * 8 / size["params"]) if disk_bytes and size["params"] else None,
        compression_vs_fp32=(size["fp32_bytes"] / disk_bytes) if disk_bytes else None,
        netscore=netscore_block(task, metrics.value, size, section.netscore.model_dump()),
        latency=latency_rows(model, meta.input_shape, section.latency_config, observer) if section.latency else [])
    return model, report


def _anomaly_threshold(model: nn.Module, data: DataSection, device: torch.device,
                       split: str) -> tuple[float | None, str]:
    """The checkpoint's own threshold; one chosen now on val for a checkpoint without one, never on the
    samples being scored (with `--split all` there is no val split to spare, so there is none)."""
    stored = meta_of(model).anomaly_threshold
    if stored is not None:
        return stored.value, f"the checkpoint's: {stored.chosen_on} ({stored.samples:,} samples)"
    if split == "all":
        return None, ("none: the checkpoint holds no threshold (it was written before dnnprune stored one, or "
                      "without its data) and --split all leaves no val split to choose one on; score a checkpoint "
                      "that train, prune or quantize wrote with its training data")
    chosen = choose_on_val(model, data, device)
    return chosen.value, f"chosen now: {chosen.chosen_on} ({chosen.samples:,} samples); the checkpoint holds none"


def netscore_block(task: Task, primary: float, size: dict[str, Any], exponents: dict[str, float]) -> dict[str, Any]:
    """NetScore on all parameters (`value`) and on non-zero parameters (`value_nonzero`, what sparse storage pays)."""
    block: dict[str, Any] = {"formula": "20*log10(a^alpha / (p^beta * m^gamma))", "units": NETSCORE_UNITS, **exponents}
    if not task.higher_is_better or primary != primary:
        return {**block, "value": None, "value_nonzero": None,
                "note": f"NetScore needs an accuracy-like metric; this task's primary metric is {task.primary}"}
    a = task.percent(primary)
    return {**block, "value": netscore(a, size["params"] / 1e6, size["macs"] / 1e6, **exponents),
            "value_nonzero": netscore(a, size["nonzero_params"] / 1e6, size["macs"] / 1e6, **exponents),
            "a": a}


def latency_rows(model: nn.Module, input_shape: tuple[int, ...], config: LatencySection,
                 observer: Observer) -> list[dict[str, Any]]:
    rows = []
    for batch in config.batch_sizes:
        rows.append(measure_latency(model, input_shape, batch, warmup=config.warmup, repeats=config.repeats,
                                    threads=config.threads, runtime=config.runtime).as_dict())
    return rows
