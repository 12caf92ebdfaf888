"""`dnnprune export CKPT -o MODEL.onnx`: ONNX with a dynamic batch axis, checked with onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from dnnprune.cli._app import (
    ForceOption,
    RecipeOption,
    ReportOption,
    command,
    command_inputs,
    console,
    prepare_output,
    recipe_with,
    write_command_report,
)
from dnnprune.fresh import load_for_recipe
from dnnprune.onnx_export import ExportReport, export


@command("export")
def export_command(
    checkpoint: Annotated[Path, typer.Argument(help="A dnnprune checkpoint (.safetensors).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="ONNX file to write (.onnx).")],
    recipe: RecipeOption = None,
    report: ReportOption = None,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (13-23).")] = None,
    exporter: Annotated[str | None, typer.Option(help="torch.onnx exporter: torchscript or dynamo.")] = None,
    tolerance: Annotated[float | None, typer.Option(help="Largest |torch - onnxruntime| accepted, as a fraction of the largest |output| (default 1e-4).")] = None,
    latency: Annotated[bool | None, typer.Option("--latency/--no-latency", help="Time PyTorch and onnxruntime on the CPU.")] = None,
    raw_inputs: Annotated[bool | None, typer.Option("--raw-inputs/--scaled-inputs", help="Put the input scaling inside the graph: it then takes pixels in [0, 1] (or a table's raw values) at the model's shape.")] = None,
    force: ForceOption = False,
) -> None:
    """Export the rebuilt model to ONNX; quantized and sparse layers are written dense, and the report says so."""
    config = recipe_with(recipe, {"export.opset": opset, "export.exporter": exporter, "export.tolerance": tolerance,
                                  "export.latency": latency, "export.raw_inputs": raw_inputs})
    report_path = prepare_output(output, force=force, inputs=command_inputs(checkpoint, recipe, config), report=report,
                                 suffix=".export.json", output_suffix=".onnx")
    model = load_for_recipe(checkpoint, config.model)
    _, result = export(model, config.export, output=output, force=force)
    path = write_command_report("export", result, report_path, {"checkpoint": str(checkpoint), "recipe": recipe})
    console.print(_table(result))
    for warning in result.warnings:
        console.print(f"[yellow]warning: {warning}[/]", highlight=False)
    console.print(f"-> {output}  (report {path})")


def _table(result: ExportReport) -> Table:
    table = Table(title=f"export: {result.output} (opset {result.opset}, {result.exporter} exporter)")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("ONNX bytes", f"{result.onnx_bytes:,}")
    table.add_row("input", f"{result.input_name} {result.input_shape}")
    table.add_row("input expects", result.preprocessing.get("expects", ""))
    table.add_row("onnxruntime vs PyTorch, max |diff|", f"{result.parity['max_abs_diff']:.2e} on {result.parity['samples']} samples")
    if result.dense_layers:
        table.add_row("written dense (encoded in the checkpoint)", f"{len(result.dense_layers)} tensors")
    for row in result.latency:
        table.add_row(f"latency batch {row['batch_size']}: PyTorch / onnxruntime",
                      f"{row['torch_ms']:.2f} ms / {row['onnxruntime_ms']:.2f} ms")
    return table
