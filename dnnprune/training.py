"""Train, fine-tune and evaluate loops shared by every command."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from dnnprune.errors import DnnpruneError
from dnnprune.recipe import FineTuneSection, Recipe, TrainSection

StepCallback = Callable[[dict[str, float]], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DnnpruneError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class EvalResult:
    top1: float
    top5: float | None
    loss: float
    samples: int

    def as_dict(self) -> dict[str, Any]:
        return {"top1": self.top1, "top5": self.top5, "loss": self.loss, "samples": self.samples}


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu") -> EvalResult:
    """Top-1, top-5 (when there are more than 5 classes) and mean cross-entropy."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = 0
    loss_sum = 0.0
    total = 0
    num_classes = 0
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        logits = model(inputs)
        num_classes = logits.shape[1]
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        topk = logits.topk(min(5, num_classes), dim=1).indices
        correct1 += (topk[:, 0] == targets).sum().item()
        correct5 += (topk == targets[:, None]).any(dim=1).sum().item()
        total += targets.numel()
    model.train(was_training)
    if total == 0:
        raise DnnpruneError("the evaluation split is empty; check the dataset and --samples")
    top5 = correct5 / total if num_classes > 5 else None
    return EvalResult(correct1 / total, top5, loss_sum / total, total)


@dataclass
class TrainHistory:
    epochs: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "steps": self.steps, "seconds": self.seconds}


def total_steps(config: TrainSection | FineTuneSection, steps_per_epoch: int) -> int:
    by_epochs = math.ceil(config.epochs * steps_per_epoch)
    return min(by_epochs, config.max_steps) if config.max_steps else by_epochs


def train(model: nn.Module, train_loader: DataLoader, config: TrainSection | FineTuneSection, *,
          device: torch.device, val_loader: DataLoader | None = None, progress: Progress | None = None,
          description: str = "train", seed: int | None = None,
          after_step: Callable[[nn.Module], None] | None = None,
          log: Callable[[str], None] | None = None) -> TrainHistory:
    """SGD/Adam training with an optional L1 penalty on BN scales (network slimming).

    `after_step` runs after every optimizer step; pruning uses it to keep masked weights at zero.
    """
    seed_everything(getattr(config, "seed", 0) if seed is None else seed)
    model.to(device).train()
    steps_per_epoch = len(train_loader)
    steps = total_steps(config, steps_per_epoch)
    history = TrainHistory()
    if steps == 0:
        return history
    optimizer = _make_optimizer(model, config)
    scheduler = _make_scheduler(optimizer, config, steps)
    bn_l1 = getattr(config, "bn_l1", 0.0)
    label_smoothing = getattr(config, "label_smoothing", 0.0)
    start = time.perf_counter()
    task = progress.add_task(description, total=steps, info="") if progress else None
    step = 0
    epoch = 0
    while step < steps:
        epoch += 1
        running = _Running()
        for inputs, targets in train_loader:
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad(set_to_none=True)
            logits = model(inputs)
            loss = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
            loss.backward()
            if bn_l1 > 0:
                add_bn_l1_subgradient(model, bn_l1)
            optimizer.step()
            scheduler.step()
            if after_step is not None:
                after_step(model)
            running.update(loss.item(), logits.detach(), targets)
            step += 1
            if progress is not None and task is not None:
                progress.update(task, advance=1, info=f"epoch {epoch} loss {running.loss:.4f} acc {running.accuracy:.3f}")
            if step >= steps:
                break
        history.epochs.append(_epoch_row(model, epoch, step, running, optimizer, val_loader, device, config))
        if log is not None:
            log(_format_row(history.epochs[-1], time.perf_counter() - start))
    history.steps = step
    history.seconds = time.perf_counter() - start
    model.eval()
    return history


def _epoch_row(model: nn.Module, epoch: int, step: int, running: "_Running", optimizer: torch.optim.Optimizer,
               val_loader: DataLoader | None, device: torch.device, config: TrainSection | FineTuneSection) -> dict[str, Any]:
    row: dict[str, Any] = {"epoch": epoch, "step": step, "train_loss": running.loss,
                           "train_top1": running.accuracy, "lr": optimizer.param_groups[0]["lr"]}
    if val_loader is not None and getattr(config, "eval_every_epoch", True):
        result = evaluate(model, val_loader, device)
        row.update(val_top1=result.top1, val_loss=result.loss)
        model.train()
    return row


def _format_row(row: dict[str, Any], seconds: float) -> str:
    val = f" val_top1 {row['val_top1']:.4f}" if "val_top1" in row else ""
    return f"epoch {row['epoch']} step {row['step']} loss {row['train_loss']:.4f} top1 {row['train_top1']:.4f}{val} ({seconds:.0f} s)"


class _Running:
    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.correct = 0
        self.count = 0
        self.batches = 0

    def update(self, loss: float, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.loss_sum += loss
        self.batches += 1
        self.correct += (logits.argmax(1) == targets).sum().item()
        self.count += targets.numel()

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.batches)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.count)


def add_bn_l1_subgradient(model: nn.Module, strength: float) -> None:
    """Network slimming (Liu et al. 2017): d/dγ of λ·Σ|γ| is λ·sign(γ)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None and module.weight.grad is not None:
            module.weight.grad.add_(strength * torch.sign(module.weight.detach()))


def _make_optimizer(model: nn.Module, config: TrainSection | FineTuneSection) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
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


def progress_bar(transient: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        transient=transient,
    )


# ----------------------------------------------------------------------------- the `train` command


def build_model(source: str, recipe: Recipe) -> nn.Module:
    """A checkpoint path fine-tunes; an architecture name trains from scratch."""
    from pathlib import Path

    from dnnprune.checkpoint import load

    if source.endswith(".safetensors") or Path(source).is_file():
        return load(source)
    return _fresh_model(source, recipe)


def _fresh_model(arch: str, recipe: Recipe) -> nn.Module:
    from dnnprune.checkpoint import CheckpointMeta, attach_meta
    from dnnprune.data import DATASETS
    from dnnprune.errors import DatasetError, ModelError
    from dnnprune.models import create_model
    from dnnprune.models.registry import accepts_argument

    dataset = recipe.data.dataset
    if not dataset:
        raise DatasetError("training from scratch needs a dataset: set data.dataset in the recipe or pass --dataset")
    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}; choose one of {', '.join(sorted(DATASETS))}")
    base = _base_spec(dataset, recipe)
    shape = tuple(recipe.data.input_shape or base.shape)
    mean = tuple(recipe.data.mean or _fit(base.mean, shape[0]))
    std = tuple(recipe.data.std or _fit(base.std, shape[0]))
    classes = list(DATASETS[dataset].classes or [])
    args = {"num_classes": len(classes) or 2, "in_channels": shape[0], **recipe.model.args}
    if accepts_argument(arch, "input_size") and "input_size" not in args:
        args["input_size"] = shape[-1]
    if recipe.model.arch and recipe.model.arch != arch:
        raise ModelError(f"the command names {arch!r} but the recipe's model.arch is {recipe.model.arch!r}; make them agree")
    seed_everything(recipe.train.seed)
    model = create_model(arch, **args)
    meta = CheckpointMeta(arch=arch, arch_args=args, input_shape=shape, mean=mean, std=std, dataset=dataset,
                          classes=classes or None)
    return attach_meta(model, meta)


def _base_spec(dataset: str, recipe: Recipe) -> "InputSpec":
    """Tabular data's input shape comes from the file, images' from the dataset's defaults."""
    from dnnprune.data import DATASETS, default_spec, load_splits

    if DATASETS[dataset].kind == "tabular":
        section = recipe.data
        return load_splits(dataset, None, data_root=section.root, path=section.path, label_column=section.label_column,
                           val_fraction=section.val_fraction, seed=section.split_seed).spec
    return default_spec(dataset)


def _fit(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    return values if len(values) == channels else (sum(values) / len(values),) * channels


def fit(model: nn.Module, recipe: Recipe, *, device: torch.device, progress: Progress | None = None,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train or fine-tune per the recipe's train section, then measure on the test split."""
    from dnnprune.checkpoint import meta_of
    from dnnprune.loaders import eval_loader, train_loader
    from dnnprune.recipe import recipe_sha256

    meta = meta_of(model)
    if meta.encodings:
        from dnnprune.errors import CheckpointError

        raise CheckpointError("this checkpoint has quantized layers and training would move them off their codes; "
                              "train the float checkpoint, then quantize it")
    config = recipe.train
    seed_everything(config.seed)
    loader = train_loader(meta, recipe.data, config.batch_size, config.seed)
    val = eval_loader(meta, recipe.data, split="val")
    history = train(model, loader, config, device=device, val_loader=val, progress=progress, description="train", log=log)
    test = evaluate(model, eval_loader(meta, recipe.data, split="test"), device)
    model.to("cpu")
    metrics = {"test_top1": test.top1, "test_loss": test.loss, "steps": history.steps}
    meta.lineage_entry("train", recipe_sha256(recipe), metrics)
    return {"history": history.as_dict(), "test": test.as_dict(), "recipe": recipe.model_dump(mode="json")}
