"""What "good" means for a model: its loss, its metrics, the primary metric and its direction.

Every loop (training, evaluation, the sensitivity analysis, the accuracy-aware budget, `score`)
goes through a `Task`, so a reconstruction model is pruned by the same code as a classifier.

- `classification`: cross-entropy; top-1 (primary), top-5 when there are more than 5 classes.
- `reconstruction`: mean squared error between the output and the input. With `normal_classes`
  it is anomaly detection: the per-sample error is the anomaly score, samples of other classes
  are the anomalies, and ROC-AUC (primary) and PR-AUC (average precision) are reported, PR-AUC
  because ROC-AUC flatters when anomalies are rare. Without normal classes the primary metric
  is the MSE itself (lower is better).
"""

from __future__ import annotations

import decimal
import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from dnnprune.errors import DatasetError, DnnpruneError

TaskKind = Literal["classification", "reconstruction"]


class TaskSpec(BaseModel):
    """The task as stored in a checkpoint's metadata and set by a recipe's `model.task`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: TaskKind = "classification"
    normal_classes: tuple[int, ...] = Field(
        (), description="reconstruction: class indices that are normal; every other class is an anomaly")


def normal_positions(labels: list[int | str], classes: list[str], *, numbered: bool = False) -> tuple[int, ...]:
    """The class positions of the labels a user calls normal. A label is matched to the data's own labels
    first (a file labelled 1 and 2 has `1` at position 0). `numbered`: the dataset defines label numbers
    (fashion-mnist's 0 is 'T-shirt/top'), so a number that names no label is that label number; a file's
    word labels have no numbers, and a number there is refused rather than guessed."""
    numeric = bool(classes) and all(whole_number(name) is not None for name in classes)
    return tuple(sorted({_position(label, classes, numeric, numbered or not classes) for label in labels}))


def _position(label: int | str, classes: list[str], numeric: bool, numbered: bool) -> int:
    text = str(label).strip()
    keys = [label_key(name) for name in classes]
    if text in classes:
        return classes.index(text)
    if label_key(text) in keys:  # '0.50' names the file's '0.5', '1.0' its '1'
        return keys.index(label_key(text))
    number = None if isinstance(label, bool) else whole_number(text)
    if numbered and not numeric and number is not None and (not classes or 0 <= number < len(classes)):
        return number
    shown = ", ".join(repr(name) for name in classes[:20]) + (f" and {len(classes) - 20} more" if len(classes) > 20 else "")
    raise DatasetError(f"model.task.normal_classes: {label!r} is not one of the data's labels ({shown}); name "
                        "the normal labels as the data holds them")


_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def label_key(value: str) -> str:
    """One spelling per number, so '1', '1.0' and '01' are one class and '0.5' matches '0.50'. Only plain
    ASCII numbers count: float() would also read '1_0' as 10 and other scripts' digits as digits."""
    if not _NUMBER.fullmatch(value):
        return value
    number = decimal.Decimal(value)
    if not -30 <= number.adjusted() <= 30:  # keep 1e999999999 as written: normalize() overflows on it
        return value
    if number == number.to_integral_value():
        return str(int(number))
    return str(number.normalize())


def whole_number(text: str) -> int | None:
    """The integer a label spells ('1', '1.0', '01'), or None."""
    key = label_key(text.strip())
    return int(key) if re.fullmatch(r"-?[0-9]+", key) else None


@dataclass
class Metrics:
    """One evaluation: named values (None where undefined, e.g. ROC-AUC with one class), the sample
    count, and which value is primary."""

    values: dict[str, float | None]
    samples: int
    primary: str
    higher_is_better: bool
    per_sample: torch.Tensor | None = None
    """Each sample's share of the primary metric (its mean is the metric), where the metric is a mean
    (top-1: 1.0 if right); lets two evaluations on the same samples be compared pairwise."""

    def __getitem__(self, key: str) -> float | None:
        return self.values[key]

    @property
    def value(self) -> float:
        """The primary metric; NaN when it is undefined on this data."""
        primary = self.values.get(self.primary)
        return float("nan") if primary is None else float(primary)

    def as_dict(self) -> dict[str, Any]:
        return {**self.values, "samples": self.samples}


class Tally(ABC):
    """Accumulates batches of one evaluation; `result` gives the metrics."""

    @abstractmethod
    def add(self, output: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> None: ...

    @abstractmethod
    def result(self) -> Metrics: ...


class Task(ABC):
    spec: TaskSpec
    primary: str
    higher_is_better: bool
    label: str
    """How the primary metric is named on screen."""

    @abstractmethod
    def loss(self, output: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, *,
             label_smoothing: float = 0.0) -> torch.Tensor:
        """The training loss of one batch (mean over samples)."""

    @abstractmethod
    def tally(self, threshold: float | None = None) -> Tally:
        """A fresh accumulator; `threshold` is the anomaly threshold where the task has one."""

    def drop(self, before: float, after: float) -> float:
        """How much worse `after` is than `before`, in the primary metric's units (positive = worse).

        For a lower-is-better metric (MSE) the drop is relative, so one budget fits any data scale.
        """
        if self.higher_is_better:
            return before - after
        return (after - before) / max(abs(before), 1e-12)

    @abstractmethod
    def distill_loss(self, output: torch.Tensor, guide: torch.Tensor, temperature: float) -> torch.Tensor:
        """How far the student's `output` is from the teacher's `guide` on one batch (mean over samples)."""

    def trains_on(self, targets: torch.Tensor) -> torch.Tensor | None:
        """Which training samples the task learns from (None: all); anomaly detection sees only normal ones."""
        return None

    def percent(self, value: float) -> float:
        """The primary metric in percent, as NetScore's `a` wants it (a lower-is-better metric has none)."""
        if not self.higher_is_better:
            raise DnnpruneError(f"NetScore needs an accuracy-like metric; {self.primary} is lower-is-better")
        return 100.0 * value


# ----------------------------------------------------------------------------- classification


class Classification(Task):
    primary = "top1"
    higher_is_better = True
    label = "top-1"

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec

    def loss(self, output: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, *,
             label_smoothing: float = 0.0) -> torch.Tensor:
        _check_logits(output)
        return F.cross_entropy(output, targets, label_smoothing=label_smoothing)

    def distill_loss(self, output: torch.Tensor, guide: torch.Tensor, temperature: float) -> torch.Tensor:
        """Hinton's soft-target KL divergence, scaled by T^2 so its gradients match cross-entropy's size."""
        _check_logits(output)
        student = F.log_softmax(output / temperature, dim=1)
        teacher = F.log_softmax(guide / temperature, dim=1)
        return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature ** 2

    def tally(self, threshold: float | None = None) -> Tally:
        return _ClassificationTally()


class _ClassificationTally(Tally):
    """Top-1, top-5 (more than 5 classes) and summed cross-entropy, in float64-free integer counts."""

    def __init__(self) -> None:
        self.correct1 = self.correct5 = self.total = self.num_classes = 0
        self.loss_sum = 0.0
        self.right: list[torch.Tensor] = []

    def add(self, output: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        _check_logits(output)
        self.num_classes = output.shape[1]
        self.loss_sum += F.cross_entropy(output, targets, reduction="sum").item()
        topk = output.topk(min(5, self.num_classes), dim=1).indices
        right = topk[:, 0] == targets
        self.right.append(right.detach().cpu())
        self.correct1 += right.sum().item()
        self.correct5 += (topk == targets[:, None]).any(dim=1).sum().item()
        self.total += targets.numel()

    def result(self) -> Metrics:
        _require_samples(self.total)
        top5 = self.correct5 / self.total if self.num_classes > 5 else None
        return Metrics({"top1": self.correct1 / self.total, "top5": top5, "loss": self.loss_sum / self.total},
                       self.total, "top1", True, torch.cat(self.right).double())


def _check_logits(output: torch.Tensor) -> None:
    """Cross-entropy would read a 4-D output as a per-pixel map and fail deep inside torch; say what is wrong."""
    if output.dim() != 2:
        raise DnnpruneError(f"a classifier must return (batch, classes) logits; this model returns shape "
                            f"{tuple(output.shape)}; is the checkpoint's task right?")


# ----------------------------------------------------------------------------- reconstruction


class Reconstruction(Task):
    label = "MSE"

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        self.normal = torch.tensor(sorted(spec.normal_classes), dtype=torch.long)
        anomaly = bool(spec.normal_classes)
        self.primary = "roc_auc" if anomaly else "mse"
        self.higher_is_better = anomaly
        self.label = "ROC-AUC" if anomaly else "MSE"

    def loss(self, output: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, *,
             label_smoothing: float = 0.0) -> torch.Tensor:
        return sample_errors(output, inputs).mean()

    def distill_loss(self, output: torch.Tensor, guide: torch.Tensor, temperature: float) -> torch.Tensor:
        """The teacher's reconstruction is the target: a pruned autoencoder learns to reproduce it."""
        return sample_errors(output, guide).mean()

    def tally(self, threshold: float | None = None) -> Tally:
        return _ReconstructionTally(self, threshold)

    def trains_on(self, targets: torch.Tensor) -> torch.Tensor | None:
        return self.is_normal(targets) if self.spec.normal_classes else None

    def is_normal(self, targets: torch.Tensor) -> torch.Tensor:
        return torch.isin(targets.long(), self.normal.to(targets.device))


def sample_errors(output: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample: the reconstruction's anomaly score."""
    if output.numel() != inputs.numel():
        raise DnnpruneError(f"a reconstruction model must return as many values as it is fed: input "
                            f"{tuple(inputs.shape)}, output {tuple(output.shape)}; is the checkpoint's task right?")
    flat_out = output.reshape(output.shape[0], -1)
    return (flat_out - inputs.reshape(flat_out.shape).to(flat_out.dtype)).pow(2).mean(dim=1)


class _ReconstructionTally(Tally):
    def __init__(self, task: Reconstruction, threshold: float | None) -> None:
        self.task = task
        self.threshold = threshold
        self.errors: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def add(self, output: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.errors.append(sample_errors(output, inputs).detach().double().cpu())
        self.targets.append(targets.detach().cpu())

    def result(self) -> Metrics:
        errors = torch.cat(self.errors) if self.errors else torch.zeros(0, dtype=torch.float64)
        _require_samples(errors.numel())
        values: dict[str, float | None] = {"mse": float(errors.mean()), "loss": float(errors.mean())}
        if self.task.spec.normal_classes:
            anomalous = ~self.task.is_normal(torch.cat(self.targets))
            values.update(anomaly_metrics(errors.numpy(), anomalous.numpy(), self.threshold))
        return Metrics(values, errors.numel(), self.task.primary, self.task.higher_is_better)


def anomaly_metrics(scores: np.ndarray, anomalous: np.ndarray, threshold: float | None) -> dict[str, float | None]:
    """ROC-AUC, PR-AUC (average precision), the anomaly rate, and precision/recall/F1 at `threshold`."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    both = 0 < int(anomalous.sum()) < len(anomalous)
    values: dict[str, float | None] = {
        "roc_auc": float(roc_auc_score(anomalous, scores)) if both else None,
        "pr_auc": float(average_precision_score(anomalous, scores)) if both else None,
        "anomaly_rate": float(anomalous.mean()),
        "mse_normal": float(scores[~anomalous].mean()) if (~anomalous).any() else None,
    }
    if threshold is not None:
        values.update(threshold_metrics(scores, anomalous, threshold))
    return values


def threshold_metrics(scores: np.ndarray, anomalous: np.ndarray, threshold: float) -> dict[str, float | None]:
    """Flag samples whose error is above the threshold; how right the flags are, and how often normal
    samples are flagged (defined on a file of normal rows only, where precision and recall are not)."""
    flagged = scores > threshold
    true_pos = int((flagged & anomalous).sum())
    precision = true_pos / int(flagged.sum()) if flagged.any() else None
    recall = true_pos / int(anomalous.sum()) if anomalous.any() else None
    if precision is None or recall is None:
        f1 = None
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    normal = ~anomalous
    false_alarms = int((flagged & normal).sum()) / int(normal.sum()) if normal.any() else None
    return {"threshold": float(threshold), "precision": precision, "recall": recall, "f1": f1,
            "flagged_rate": float(flagged.mean()) if len(flagged) else None, "false_positive_rate": false_alarms}


def choose_threshold(scores: np.ndarray, anomalous: np.ndarray) -> float:
    """The anomaly threshold with the best F1 on these (validation) samples, for the rarer group.

    F1 rewards the positive class: with rare anomalies (fraud) they are it. Where anomalies are the
    majority (one Fashion-MNIST class normal, nine anomalous), flagging every sample already scores F1
    0.95 and best-F1 picks exactly that, a threshold that detects nothing; there the normal samples
    are the rarer group and the threshold is the one that finds them best. Falls back to the 95th
    percentile of the normal samples' errors when the data has no anomalies.
    """
    from sklearn.metrics import precision_recall_curve

    if not 0 < int(anomalous.sum()) < len(anomalous):
        normal = scores[~anomalous] if (~anomalous).any() else scores
        return float(np.percentile(normal, 95))
    if anomalies_are_rarer(anomalous):
        precision, recall, thresholds = precision_recall_curve(anomalous, scores)
        lowest_flagged = float(thresholds[int(np.argmax(_f1(precision, recall)))])
        below = scores[scores < lowest_flagged]
        return _between(float(below.max()) if below.size else None, lowest_flagged)
    precision, recall, thresholds = precision_recall_curve(~anomalous, -scores)  # normal: scores <= t
    highest_normal = float(-thresholds[int(np.argmax(_f1(precision, recall)))])
    above = scores[scores > highest_normal]
    return _between(highest_normal, float(above.min()) if above.size else None)


def _between(kept: float | None, flagged: float | None) -> float:
    """A cut halfway between the highest score left unflagged and the lowest one flagged: one just below
    the flagged score rounds onto it in float32, and a float32 deployment (the ONNX export) then
    misses that sample."""
    if kept is None:
        return float(np.nextafter(flagged, -math.inf))
    if flagged is None:
        return kept
    return (kept + flagged) / 2


def anomalies_are_rarer(anomalous: np.ndarray) -> bool:
    return 2 * int(anomalous.sum()) <= len(anomalous)


def _f1(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    return 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)


def paired_drop(before: Metrics, after: Metrics, task: Task) -> tuple[float, float | None]:
    """(drop of the primary metric, its standard error) between two evaluations on the same samples.

    Where the metric is a per-sample mean (top-1) the error is that of the paired differences, so the
    noise shared by both evaluations (the same hard samples) cancels; elsewhere it is unknown (None).
    """
    drop = task.drop(before.value, after.value)
    if before.per_sample is None or after.per_sample is None or before.per_sample.shape != after.per_sample.shape:
        return drop, None
    differences = before.per_sample - after.per_sample
    if not task.higher_is_better:
        differences = -differences
    count = differences.numel()
    return drop, float(differences.std(unbiased=True)) / math.sqrt(count) if count > 1 else None


def within_budget(drop: float, error: float | None, budget: float, confidence: float) -> bool:
    """False only when the drop exceeds the budget with the given one-sided confidence, so that noise
    in a finite evaluation does not undo real work; without an error estimate (or at confidence 0),
    the plain comparison."""
    if error is None or confidence <= 0:
        return drop <= budget
    return drop - NormalDist().inv_cdf(confidence) * error <= budget


def _require_samples(count: int) -> None:
    if count == 0:
        raise DnnpruneError("the evaluation split is empty; check the dataset and --samples")


# ----------------------------------------------------------------------------- lookup

_TASKS: dict[str, type[Task]] = {"classification": Classification, "reconstruction": Reconstruction}


def make_task(spec: TaskSpec | None = None) -> Task:
    """The task object for a stored spec (None: classification)."""
    spec = spec or TaskSpec()
    return _TASKS[spec.kind](spec)
