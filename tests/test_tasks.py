"""The task layer: every metric checked against a hand computation (and sklearn where it has one)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from sklearn.metrics import average_precision_score, roc_auc_score

from dnnprune.errors import DnnpruneError
from dnnprune.tasks import (
    Classification,
    Reconstruction,
    TaskSpec,
    anomaly_metrics,
    choose_threshold,
    make_task,
    sample_errors,
    threshold_metrics,
)
from dnnprune.training import evaluate


def _hand_classification(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    rows = logits.tolist()
    top1 = top5 = 0
    loss = 0.0
    for row, target in zip(rows, targets.tolist()):
        ranked = sorted(range(len(row)), key=lambda k: -row[k])
        top1 += ranked[0] == target
        top5 += target in ranked[:5]
        loss += math.log(sum(math.exp(v) for v in row)) - row[target]
    n = len(rows)
    return {"top1": top1 / n, "top5": top5 / n, "loss": loss / n}


@pytest.mark.parametrize("classes", [6, 10])
def test_classification_tally_equals_a_hand_computation(classes: int) -> None:
    generator = torch.Generator().manual_seed(classes)
    logits, targets = torch.randn(23, classes, generator=generator), torch.randint(0, classes, (23,), generator=generator)
    task = make_task(TaskSpec())
    assert isinstance(task, Classification) and (task.primary, task.higher_is_better) == ("top1", True)
    tally = task.tally()
    tally.add(logits[:10], torch.zeros(10), targets[:10])  # two batches: the counts add up
    tally.add(logits[10:], torch.zeros(13), targets[10:])
    metrics, hand = tally.result(), _hand_classification(logits, targets)
    assert metrics.samples == 23 and metrics.value == metrics["top1"]
    assert metrics["top1"] == pytest.approx(hand["top1"], abs=1e-12)
    assert metrics["top5"] == pytest.approx(hand["top5"], abs=1e-12)
    assert metrics["loss"] == pytest.approx(hand["loss"], rel=1e-5)
    assert 0 < hand["top1"] < hand["top5"] < 1  # the case is not trivial


@pytest.mark.parametrize("classes", [2, 5])
def test_top5_only_above_five_classes(classes: int) -> None:
    logits, targets = torch.randn(8, classes), torch.randint(0, classes, (8,))
    tally = make_task(TaskSpec()).tally()
    tally.add(logits, torch.zeros(8), targets)
    metrics = tally.result()
    assert metrics["top5"] is None
    assert metrics["top1"] == pytest.approx(_hand_classification(logits, targets)["top1"])


def test_a_classifier_with_non_2d_output_is_a_one_line_error() -> None:
    class Flat(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten()

    loader = [(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))]
    task = make_task(TaskSpec())
    with pytest.raises(DnnpruneError) as caught:
        evaluate(Flat(), loader, task=task)
    assert "\n" not in str(caught.value) and "(batch, classes)" in str(caught.value)
    with pytest.raises(DnnpruneError) as caught:  # training goes through the loss: the same one line
        task.loss(torch.randn(4, 3, 2, 2), torch.zeros(4), torch.zeros(4, dtype=torch.long))
    assert "\n" not in str(caught.value) and "(batch, classes)" in str(caught.value)


def test_reconstruction_mse_without_normal_classes() -> None:
    task = make_task(TaskSpec(kind="reconstruction"))
    assert isinstance(task, Reconstruction) and (task.primary, task.higher_is_better) == ("mse", False)
    inputs, outputs = torch.randn(6, 1, 1, 4), torch.randn(6, 4)
    per_sample = [sum((o - i) ** 2 for o, i in zip(out, inp)) / 4
                  for out, inp in zip(outputs.tolist(), inputs.flatten(1).tolist())]
    torch.testing.assert_close(sample_errors(outputs, inputs), torch.tensor(per_sample), rtol=1e-6, atol=1e-7)
    tally = task.tally()
    tally.add(outputs[:2], inputs[:2], torch.zeros(2, dtype=torch.long))
    tally.add(outputs[2:], inputs[2:], torch.zeros(4, dtype=torch.long))
    metrics = tally.result()
    assert set(metrics.values) == {"mse", "loss"} and metrics.value == pytest.approx(sum(per_sample) / 6, rel=1e-6)
    assert task.loss(outputs, inputs, torch.zeros(6)).item() == pytest.approx(sum(per_sample) / 6, rel=1e-6)
    assert task.trains_on(torch.tensor([0, 1])) is None
    with pytest.raises(DnnpruneError, match="as many values"):
        sample_errors(torch.randn(6, 3), inputs)


# Hand-made anomaly scores: 4 anomalies among 12, one of them (0.40) scored below two normals (0.45, 0.50).
SCORES = np.array([0.10, 0.20, 0.15, 0.90, 0.30, 0.05, 0.80, 0.25, 0.95, 0.40, 0.45, 0.50])
LABELS = np.array([0, 0, 0, 1, 0, 0, 1, 0, 2, 1, 0, 0])  # classes 1 and 2 are anomalies; 0 is normal
ANOMALOUS = LABELS != 0


def _hand_roc_auc(scores: np.ndarray, anomalous: np.ndarray) -> float:
    pairs = [(a, n) for a in scores[anomalous] for n in scores[~anomalous]]
    return sum(1.0 if a > n else 0.5 if a == n else 0.0 for a, n in pairs) / len(pairs)


def _hand_average_precision(scores: np.ndarray, anomalous: np.ndarray) -> float:
    order = np.argsort(-scores)
    hits, total = 0, 0.0
    for rank, index in enumerate(order, start=1):
        if anomalous[index]:
            hits += 1
            total += hits / rank
    return total / int(anomalous.sum())


def test_roc_auc_and_pr_auc_equal_a_hand_computation_and_sklearn() -> None:
    values = anomaly_metrics(SCORES, ANOMALOUS, None)
    assert values["roc_auc"] == pytest.approx(_hand_roc_auc(SCORES, ANOMALOUS), abs=1e-12)
    assert values["roc_auc"] == pytest.approx(roc_auc_score(ANOMALOUS, SCORES), abs=1e-12)
    assert values["pr_auc"] == pytest.approx(_hand_average_precision(SCORES, ANOMALOUS), abs=1e-12)
    assert values["pr_auc"] == pytest.approx(average_precision_score(ANOMALOUS, SCORES), abs=1e-12)
    assert values["roc_auc"] == pytest.approx(30 / 32) and values["anomaly_rate"] == pytest.approx(4 / 12)
    assert values["mse_normal"] == pytest.approx(SCORES[~ANOMALOUS].mean())
    one_class = anomaly_metrics(SCORES, np.zeros(12, dtype=bool), None)
    assert one_class["roc_auc"] is None and one_class["pr_auc"] is None


def _f1_of_top(k: int) -> float:
    flagged = np.zeros(len(SCORES), dtype=bool)
    flagged[np.argsort(-SCORES)[:k]] = True
    tp = int((flagged & ANOMALOUS).sum())
    precision, recall = tp / k, tp / int(ANOMALOUS.sum())
    return 2 * precision * recall / (precision + recall) if tp else 0.0


def test_choose_threshold_gives_the_best_f1_and_threshold_metrics_measure_it() -> None:
    threshold = choose_threshold(SCORES, ANOMALOUS)
    best = max(_f1_of_top(k) for k in range(1, len(SCORES) + 1))
    flagged = SCORES > threshold
    assert flagged.sum() == 3 and set(np.flatnonzero(flagged)) == {3, 6, 8}  # top three: all anomalies
    at = threshold_metrics(SCORES, ANOMALOUS, threshold)
    assert at["f1"] == pytest.approx(best) == pytest.approx(6 / 7)
    assert (at["precision"], at["recall"], at["threshold"]) == (1.0, 0.75, threshold)
    # The threshold sits halfway between the lowest flagged score (0.80) and the next one down (0.50), so
    # that a float32 copy of it (an exported detector) flags the same samples.
    assert threshold == pytest.approx(0.65)
    assert (SCORES.astype(np.float32) > np.float32(threshold)).tolist() == flagged.tolist()
    manual = threshold_metrics(SCORES, ANOMALOUS, 0.42)  # flags 0.95, 0.9, 0.8 (anomalies), 0.5, 0.45 (normal)
    assert manual["precision"] == pytest.approx(3 / 5) and manual["recall"] == pytest.approx(3 / 4)
    assert manual["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    normal_count = int((~ANOMALOUS).sum())
    assert manual["flagged_rate"] == pytest.approx(5 / len(SCORES))
    assert manual["false_positive_rate"] == pytest.approx(2 / normal_count)
    only_normal = threshold_metrics(SCORES[~ANOMALOUS], np.zeros(normal_count, dtype=bool), 0.42)
    assert only_normal["recall"] is None and only_normal["false_positive_rate"] == pytest.approx(2 / normal_count)
    nothing = threshold_metrics(SCORES, ANOMALOUS, 1.0)
    assert nothing["precision"] is None and nothing["recall"] == 0.0 and nothing["f1"] is None


def test_threshold_without_anomalies_is_the_95th_percentile_of_normal_errors() -> None:
    normal = SCORES[~ANOMALOUS]
    assert choose_threshold(normal, np.zeros(len(normal), dtype=bool)) == pytest.approx(np.percentile(normal, 95))


def test_the_anomaly_tally_reports_every_metric_at_the_threshold() -> None:
    task = make_task(TaskSpec(kind="reconstruction", normal_classes=(0,)))
    assert (task.primary, task.higher_is_better, task.label) == ("roc_auc", True, "ROC-AUC")
    assert task.trains_on(torch.tensor([0, 1, 2, 0])).tolist() == [True, False, False, True]
    # Inputs zero, outputs sqrt(score): each sample's MSE is its hand-made score.
    outputs = torch.from_numpy(np.sqrt(SCORES)).float()[:, None].repeat(1, 3)
    tally = task.tally(0.37)
    tally.add(outputs, torch.zeros(12, 3), torch.from_numpy(LABELS))
    metrics = tally.result()
    assert metrics.value == pytest.approx(roc_auc_score(ANOMALOUS, SCORES))
    assert metrics["pr_auc"] == pytest.approx(average_precision_score(ANOMALOUS, SCORES), rel=1e-6)
    assert (metrics["precision"], metrics["recall"]) == (pytest.approx(4 / 6), 1.0)  # 0.5, 0.45 flagged too
    assert metrics["mse"] == pytest.approx(SCORES.mean(), rel=1e-6)


def test_drop_is_points_for_accuracy_and_relative_for_mse() -> None:
    accuracy, mse = make_task(TaskSpec()), make_task(TaskSpec(kind="reconstruction"))
    anomaly = make_task(TaskSpec(kind="reconstruction", normal_classes=(0,)))
    assert accuracy.drop(0.90, 0.85) == pytest.approx(0.05)
    assert accuracy.drop(0.50, 0.45) == pytest.approx(0.05)  # points: the same at any level
    assert anomaly.drop(0.95, 0.96) == pytest.approx(-0.01)
    assert mse.drop(0.2, 0.25) == pytest.approx(0.25)  # 25 % more error
    assert mse.drop(200.0, 250.0) == pytest.approx(0.25)  # the same at any scale
    assert mse.drop(0.2, 0.1) == pytest.approx(-0.5)
    assert accuracy.percent(0.9) == pytest.approx(90.0)
    with pytest.raises(DnnpruneError, match="lower-is-better"):
        mse.percent(0.1)


@pytest.mark.parametrize("labels, classes, positions", [
    ([1], ["1", "2"], (0,)),                      # a file labelled 1 and 2: the label, not position 1
    (["1"], ["1", "2"], (0,)),
    ([2, 1], ["1", "2"], (0, 1)),
    ([0], ["0", "1"], (0,)),                      # Kaggle's creditcard: labels and positions agree
    (["normal"], ["fraud", "normal"], (1,)),      # word labels, which had no way to be named
    ([1.0], ["1", "2"], (0,)),
])
def test_normal_classes_are_the_data_labels_resolved_to_positions(labels: list, classes: list[str],
                                                                   positions: tuple[int, ...]) -> None:
    from dnnprune.tasks import normal_positions

    assert normal_positions(labels, classes) == positions


def test_a_built_in_dataset_also_takes_its_label_numbers_but_a_file_of_word_labels_does_not() -> None:
    from dnnprune.errors import DatasetError
    from dnnprune.tasks import normal_positions

    names = [f"class{i}" for i in range(10)]
    assert normal_positions([0, 9], names, numbered=True) == (0, 9)  # fashion-mnist's label numbers
    assert normal_positions(["3", "class4"], names, numbered=True) == (3, 4)
    with pytest.raises(DatasetError, match="0 is not one of the data's labels \\('fraud', 'normal'\\)"):
        normal_positions([0], ["fraud", "normal"])  # was read as 'fraud', the first label in sorted order


@pytest.mark.parametrize("labels, classes", [([0], ["1", "2"]), ([3], ["1", "2"]), (["fraudd"], ["fraud", "ok"]),
                                            ([10], [f"c{i}" for i in range(10)]), ([True], ["a", "b"])])
def test_a_label_the_data_does_not_hold_is_one_error_listing_the_labels(labels: list, classes: list[str]) -> None:
    from dnnprune.errors import DatasetError
    from dnnprune.tasks import normal_positions

    with pytest.raises(DatasetError, match="is not one of the data's labels"):
        normal_positions(labels, classes)


def test_with_anomalies_in_the_majority_the_threshold_finds_the_normal_samples() -> None:
    """Nine anomalies for every normal sample: flagging all scores F1 0.95 on the anomalies, so best-F1
    picked a threshold that flags (nearly) every normal sample too. The rarer group, the normal samples,
    is found best instead."""
    from sklearn.metrics import precision_recall_curve

    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(1.0, 0.3, 100), rng.normal(1.6, 0.6, 900)])
    anomalous = np.r_[np.zeros(100, bool), np.ones(900, bool)]
    precision, recall, cuts = precision_recall_curve(anomalous, scores)
    naive = cuts[np.argmax(2 * precision[:-1] * recall[:-1] / (precision[:-1] + recall[:-1]))]
    assert threshold_metrics(scores, anomalous, naive - 1e-12)["false_positive_rate"] > 0.9  # the old rule

    def f1_normal(cut: float) -> float:  # 2 TP / (predicted + actual), normal predicted at or below the cut
        found = scores <= cut
        return 2 * int((found & ~anomalous).sum()) / (int(found.sum()) + 100)

    threshold = choose_threshold(scores, anomalous)
    assert f1_normal(threshold) == pytest.approx(max(f1_normal(cut) for cut in scores))
    at = threshold_metrics(scores, anomalous, threshold)
    assert at["false_positive_rate"] < 0.5 and at["recall"] > 0.7  # it tells the two groups apart
