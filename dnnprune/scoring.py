"""`score`: accuracy, size, MACs, bytes on disk, CPU latency and NetScore of one checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dnnprune.checkpoint import meta_of
from dnnprune.loaders import eval_loader
from dnnprune.metrics import measure_latency, netscore, size_summary
from dnnprune.recipe import Recipe
from dnnprune.training import evaluate

NETSCORE_UNITS = {"a": "top-1 accuracy in percent", "p": "parameters in millions", "m": "multiply-accumulates in millions (batch 1)"}


def score_model(model: nn.Module, recipe: Recipe, *, device: torch.device, checkpoint_path: Path | None = None,
                split: str = "test") -> dict[str, Any]:
    """All numbers of one checkpoint; latency is always measured on the CPU."""
    meta = meta_of(model)
    config = recipe.score
    loader = eval_loader(meta, recipe.data, split=split, samples=config.samples)
    accuracy = evaluate(model.to(device), loader, device)
    model.to("cpu")
    size = size_summary(model, meta.input_shape)
    disk_bytes = checkpoint_path.stat().st_size if checkpoint_path is not None else None
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint_path) if checkpoint_path else None,
        "arch": meta.arch,
        "dataset": meta.dataset,
        "split": split,
        "accuracy": accuracy.as_dict(),
        **size,
        "disk_bytes": disk_bytes,
        "bits_per_weight": (disk_bytes * 8 / size["params"]) if disk_bytes and size["params"] else None,
        "compression_vs_fp32": (size["fp32_bytes"] / disk_bytes) if disk_bytes else None,
        "netscore": _netscore_block(accuracy.top1, size["params"], size["macs"], config.netscore.model_dump()),
        "latency": _latency_block(model, meta.input_shape, recipe) if config.latency else [],
    }
    return result


def _netscore_block(top1: float, params: int, macs: int, exponents: dict[str, float]) -> dict[str, Any]:
    value = netscore(top1 * 100.0, params / 1e6, macs / 1e6, **exponents)
    return {"value": value, "formula": "20*log10(a^alpha / (p^beta * m^gamma))", "units": NETSCORE_UNITS,
            **exponents}


def _latency_block(model: nn.Module, input_shape: tuple[int, ...], recipe: Recipe) -> list[dict[str, Any]]:
    cfg = recipe.score.latency_config
    return [
        measure_latency(model, input_shape, batch, warmup=cfg.warmup, repeats=cfg.repeats, threads=cfg.threads).as_dict()
        for batch in cfg.batch_sizes
    ]
