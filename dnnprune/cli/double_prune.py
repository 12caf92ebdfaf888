"""`dnnprune double-prune CKPT -o OUT`: network slimming, then unstructured parameter pruning stored sparse."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from dnnprune.cli._app import (
    DataRootOption,
    DatasetOption,
    DeviceOption,
    DistillOption,
    DownloadOption,
    ForceOption,
    OutputOption,
    RecipeOption,
    ReportOption,
    TeacherOption,
    command,
    command_inputs,
    common_overrides,
    console,
    distill_overrides,
    prepare_output,
    recipe_with,
    run_and_save,
    write_command_report,
)
from dnnprune.fresh import load_for_recipe
from dnnprune.pruning.double import DoublePruneReport, double_prune


@command("double-prune")
def double_prune_command(
    checkpoint: Annotated[Path, typer.Argument(help="A dnnprune checkpoint (.safetensors) with BatchNorm layers.")],
    output: OutputOption,
    recipe: RecipeOption = None,
    report: ReportOption = None,
    slimming_ratio: Annotated[float | None, typer.Option(help="Fraction of BN channels to remove, in \\[0, 1); 0 skips slimming.")] = None,
    slimming_rounds: Annotated[int | None, typer.Option(help="Slim in this many rounds, each followed by its share of the fine-tune steps.")] = None,
    sparsity: Annotated[float | None, typer.Option(help="Fraction of the remaining weights to zero, in \\[0, 1); 0 skips it.")] = None,
    sparsity_lambda: Annotated[float | None, typer.Option(help="L1 strength on BN scales \\[default 1e-4; 1e-5 for residual nets].")] = None,
    sparsity_steps: Annotated[int | None, typer.Option(help="Training steps with that penalty before slimming (0: already trained with it).")] = None,
    finetune_steps: Annotated[int | None, typer.Option(help="Training steps after each stage.")] = None,
    threshold: Annotated[str | None, typer.Option(help="Parameter pruning threshold: layer (quality x std) or global.")] = None,
    samples: Annotated[int | None, typer.Option(help="Stage metrics on stratified val/test subsets of this size.")] = None,
    evaluate: Annotated[bool | None, typer.Option("--evaluate/--no-evaluate", help="Measure val/test metrics after each stage.")] = None,
    sparse_execution: Annotated[bool | None, typer.Option("--sparse-execution/--no-sparse-execution", help="Also time sparse Linear layers with CSR kernels.")] = None,
    distill: DistillOption = None,
    teacher: TeacherOption = None,
    dataset: DatasetOption = None,
    data_root: DataRootOption = None,
    download: DownloadOption = None,
    device: DeviceOption = None,
    force: ForceOption = False,
) -> None:
    """Network slimming (BN-scale L1, then one global channel threshold), then gradual magnitude pruning."""
    overrides = {"double_prune.slimming_ratio": slimming_ratio, "double_prune.slimming_rounds": slimming_rounds,
                 "double_prune.sparsity": sparsity,
                 "double_prune.sparsity_lambda": sparsity_lambda, "double_prune.sparsity_steps": sparsity_steps,
                 "double_prune.finetune_steps": finetune_steps, "double_prune.threshold": threshold,
                 "double_prune.samples": samples, "double_prune.evaluate": evaluate,
                 "double_prune.sparse_execution": sparse_execution, **distill_overrides(("double_prune.finetune",), distill, teacher),
                 **common_overrides(device, data_root, dataset, download)}
    config = recipe_with(recipe, overrides)
    inputs = command_inputs(checkpoint, recipe, config)
    report_path = prepare_output(output, force=force, inputs=inputs, report=report)
    result = run_and_save(double_prune, load_for_recipe(checkpoint, config.model), config.double_prune, config, output, force=force,
                          inputs=inputs)
    if result is None:
        return
    result.totals["file_bytes"] = output.stat().st_size
    result.totals["compression_vs_fp32"] = result.totals["fp32_bytes_before"] / max(1, output.stat().st_size)
    # The stages' bytes are predicted from the tensors (no header); the file itself is what the line below reports.
    result.totals["effective_bits_per_weight"] = 8.0 * output.stat().st_size / max(1, result.stages[-1]["params"])
    if "bits_per_nonzero_weight" in result.totals:
        result.totals["bits_per_nonzero_weight"] = 8.0 * output.stat().st_size / max(1, result.stages[-1]["nonzero_params"])
    path = write_command_report("double-prune", result, report_path, {"checkpoint": str(checkpoint), "recipe": recipe})
    console.print(stage_table(result))
    totals = result.totals
    console.print(f"non-zero parameters {totals['nonzero_reduction']:.2f}x fewer, MACs {totals['macs_reduction']:.2f}x "
                  f"fewer; file {totals['file_bytes']:,} bytes ({totals['compression_vs_fp32']:.2f}x smaller than "
                  f"fp32, {totals['effective_bits_per_weight']:.2f} bits per weight)")
    console.print(f"-> {output}  (report {path}, {result.seconds['total']:.1f} s)")


def stage_table(result: DoublePruneReport) -> Table:
    metric = result.primary_metric
    table = Table(title=f"double-prune: {result.arch}")
    for column in ("stage", f"val {metric}", f"test {metric}", "params", "non-zero", "MACs", "file bytes (est.)",
                   "NetScore", "NetScore (non-zero)"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for row in result.stages:
        table.add_row(row["stage"], _metric(row.get("val"), metric), _metric(row.get("test"), metric),
                      f"{row['params']:,}", f"{row['nonzero_params']:,}", f"{row['macs']:,}", f"{row['bytes']:,}",
                      _score(row, "value"), _score(row, "value_nonzero"))
    table.caption = result.netscore_note
    return table


def _metric(split: dict[str, Any] | None, metric: str) -> str:
    value = split.get(metric) if split else None
    return "-" if value is None else f"{value:.4f}"


def _score(row: dict[str, Any], key: str) -> str:
    value = (row.get("netscore") or {}).get(key)
    return "-" if value is None else f"{value:.2f}"
