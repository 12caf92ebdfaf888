"""`dnnprune score CKPT`: accuracy, size, MACs, bytes, latency and NetScore."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from dnnprune.checkpoint import load
from dnnprune.cli._app import DataRootOption, DatasetOption, DeviceOption, DownloadOption, RecipeOption, ReportOption, command, console, recipe_with, common_overrides
from dnnprune.report import default_report_path, envelope, write_report
from dnnprune.scoring import score_model
from dnnprune.training import resolve_device


@command("score")
def score_command(
    checkpoint: Annotated[Path, typer.Argument(help="A dnnprune checkpoint (.safetensors).")],
    recipe: RecipeOption = None,
    report: ReportOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON report instead of the table.")] = False,
    samples: Annotated[int | None, typer.Option(help="Score on a class-stratified test subset of this size.")] = None,
    latency: Annotated[bool | None, typer.Option("--latency/--no-latency", help="Measure CPU latency.")] = None,
    dataset: DatasetOption = None,
    data_root: DataRootOption = None,
    download: DownloadOption = None,
    device: DeviceOption = None,
) -> None:
    """Score a checkpoint on its test split; the report lands next to it as NAME.score.json."""
    config = recipe_with(recipe, {"score.samples": samples, "score.latency": latency,
                                  **common_overrides(device, data_root, dataset, download)})
    model = load(checkpoint)
    result = score_model(model, config, device=resolve_device(config.device), checkpoint_path=checkpoint)
    full = envelope("score", result, inputs={"checkpoint": str(checkpoint), "recipe": recipe})
    path = report or default_report_path(checkpoint, ".score.json")
    write_report(path, full)
    if as_json:
        console.print_json(json.dumps(full, default=str))
    else:
        console.print(score_table(result))
        console.print(f"report: {path}")


def score_table(result: dict[str, Any]) -> Table:
    table = Table(title=f"score: {result['arch']} on {result['dataset']} ({result['split']})", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    acc = result["accuracy"]
    table.add_row("top-1", f"{acc['top1'] * 100:.2f} %")
    if acc["top5"] is not None:
        table.add_row("top-5", f"{acc['top5'] * 100:.2f} %")
    table.add_row("samples", str(acc["samples"]))
    table.add_row("parameters", f"{result['params']:,}")
    table.add_row("non-zero parameters", f"{result['nonzero_params']:,}")
    table.add_row("MACs (batch 1)", f"{result['macs']:,}")
    if result["disk_bytes"] is not None:
        table.add_row("bytes on disk", f"{result['disk_bytes']:,}")
        table.add_row("bits per weight", f"{result['bits_per_weight']:.2f}")
    for row in result["latency"]:
        table.add_row(f"CPU latency, batch {row['batch_size']}", f"{row['median_ms']:.2f} ms (median of {row['repeats']})")
    ns = result["netscore"]
    table.add_row("NetScore", f"{ns['value']:.2f}  (α={ns['alpha']}, β={ns['beta']}, γ={ns['gamma']}; p, m in millions)")
    return table
