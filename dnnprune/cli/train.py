"""`dnnprune train ARCH|CKPT -o OUT`: train from scratch or fine-tune."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from dnnprune.checkpoint import save
from dnnprune.cli._app import (DataRootOption, DatasetOption, DeviceOption, DownloadOption, ForceOption, OutputOption,
                               RecipeOption, ReportOption, command, common_overrides, console, finish_report,
                               prepare_output, recipe_with)
from dnnprune.report import envelope
from dnnprune.training import build_model, fit, progress_bar, resolve_device


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
    """Train a model from scratch, or fine-tune a checkpoint, per the recipe's train section."""
    overrides = {"train.epochs": epochs, "train.max_steps": max_steps, "train.lr": lr, "train.batch_size": batch_size,
                 "train.seed": seed, "data.train_limit": train_limit, **common_overrides(device, data_root, dataset, download)}
    config = recipe_with(recipe, overrides)
    source_path = Path(source)
    prepare_output(output, force=force, inputs=(source_path,) if source_path.exists() else ())
    model = build_model(source, config)
    with progress_bar() as progress:
        result = fit(model, config, device=resolve_device(config.device), progress=progress, log=progress.console.print)
    save(model, output, force=force, protect=(source_path,))
    path = finish_report(envelope("train", result, inputs={"source": source, "recipe": recipe}), output, report)
    _print_summary(result, output, path)


def _print_summary(result: dict, output: Path, report_path: Path) -> None:
    table = Table(title="training")
    for column in ("epoch", "train loss", "train top-1", "val top-1", "lr"):
        table.add_column(column, justify="right")
    for row in result["history"]["epochs"]:
        table.add_row(str(row["epoch"]), f"{row['train_loss']:.4f}", f"{row['train_top1']:.4f}",
                      f"{row.get('val_top1', float('nan')):.4f}", f"{row['lr']:.2e}")
    console.print(table)
    console.print(f"test top-1 {result['test']['top1']:.4f}  ->  {output}  (report {report_path})")
