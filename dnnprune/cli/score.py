"""`dnnprune score CKPT`: the task's metrics, size, MACs, bytes, latency and NetScore."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from dnnprune.cli._app import (
    DataRootOption,
    DatasetOption,
    DeviceOption,
    DownloadOption,
    ForceOption,
    RecipeOption,
    ReportOption,
    check_report_path,
    command,
    command_inputs,
    common_overrides,
    console,
    recipe_with,
    write_command_report,
)
from dnnprune.fresh import load_for_recipe
from dnnprune.reports import default_report_path, envelope
from dnnprune.scoring import ScoreReport, score

_LABELS = {"top1": "top-1", "top5": "top-5", "loss": "loss", "mse": "MSE", "roc_auc": "ROC-AUC",
           "pr_auc": "PR-AUC (average precision)", "anomaly_rate": "anomaly rate", "mse_normal": "MSE of normal samples",
           "threshold": "threshold", "precision": "precision (of flagged)", "recall": "recall (anomalies flagged)",
           "f1": "F1 (finding anomalies)",
           "flagged_rate": "flagged (above the threshold)", "false_positive_rate": "normal samples flagged"}
_PERCENT = {"top1", "top5", "roc_auc", "pr_auc", "anomaly_rate", "precision", "recall", "f1", "flagged_rate",
            "false_positive_rate"}


@command("score")
def score_command(
    checkpoint: Annotated[Path, typer.Argument(help="A dnnprune checkpoint (.safetensors).")],
    recipe: RecipeOption = None,
    report: ReportOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON report instead of the table.")] = False,
    split: Annotated[str | None, typer.Option(help="What to score: test (the default), val, or all (every sample the data holds: a hold-out file of your own).")] = None,
    samples: Annotated[int | None, typer.Option(help="Score on a class-stratified subset of the split of this size.")] = None,
    latency: Annotated[bool | None, typer.Option("--latency/--no-latency", help="Measure CPU latency.")] = None,
    latency_runtime: Annotated[str | None, typer.Option(help="eager (PyTorch as trained), fused (TorchScript-frozen, BatchNorm folded into the convs, oneDNN layouts kept: as deployed) or onnxruntime (the ONNX export on onnxruntime's CPU provider, torch's thread count).")] = None,
    dataset: DatasetOption = None,
    data_root: DataRootOption = None,
    download: DownloadOption = None,
    device: DeviceOption = None,
    force: ForceOption = False,
) -> None:
    """Score a checkpoint on its test split (or --split val/all); the report lands next to it as NAME.score.json."""
    config = recipe_with(recipe, {"score.split": split, "score.samples": samples, "score.latency": latency, "score.latency_config.runtime": latency_runtime,
                                  **common_overrides(device, data_root, dataset, download)})
    path = report or default_report_path(checkpoint, ".score.json")
    check_report_path(path, force=force, inputs=command_inputs(checkpoint, recipe, config))
    model = load_for_recipe(checkpoint, config.model)
    _, result = score(model, config.score, data=config.data, device=config.device, checkpoint_path=checkpoint)
    inputs = {"checkpoint": str(checkpoint), "recipe": recipe}
    write_command_report("score", result, path, inputs)
    if as_json:
        console.print_json(json.dumps(envelope("score", result, inputs=inputs), default=str))
    else:
        console.print(score_table(result))
        console.print(f"report: {path}")


def _scored(result: ScoreReport) -> str:
    """Which samples the numbers are from, so a user scoring a file of their own sees what was left out."""
    scored = result.metrics.get("samples")
    if result.split == "all" or not isinstance(scored, int) or result.dataset_samples is None:
        return f"{result.split}: {scored:,} samples" if isinstance(scored, int) else result.split
    if result.split_samples is not None and scored < result.split_samples:
        return (f"{result.split} split: a stratified {scored:,} of its {result.split_samples:,}; the data holds "
                f"{result.dataset_samples:,} (--split all scores every one)")
    return f"{result.split} split: {scored:,} of the data's {result.dataset_samples:,} samples; --split all scores every one"


def score_table(result: ScoreReport) -> Table:
    table = Table(title=f"score: {result.arch} on {result.dataset} ({_scored(result)})", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.metrics.items():
        if key == "samples" or value is None:
            continue
        shown = f"{value * 100:.2f} %" if key in _PERCENT else f"{value:.6g}"
        table.add_row(_LABELS.get(key, key) + (" (primary)" if key == result.primary_metric else ""), shown)
    table.add_row("samples", str(result.metrics["samples"]))
    if result.threshold_source is not None:
        table.add_row("threshold from", result.threshold_source)
    table.add_row("parameters", f"{result.params:,}")
    table.add_row("non-zero parameters", f"{result.nonzero_params:,}")
    table.add_row("MACs (batch 1)", f"{result.macs:,}")
    if result.disk_bytes is not None:
        table.add_row("bytes on disk", f"{result.disk_bytes:,}")
        table.add_row("bits per weight", f"{result.bits_per_weight:.2f}")
    for row in result.latency:
        table.add_row(f"CPU latency, batch {row['batch_size']}",
                      f"{row['median_ms']:.2f} ms (median of {row['repeats']}, {row.get('runtime', 'eager')})")
    ns = result.netscore
    if ns["value"] is None:
        table.add_row("NetScore", f"n/a ({ns['note']})")
    else:
        table.add_row("NetScore (all params)", f"{ns['value']:.2f}  (α={ns['alpha']}, β={ns['beta']}, γ={ns['gamma']}; "
                                               "p, m in millions)")
        table.add_row("NetScore (non-zero params)", f"{ns['value_nonzero']:.2f}")
    return table
