"""`dnnprune train ARCH|CKPT -o OUT`: train from scratch or fine-tune."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from dnnprune.checkpoint import save
from dnnprune.cli._app import (
    DataRootOption,
    DatasetOption,
    DeviceOption,
    DownloadOption,
    ForceOption,
    OutputOption,
    RecipeOption,
    ReportOption,
    command,
    command_inputs,
    common_overrides,
    console,
    prepare_output,
    recipe_with,
    torchrun_session,
    write_command_report,
)
from dnnprune.cli._observer import RichObserver
from dnnprune.fresh import model_from_source
from dnnprune.training import TrainReport, train


@command("train")
def train_command(
    source: Annotated[str, typer.Argument(help="Architecture name (e.g. vgg16_bn, torchvision.resnet18) or a checkpoint to fine-tune.")],
    output: OutputOption,
    recipe: RecipeOption = None,
    report: ReportOption = None,
    epochs: Annotated[float | None, typer.Option(help="Epochs (may be fractional).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimizer steps.")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Training batch size.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for init, shuffling and augmentation.")] = None,
    train_limit: Annotated[int | None, typer.Option(help="Use only this many training samples.")] = None,
    dataset: DatasetOption = None,
    data_root: DataRootOption = None,
    download: DownloadOption = None,
    device: DeviceOption = None,
    force: ForceOption = False,
) -> None:
    """Train a model from scratch, or fine-tune a checkpoint, per the recipe's train section.

    A sparse checkpoint keeps its zeros; a quantized one trains its centroids (k-means) or scales
    (linear) with the codes frozen, so the result stays as small as its input.
    """
    overrides = {"train.epochs": epochs, "train.max_steps": max_steps, "train.lr": lr, "train.batch_size": batch_size,
                 "train.seed": seed, "data.train_limit": train_limit, **common_overrides(device, data_root, dataset, download)}
    config = recipe_with(recipe, overrides)
    source_path = Path(source)
    inputs = command_inputs(source_path if source_path.exists() else None, recipe, config)
    report_path = prepare_output(output, force=force, inputs=inputs, report=report)
    model = model_from_source(source, config.model, config.data, config.train.seed)
    with torchrun_session(config.device) as (rank, _, device), RichObserver(console, enabled=rank == 0) as observer:
        model, result = train(model, config.train, data=config.data, device=device, observer=observer)
    if rank != 0:
        return
    save(model, output, force=force, protect=inputs)
    path = write_command_report("train", result, report_path, {"source": source, "recipe": recipe})
    _print_summary(result, output, path)


def _print_summary(result: TrainReport, output: Path, report_path: Path) -> None:
    key = f"val_{result.primary_metric}"
    rows = result.history["epochs"]
    classifier = any(row.get("train_top1") is not None for row in rows)
    table = Table(title="training")
    for column in ("epoch", "train loss", *(["train top-1"] if classifier else []), f"val {result.primary_metric}", "lr"):
        table.add_column(column, justify="right")
    for row in rows:
        top1 = [_number(row.get("train_top1"))] if classifier else []
        table.add_row(str(row["epoch"]), f"{row['train_loss']:.4f}", *top1, _number(row.get(key)), f"{row['lr']:.2e}")
    console.print(table)
    for warning in result.warnings:
        console.print(f"[yellow]warning: {warning}[/]", highlight=False)
    console.print(f"test {result.primary_metric} {_number(result.test.get(result.primary_metric))}  ->  {output}  "
                  f"(report {report_path})")


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"
