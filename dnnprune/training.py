"""Train, fine-tune and evaluate loops shared by every command, all through the model's task.

`fit_loop` is the one training loop: every fine-tune inside prune, quantize and double-prune runs
it. While it runs, encoded tensors stay encoded (`constraints.held_encodings`): sparse weights keep
their zeros, k-means weights train their centroids with the codes frozen.
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn
from pydantic import Field
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from dnnprune.checkpoint import load, meta_of
from dnnprune.constraints import held_encodings
from dnnprune.errors import DnnpruneError, ModelError, RecipeError
from dnnprune.lineage import command
from dnnprune.loaders import eval_loader, train_loader
from dnnprune.observe import NULL_OBSERVER, Observer
from dnnprune.recipe import DataSection, FineTuneSection, TrainSection
from dnnprune.reports import Report
from dnnprune.tasks import Metrics, Task, make_task, paired_drop, within_budget

AfterStep = Callable[[nn.Module], None]


def seed_everything(seed: int) -> None:
    """Seed every generator a run draws from. With CUDA present, also ask cuDNN and cuBLAS for their
    deterministic kernels, so the same command gives the same bytes on a GPU as it does on the CPU
    (cuBLAS reads its workspace setting when it first starts, so it is set before then)."""
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def task_of(model: nn.Module) -> Task:
    """The task stored with the model (classification for models without metadata)."""
    meta = getattr(model, "dnnprune_meta", None)
    return make_task(getattr(meta, "task", None))


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu", *, task: Task | None = None,
             threshold: float | None = None) -> Metrics:
    """The task's metrics over a loader, in eval mode (the model's mode is restored)."""
    task = task or task_of(model)
    was_training = model.training
    model.eval()
    tally = task.tally(threshold)
    try:
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            tally.add(model(inputs), inputs, targets)
    finally:
        model.train(was_training)
    return tally.result()


T = TypeVar("T")


def undone_if_worse(model: nn.Module, run: Callable[[], T], val: Iterable, device: torch.device | str, *,
                    task: Task, confidence: float) -> tuple[T, dict[str, Any]]:
    """Run a fine-tune; put the weights back when it lowered the validation metric at `confidence`, paired on
    the same samples (`tasks.within_budget`), so a dip within the subset's noise keeps the fine-tune.
    Returns what `run` returned and the verdict (val before and after, drop and its error, kept)."""
    before = evaluate(model.to(device), val, device, task=task)
    saved = {key: value.detach().clone() for key, value in model.state_dict().items()}
    result = run()
    after = evaluate(model.to(device), val, device, task=task)
    drop, error = paired_drop(before, after, task)
    finite = all(math.isfinite(v) for v in after.as_dict().values() if isinstance(v, float))
    kept = finite and within_budget(drop, error, 0.0, confidence)  # NaN logits can tie top-1 at chance
    if not kept:
        model.load_state_dict(saved)
    return result, {"val_before": before.value, "val_after": after.value, "drop": drop, "drop_stderr": error,
                    "kept": kept}


@dataclass
class TrainHistory:
    epochs: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "steps": self.steps, "seconds": self.seconds}


def total_steps(config: TrainSection | FineTuneSection, steps_per_epoch: int) -> int:
    """Steps a section asks for: its epochs, capped by max_steps (max_steps alone means that many)."""
    if config.max_steps is not None and config.epochs == 0:
        return config.max_steps
    by_epochs = math.ceil(config.epochs * steps_per_epoch)
    return min(by_epochs, config.max_steps) if config.max_steps else by_epochs


def wants_training(config: TrainSection | FineTuneSection) -> bool:
    return config.epochs > 0 or config.max_steps is not None


def fit_loop(model: nn.Module, loader: DataLoader, config: TrainSection | FineTuneSection, *,
             device: torch.device, task: Task | None = None, observer: Observer = NULL_OBSERVER,
             val_loader: DataLoader | None = None, description: str = "train", seed: int | None = None,
             after_step: AfterStep | None = None, bn_l1: float | None = None,
             after_backward: AfterStep | None = None, teacher: nn.Module | None = None) -> TrainHistory:
    """SGD/Adam training with an optional L1 penalty on BN scales (network slimming).

    With `config.distill` > 0 the loss mixes in distillation from `teacher` (see `frozen_teacher`).

    `after_backward` runs between the backward pass and the optimizer step (e.g. a regularizer that
    edits gradients), `after_step` after every optimizer step. Encoded tensors (sparse, quantized)
    are held for the whole loop and put back on their grid at the end.
    """
    task = task or task_of(model)
    distill = float(getattr(config, "distill", 0.0))
    if distill > 0 and teacher is None:
        raise ValueError("fit_loop: distill > 0 needs a teacher model")
    seed_everything(getattr(config, "seed", 0) if seed is None else seed)
    model.to(device).train()
    steps = total_steps(config, len(loader))
    history = TrainHistory()
    if steps == 0:
        return history
    encodings = getattr(getattr(model, "dnnprune_meta", None), "encodings", None) or {}
    with held_encodings(model, encodings):
        _run_steps(model, loader, config, steps, history, task=task, device=device, observer=observer,
                   val_loader=val_loader, description=description, after_step=after_step,
                   bn_l1=getattr(config, "bn_l1", 0.0) if bn_l1 is None else bn_l1, after_backward=after_backward,
                   teacher=teacher.to(device) if distill > 0 and teacher is not None else None)
    model.eval()
    return history


def _run_steps(model: nn.Module, loader: DataLoader, config: TrainSection | FineTuneSection, steps: int,
               history: TrainHistory, *, task: Task, device: torch.device, observer: Observer,
               val_loader: DataLoader | None, description: str, after_step: AfterStep | None, bn_l1: float,
               after_backward: AfterStep | None, teacher: nn.Module | None) -> None:
    optimizer = _make_optimizer(model, config)
    scheduler = _make_scheduler(optimizer, config, steps)
    label_smoothing = getattr(config, "label_smoothing", 0.0)
    net = data_parallel(model, device)
    start = time.perf_counter()
    bar = observer.begin(description, steps)
    step = epoch = 0
    while step < steps:
        epoch += 1
        running = _Running()
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad(set_to_none=True)
            output = net(inputs)
            loss = task.loss(output, inputs, targets, label_smoothing=label_smoothing)
            if teacher is not None:
                loss = _with_distillation(loss, output, inputs, teacher, task, config)
            value = _finite_loss(loss, step + 1, optimizer)
            loss.backward()
            if bn_l1 > 0:
                add_bn_l1_subgradient(model, bn_l1)
            if after_backward is not None:
                after_backward(model)
            optimizer.step()
            scheduler.step()
            if after_step is not None:
                after_step(model)
            running.update(value, output.detach(), targets, task)
            step += 1
            observer.update(bar, advance=1, info=f"epoch {epoch} loss {running.loss:.4f}{running.accuracy_note}")
            if step >= steps:
                break
        history.epochs.append(_epoch_row(model, epoch, step, running, optimizer, val_loader, device, config, task))
        if val_loader is not None:  # a full training run reports its epochs; a short fine-tune's bar is enough
            observer.log(_format_row(history.epochs[-1], time.perf_counter() - start, task))
    observer.end(bar, keep=description == "train")
    history.steps = step
    history.seconds = time.perf_counter() - start


def _finite_loss(loss: torch.Tensor, step: int, optimizer: torch.optim.Optimizer) -> float:
    """The loss as a number; a NaN or infinite one stops the run, so a diverged model is never saved."""
    value = loss.item()
    if not math.isfinite(value):
        lr = optimizer.param_groups[0]["lr"]
        raise DnnpruneError(f"training diverged: the loss is {value} at step {step} (lr {lr:.3g}); lower the "
                            "learning rate or check the data for NaN values")
    return value


def frozen_teacher(model: nn.Module, *configs: Any) -> nn.Module | None:
    """A frozen teacher when any of `configs` distils (else None): the model as the command received it, or
    the checkpoint a config names as `teacher`.

    Fine-tuning a pruned or quantized model towards the uncompressed one's soft outputs recovers more
    accuracy per step than the labels alone (Hinton et al. 2015); the copy costs one forward per step. In a
    chain (blocks, then channels) the command's input is already compressed, so a recipe may name the
    original instead.
    """
    distilling = [config for config in configs if float(getattr(config, "distill", 0.0)) > 0]
    if not distilling:
        return None
    named = {Path(config.teacher).resolve() for config in distilling if getattr(config, "teacher", None) is not None}
    if len(named) > 1:
        raise RecipeError(f"the fine-tunes name different teachers ({', '.join(sorted(map(str, named)))}); "
                          "give them the same teacher checkpoint")
    teacher = _checked_teacher(model, named.pop()) if named else copy.deepcopy(model)
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


def check_distillation_runs(*configs: FineTuneSection, steps: int | None = None) -> None:
    """Distillation that no fine-tune would run is a silent no-op; say so instead (a teacher without a
    distill weight is refused by the recipe itself). `steps`: the command's own step count, where the
    sections only hold the optimizer settings (double-prune)."""
    distilling = [c for c in configs if c.distill > 0]
    runs = any(wants_training(c) for c in distilling) if steps is None else steps > 0
    if distilling and not runs:
        raise RecipeError("distillation acts through fine-tuning, and no fine-tune is set to run; give the fine-tune "
                          "steps (e.g. finetune.max_steps) or drop --distill/--teacher")


def _shown(value: Any) -> str:
    """A metadata value as a user wrote it (a task as its fields, not a Python repr)."""
    return repr(value.model_dump(mode="json")) if hasattr(value, "model_dump") else repr(value)


def _checked_teacher(student: nn.Module, path: Path) -> nn.Module:
    """Load a teacher checkpoint that sees the same inputs and predicts the same outputs as the student."""
    teacher = load(path)
    mine, theirs = meta_of(student), meta_of(teacher)
    compared = ["input_shape", "mean", "std", "task"]
    compared += ["classes"] if mine.classes and theirs.classes else []  # the same names in the same order
    compared += ["features"] if mine.features and theirs.features else []  # a table's columns, in order
    for field_name in compared:
        if getattr(mine, field_name) != getattr(theirs, field_name):
            raise RecipeError(f"teacher {path} has {field_name} {_shown(getattr(theirs, field_name))}, the model being "
                              f"fine-tuned {_shown(getattr(mine, field_name))}; name a teacher trained on the same "
                              "inputs and task (e.g. the chain's original checkpoint)")
    device = next((tensor.device for tensor in student.parameters()), torch.device("cpu"))
    probe, was_training = torch.zeros(1, *mine.input_shape, device=device), student.training
    with torch.no_grad():
        shapes = tuple(student.eval()(probe).shape), tuple(teacher.to(device).eval()(probe).shape)
    student.train(was_training)
    if shapes[0] != shapes[1]:
        raise RecipeError(f"teacher {path} outputs shape {shapes[1]}, the model being fine-tuned {shapes[0]}; "
                          "name a teacher with the same outputs (the same classes)")
    return teacher


def _with_distillation(loss: torch.Tensor, output: torch.Tensor, inputs: torch.Tensor, teacher: nn.Module,
                       task: Task, config: TrainSection | FineTuneSection) -> torch.Tensor:
    weight = float(getattr(config, "distill", 0.0))
    with torch.no_grad():
        guide = teacher(inputs)
    soft = task.distill_loss(output, guide, float(getattr(config, "distill_temperature", 4.0)))
    return (1.0 - weight) * loss + weight * soft


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """Under torchrun, DistributedDataParallel (gloo on CPU, NCCL on GPUs): every process takes its slice of
    each global batch and the gradients are averaged, so N processes take the steps one process would.
    BatchNorm statistics stay per process, as in any DistributedDataParallel run."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return model
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=devices)


def _epoch_row(model: nn.Module, epoch: int, step: int, running: "_Running", optimizer: torch.optim.Optimizer,
               val_loader: DataLoader | None, device: torch.device, config: TrainSection | FineTuneSection,
               task: Task) -> dict[str, Any]:
    row: dict[str, Any] = {"epoch": epoch, "step": step, "train_loss": running.loss,
                           "train_top1": running.accuracy, "lr": optimizer.param_groups[0]["lr"]}
    if val_loader is not None and getattr(config, "eval_every_epoch", True):
        result = evaluate(model, val_loader, device, task=task)
        row.update({f"val_{task.primary}": result.value, "val_loss": result["loss"]})
        model.train()
    return row


def _format_row(row: dict[str, Any], seconds: float, task: Task) -> str:
    key = f"val_{task.primary}"
    val = f" val {task.label} {row[key]:.4f}" if row.get(key) is not None else ""
    train_top1 = f" top1 {row['train_top1']:.4f}" if row.get("train_top1") is not None else ""
    return f"epoch {row['epoch']} step {row['step']} loss {row['train_loss']:.4f}{train_top1}{val} ({seconds:.0f} s)"


class _Running:
    """Running loss (and training top-1 for classifiers) over one epoch."""

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.correct = 0
        self.count = 0
        self.batches = 0
        self.classifying = False

    def update(self, loss: float, output: torch.Tensor, targets: torch.Tensor, task: Task) -> None:
        self.loss_sum += loss
        self.batches += 1
        if task.primary == "top1":
            self.classifying = True
            self.correct += (output.argmax(1) == targets).sum().item()
            self.count += targets.numel()

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.batches)

    @property
    def accuracy(self) -> float | None:
        return self.correct / max(1, self.count) if self.classifying else None

    @property
    def accuracy_note(self) -> str:
        return f" acc {self.accuracy:.3f}" if self.accuracy is not None else ""


def add_bn_l1_subgradient(model: nn.Module, strength: float) -> None:
    """Network slimming (Liu et al. 2017): d/dγ of λ·Σ|γ| is λ·sign(γ)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None and module.weight.grad is not None:
            module.weight.grad.add_(strength * torch.sign(module.weight.detach()))


def _make_optimizer(model: nn.Module, config: TrainSection | FineTuneSection) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ModelError("every parameter of the model is frozen (requires_grad=False), so there is nothing to "
                         "train; unfreeze the ones to train, e.g. model.requires_grad_(True)")
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=getattr(config, "momentum", 0.9),
                           nesterov=getattr(config, "nesterov", False), weight_decay=config.weight_decay)


def _make_scheduler(optimizer: torch.optim.Optimizer, config: TrainSection | FineTuneSection,
                    steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    warmup = getattr(config, "warmup_steps", 0)
    schedule = config.schedule
    milestones = [int(m * steps) for m in getattr(config, "milestones", [])]
    gamma = getattr(config, "gamma", 0.1)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            progress = (step - warmup) / max(1, steps - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if schedule == "multistep":
            return gamma ** sum(step >= m for m in milestones)
        if schedule == "onecycle":
            peak = max(1, int(0.3 * steps))
            return (step + 1) / peak if step < peak else max(0.0, (steps - step) / max(1, steps - peak))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------- the `train` command


class TrainReport(Report):
    history: dict[str, Any]
    test: dict[str, Any]
    primary_metric: str
    train_samples: int
    section: dict[str, Any]
    warnings: list[str] = Field(default_factory=list, description="what looks wrong with the result, and the fix")

    def lineage_metrics(self) -> dict[str, Any]:
        return {f"test_{self.primary_metric}": self.test.get(self.primary_metric), "test_loss": self.test.get("loss"),
                "steps": self.history.get("steps")}


@command("train")
def train(model: nn.Module, section: TrainSection, *, data: DataSection, device: torch.device,
          observer: Observer) -> tuple[nn.Module, TrainReport]:
    """Train or fine-tune per the recipe's train section, then measure on the test split."""
    meta = meta_of(model)
    task = make_task(meta.task)
    seed_everything(section.seed)
    loader = train_loader(meta, data, section.batch_size, section.seed)
    val = eval_loader(meta, data, split="val")
    history = fit_loop(model, loader, section, device=device, task=task, observer=observer, val_loader=val,
                       description="train")
    test = evaluate(model, eval_loader(meta, data, split="test"), device, task=task)
    model.to("cpu")
    return model, TrainReport(history=history.as_dict(), test=test.as_dict(), primary_metric=task.primary,
                              train_samples=len(loader.dataset), section=section.model_dump(mode="json"),
                              warnings=_stale_batchnorm(model, len(meta.classes or []), history, test))


def _stale_batchnorm(model: nn.Module, outputs: int, history: TrainHistory, test: Metrics) -> list[str]:
    """Test accuracy at chance after training that learned is the mark of BatchNorm running statistics that
    lag the weights (torchvision's MobileNetV3 and EfficientNet use momentum 0.01: after a short run,
    evaluation normalises with statistics from the first steps). Said, with the fix, not left to be found."""
    accuracy, learned = test.values.get("top1"), (history.epochs[-1].get("train_top1") if history.epochs else None)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not outputs or accuracy is None or learned is None or not norms:
        return []
    chance = 1.0 / outputs
    if accuracy > 1.5 * chance or learned < 2 * chance:
        return []
    momenta = [m.momentum for m in norms if m.momentum is not None]
    momentum = f" (its slowest BatchNorm momentum is {min(momenta):g})" if momenta else ""
    return [f"test top-1 is {accuracy:.1%}, chance level, while training reached {learned:.1%}: evaluation uses "
            f"BatchNorm running statistics, which lag the weights after {history.steps} steps{momentum}; train for "
            "more steps, or at a lower learning rate"]
