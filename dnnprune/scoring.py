"""`score`: the task's metrics, size, MACs, bytes on disk, CPU latency and NetScore of one checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
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
from dnnprune.tasks import Reconstruction, Task, choose_threshold, make_task, sample_errors
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
    threshold = _anomaly_threshold(model, task, data, device) if isinstance(task, Reconstruction) else None
    loader = eval_loader(meta, data, split=split, samples=section.samples)  # type: ignore[arg-type]
    metrics = evaluate(model.to(device), loader, device, task=task, threshold=threshold)
    model.to("cpu")
    size = size_summary(model, meta.input_shape)
    disk_bytes = checkpoint_path.stat().st_size if checkpoint_path is not None else None
    report = ScoreReport(
        checkpoint=str(checkpoint_path) if checkpoint_path else None, arch=meta.arch, dataset=dataset_name(meta, data), split=split,
        dataset_samples=dataset_size(meta, data), split_samples=len(split_dataset(meta, data, split)),
        task=meta.task.model_dump(mode="json"), primary_metric=task.primary, metrics=metrics.as_dict(), **size,
        disk_bytes=disk_bytes,
        bits_per_weight=(disk_bytes * 8 / size["params"]) if disk_bytes and size["params"] else None,
        compression_vs_fp32=(size["fp32_bytes"] / disk_bytes) if disk_bytes else None,
        netscore=netscore_block(task, metrics.value, size, section.netscore.model_dump()),
        latency=latency_rows(model, meta.input_shape, section.latency_config, observer) if section.latency else [])
    return model, report


def _anomaly_threshold(model: nn.Module, task: Reconstruction, data: DataSection,
                       device: torch.device) -> float | None:
    """The threshold with the best F1 on the validation split (never on test)."""
    if not task.spec.normal_classes:
        return None
    errors, anomalous = [], []
    model.to(device).eval()
    with torch.inference_mode():
        for inputs, targets in eval_loader(meta_of(model), data, split="val"):
            inputs = inputs.to(device)
            errors.append(sample_errors(model(inputs), inputs).double().cpu())
            anomalous.append(~task.is_normal(targets))
    return choose_threshold(torch.cat(errors).numpy(), torch.cat(anomalous).numpy().astype(np.bool_))


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
