"""An anomaly detector's decision threshold, chosen on the validation split and carried in the checkpoint.

A threshold picked by `score` on the data it scores would use the labels it is judged by (a hold-out
file scored with `--split all`), and an exported detector needs its threshold to flag anything. So
every command that changes a detector chooses it again on the validation split of the data it ran
with and stores it; where that data cannot be read, the stale one is dropped rather than kept.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from dnnprune.checkpoint import AnomalyThreshold, meta_of
from dnnprune.errors import DatasetError, DnnpruneError
from dnnprune.loaders import dataset_name, eval_loader
from dnnprune.recipe import DataSection
from dnnprune.tasks import (
    Reconstruction,
    anomalies_are_rarer,
    choose_threshold,
    make_task,
    sample_errors,
    threshold_metrics,
)


def is_detector(model: nn.Module) -> bool:
    task = meta_of(model).task
    return task.kind == "reconstruction" and bool(task.normal_classes)


def choose_on_val(model: nn.Module, data: DataSection, device: torch.device) -> AnomalyThreshold:
    """The threshold with the best F1 on the validation split (never on test)."""
    meta = meta_of(model)
    task = make_task(meta.task)
    if not isinstance(task, Reconstruction) or not task.spec.normal_classes:
        raise DnnpruneError(f"{meta.arch} is no anomaly detector (its task is {meta.task.kind} without normal "
                            "classes), so it has no threshold to choose; set model.task.normal_classes")
    errors, anomalous = [], []
    was_training, home = model.training, next(model.parameters(), torch.empty(0)).device
    model.to(device).eval()
    with torch.inference_mode():
        for inputs, targets in eval_loader(meta, data, split="val"):
            inputs = inputs.to(device)
            errors.append(sample_errors(model(inputs), inputs).double().cpu())
            anomalous.append(~task.is_normal(targets.cpu()))
    model.train(was_training).to(home)
    scores, flags = torch.cat(errors).numpy(), torch.cat(anomalous).numpy().astype(np.bool_)
    value = choose_threshold(scores, flags)
    if anomalies_are_rarer(flags):
        rarer, f1 = "anomalies", threshold_metrics(scores, flags, value)["f1"]
    else:
        rarer, f1 = "normal samples (the rarer group)", _normal_f1(scores, flags, value)
    return AnomalyThreshold(value=value, chosen_on=f"best F1 for {rarer} on the val split of "
                                                   f"{dataset_name(meta, data)}", samples=len(scores), f1=f1)


def _normal_f1(scores: np.ndarray, anomalous: np.ndarray, value: float) -> float | None:
    """F1 of finding the normal samples (error at or below the threshold)."""
    found = scores <= value
    hits = int((found & ~anomalous).sum())
    if not hits:
        return 0.0 if found.any() else None
    precision, recall = hits / int(found.sum()), hits / int((~anomalous).sum())
    return 2 * precision * recall / (precision + recall)


def refresh(model: nn.Module, data: DataSection, device: torch.device) -> str | None:
    """Store a threshold chosen for the model as it is now; drop the old one where the data cannot give
    one, and say why (None when a threshold was stored, or the model is no detector)."""
    if not is_detector(model):
        return None
    meta = meta_of(model)
    try:
        meta.anomaly_threshold = choose_on_val(model, data, device)
    except DatasetError as exc:
        meta.anomaly_threshold = None
        return (f"the anomaly threshold was dropped, since the validation split to choose it on could not be used "
                f"({exc}); the output has none, so score cannot give precision/recall/F1 on --split all and export "
                "writes no threshold. Run with the training data (--data-root) to store one")
    return None
