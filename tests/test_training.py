"""Training loop pieces: network-slimming penalty, schedules, evaluation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from dnnprune.observe import Observer
from dnnprune.recipe import FineTuneSection, TrainSection
from dnnprune.tasks import TaskSpec, make_task
from dnnprune.training import _make_scheduler, add_bn_l1_subgradient, evaluate, fit_loop, frozen_teacher, total_steps

_CPU = torch.device("cpu")


class _Lines(Observer):
    """Keeps the log lines the loop sends."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def _toy_loader(n: int = 64, classes: int = 3) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=generator)
    y = torch.arange(n) % classes
    x[:, 0, 0, 0] += y.float() * 3  # a learnable signal
    return DataLoader(TensorDataset(x, y), batch_size=16)


def _toy_model(classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, classes))


def test_bn_l1_subgradient_adds_sign_of_gamma() -> None:
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -0.2, 0.0]))
    bn.weight.grad = torch.zeros(3)
    add_bn_l1_subgradient(nn.Sequential(bn), 1e-2)
    assert torch.allclose(bn.weight.grad, torch.tensor([1e-2, -1e-2, 0.0]))


def test_bn_l1_penalty_shrinks_scales_during_training() -> None:
    totals = {}
    for strength in (0.0, 0.05):
        torch.manual_seed(0)
        model = _toy_model()
        config = TrainSection(epochs=3, lr=0.05, bn_l1=strength, weight_decay=0.0, schedule="constant")
        fit_loop(model, _toy_loader(), config, device=_CPU)
        totals[strength] = model[1].weight.abs().sum().item()
    assert totals[0.05] < totals[0.0] * 0.9


def test_training_reduces_loss_and_logs_epochs() -> None:
    torch.manual_seed(0)
    model = _toy_model()
    before = evaluate(model, _toy_loader())["loss"]
    observer = _Lines()
    history = fit_loop(model, _toy_loader(), TrainSection(epochs=4, lr=0.05, schedule="cosine"), device=_CPU,
                       observer=observer, val_loader=_toy_loader())
    assert evaluate(model, _toy_loader())["loss"] < before
    assert [row["epoch"] for row in history.epochs] == [1, 2, 3, 4] and len(observer.lines) == 4
    assert all(line.startswith(f"epoch {i} ") and "val top-1" in line for i, line in enumerate(observer.lines, 1))
    assert history.steps == 16
    quiet = _Lines()  # a fine-tune without validation data shows its progress bar only, no epoch lines
    fit_loop(model, _toy_loader(), FineTuneSection(epochs=1, lr=0.01), device=_CPU, observer=quiet)
    assert quiet.lines == []


def test_epoch_rows_carry_the_primary_validation_metric() -> None:
    torch.manual_seed(0)
    history = fit_loop(_toy_model(), _toy_loader(), TrainSection(epochs=2, lr=0.05), device=_CPU,
                       val_loader=_toy_loader())
    assert all({"val_top1", "val_loss"} <= set(row) for row in history.epochs)
    assert all(0.0 <= row["val_top1"] <= 1.0 for row in history.epochs)


def test_max_steps_caps_training() -> None:
    history = fit_loop(_toy_model(), _toy_loader(), TrainSection(epochs=10, max_steps=5), device=_CPU)
    assert history.steps == 5


def test_max_steps_alone_means_that_many_steps() -> None:
    assert total_steps(FineTuneSection(max_steps=7), steps_per_epoch=4) == 7
    assert total_steps(FineTuneSection(epochs=1, max_steps=7), steps_per_epoch=4) == 4
    assert total_steps(FineTuneSection(), steps_per_epoch=4) == 0
    history = fit_loop(_toy_model(), _toy_loader(), FineTuneSection(max_steps=6), device=_CPU)
    assert history.steps == 6  # more than one epoch of 4 batches


def test_schedules_follow_their_shape() -> None:
    def lrs(**kwargs: object) -> list[float]:
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = _make_scheduler(optimizer, TrainSection(**kwargs), steps=100)
        values = []
        for _ in range(100):
            values.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return values

    multistep = lrs(schedule="multistep", milestones=[0.5, 0.75], gamma=0.1)
    assert multistep[49] == 1.0 and abs(multistep[50] - 0.1) < 1e-12 and abs(multistep[80] - 0.01) < 1e-12
    cosine = lrs(schedule="cosine")
    assert cosine[0] == 1.0 and abs(cosine[50] - 0.5) < 1e-9 and cosine[99] < 0.01
    warm = lrs(schedule="constant", warmup_steps=10)
    assert abs(warm[0] - 0.1) < 1e-12 and warm[20] == 1.0


def test_evaluate_reports_top5_only_above_five_classes() -> None:
    assert evaluate(_toy_model(3), _toy_loader(classes=3))["top5"] is None
    result = evaluate(_toy_model(7), _toy_loader(classes=7))
    assert result["top5"] is not None and result["top5"] >= result["top1"] and result.samples == 64
    assert result.primary == "top1" and result.value == result["top1"] and not math.isnan(result.value)
    assert result.as_dict() == {"top1": result["top1"], "top5": result["top5"], "loss": result["loss"], "samples": 64}


def _kl_to(teacher: nn.Module, student: nn.Module, loader: DataLoader) -> float:
    """Mean KL(teacher || student) over the loader: how far the student's predictions are from the teacher's."""
    student.eval()
    total = 0.0
    with torch.no_grad():
        for x, _ in loader:
            total += torch.nn.functional.kl_div(student(x).log_softmax(1), teacher(x).log_softmax(1),
                                                reduction="sum", log_target=True).item()
    return total / len(loader.dataset)  # type: ignore[arg-type]


def test_distillation_pulls_the_student_towards_the_teacher_and_leaves_the_teacher_alone() -> None:
    torch.manual_seed(1)
    source = _toy_model()
    fit_loop(source, _toy_loader(), TrainSection(epochs=2, lr=0.05, schedule="constant"), device=_CPU)
    gaps = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        student = _toy_model()
        config = FineTuneSection(max_steps=40, lr=0.05, weight_decay=0.0, schedule="constant", distill=weight)
        teacher = frozen_teacher(source, config)
        assert (teacher is None) == (weight == 0.0)
        before = {k: v.clone() for k, v in source.state_dict().items()}
        fit_loop(student, _toy_loader(), config, device=_CPU, teacher=teacher)
        gaps[weight] = _kl_to(source, student, _toy_loader())
        assert all(torch.equal(before[k], v) for k, v in source.state_dict().items())
    assert gaps[1.0] < 0.5 * gaps[0.0]


def test_distillation_without_a_teacher_is_refused() -> None:
    config = FineTuneSection(max_steps=2, distill=0.5)
    with pytest.raises(ValueError, match="teacher"):
        fit_loop(_toy_model(), _toy_loader(), config, device=_CPU)


def test_distillation_losses_of_each_task() -> None:
    classify = make_task(TaskSpec(kind="classification"))
    logits = torch.randn(4, 5)
    assert classify.distill_loss(logits, logits.clone(), 4.0).abs().item() < 1e-6
    other = torch.randn(4, 5)
    soft = torch.nn.functional.kl_div((logits / 2).log_softmax(1), (other / 2).log_softmax(1), reduction="batchmean",
                                      log_target=True)
    assert math.isclose(classify.distill_loss(logits, other, 2.0).item(), 4 * soft.item(), rel_tol=1e-5)
    reconstruct = make_task(TaskSpec(kind="reconstruction"))
    output, guide = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    assert math.isclose(reconstruct.distill_loss(output, guide, 4.0).item(),
                        (output - guide).pow(2).mean().item(), rel_tol=1e-5)


def test_fine_tunes_naming_different_teachers_are_refused(tmp_path: Path) -> None:
    import dnnprune
    from dnnprune.errors import RecipeError
    from tests.conftest import make_checkpoint

    first, second = make_checkpoint(tmp_path / "a.safetensors"), make_checkpoint(tmp_path / "b.safetensors")

    model = dnnprune.load(first)
    with pytest.raises(RecipeError, match="different teachers"):
        frozen_teacher(model, FineTuneSection(distill=0.5, teacher=first), FineTuneSection(distill=0.5, teacher=second))
    # a config that does not distil does not count, whatever it would have named
    assert frozen_teacher(model, FineTuneSection(distill=0.5, teacher=first), FineTuneSection()) is not None


def test_chance_level_test_accuracy_after_learning_warns_about_lagging_batchnorm_statistics() -> None:
    """torchvision's MobileNetV3 (BatchNorm momentum 0.01) after 150 steps: train top-1 0.60, test 0.10
    with exit 0 and no word; the report now says why and what to do."""
    from dnnprune.tasks import Metrics
    from dnnprune.training import TrainHistory, _stale_batchnorm

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=0.01), nn.Flatten(), nn.LazyLinear(10))
    history = TrainHistory(epochs=[{"epoch": 1, "train_top1": 0.6}], steps=150)

    def metrics(top1: float) -> Metrics:
        return Metrics(values={"top1": top1, "loss": 2.3}, samples=100, primary="top1", higher_is_better=True)

    warned = _stale_batchnorm(model, 10, history, metrics(0.1))
    assert len(warned) == 1 and "BatchNorm momentum is 0.01" in warned[0] and "after 150 steps" in warned[0]
    assert _stale_batchnorm(model, 10, history, metrics(0.55)) == []  # it evaluates fine
    assert _stale_batchnorm(model, 10, TrainHistory(epochs=[{"epoch": 1, "train_top1": 0.12}], steps=5), metrics(0.1)) == []


def test_a_teacher_mismatch_shows_metadata_as_fields_not_a_python_repr() -> None:
    from dnnprune.training import _shown

    assert _shown(TaskSpec(kind="reconstruction", normal_classes=(0,))) == "{'kind': 'reconstruction', 'normal_classes': [0]}"
    assert _shown((1, 28, 28)) == "(1, 28, 28)"
