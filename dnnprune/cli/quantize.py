"""`dnnprune quantize CKPT -o OUT`: linear or k-means weight quantization, stored packed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

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
from dnnprune.errors import DnnpruneError
from dnnprune.fresh import load_for_recipe
from dnnprune.quantization import QuantizeReport, quantize


@command("quantize")
def quantize_command(
    checkpoint: Annotated[Path, typer.Argument(help="A dnnprune checkpoint (.safetensors), pruned or not.")],
    output: OutputOption,
    recipe: RecipeOption = None,
    report: ReportOption = None,
    bits: Annotated[int | None, typer.Option(help="Bits per weight, 2..8.")] = None,
    method: Annotated[str | None, typer.Option(help="linear (symmetric, per output channel) or kmeans (weight sharing).")] = None,
    layers: Annotated[list[str] | None, typer.Option("--layers", help="Layer pattern (glob on names, or type:Linear); repeatable.")] = None,
    layer_bits: Annotated[list[str] | None, typer.Option("--layer-bits", help="PATTERN=BITS, e.g. type:Conv2d=8; repeatable; replaces the recipe's layer_bits.")] = None,
    finetune_epochs: Annotated[float | None, typer.Option(help="Fine-tune centroids (kmeans) or scales (linear) with codes frozen.")] = None,
    finetune_steps: Annotated[int | None, typer.Option(help="Stop fine-tuning after this many steps.")] = None,
    finetune_lr: Annotated[float | None, typer.Option(help="Fine-tune learning rate \\[default 0.01].")] = None,
    samples: Annotated[int | None, typer.Option(help="Measure accuracy on a class-stratified test subset of this size.")] = None,
    evaluate: Annotated[bool | None, typer.Option("--evaluate/--no-evaluate", help="Measure accuracy before and after.")] = None,
    int8_execution: Annotated[bool | None, typer.Option("--int8-execution/--no-int8-execution", help="Also time torch's int8 Linear execution on the CPU.")] = None,
    distill: DistillOption = None,
    teacher: TeacherOption = None,
    dataset: DatasetOption = None,
    data_root: DataRootOption = None,
    download: DownloadOption = None,
    device: DeviceOption = None,
    force: ForceOption = False,
) -> None:
    """Quantize the selected layers' weights; the checkpoint stores them packed and reloads them exactly."""
    overrides = {"quantize.bits": bits, "quantize.method": method, "quantize.layers": list(layers) if layers else None,
                 "quantize.layer_bits": _parse_layer_bits(layer_bits), "quantize.finetune.epochs": finetune_epochs,
                 "quantize.finetune.max_steps": finetune_steps, "quantize.finetune.lr": finetune_lr, "quantize.samples": samples, "quantize.evaluate": evaluate,
                 "quantize.int8_execution": int8_execution, **distill_overrides(("quantize.finetune",), distill, teacher), **common_overrides(device, data_root, dataset, download)}
    config = recipe_with(recipe, overrides)
    inputs = command_inputs(checkpoint, recipe, config)
    report_path = prepare_output(output, force=force, inputs=inputs, report=report)
    result = run_and_save(quantize, load_for_recipe(checkpoint, config.model), config.quantize, config, output, force=force, inputs=inputs)
    if result is None:
        return
    result.with_file_sizes(checkpoint, output)
    path = write_command_report("quantize", result, report_path, {"checkpoint": str(checkpoint), "recipe": recipe})
    console.print(_table(result))
    console.print(_summary(result, output, path))


def _parse_layer_bits(items: list[str] | None) -> dict[str, int] | None:
    if not items:
        return None
    parsed: dict[str, int] = {}
    for item in items:
        pattern, sep, value = item.rpartition("=")
        if not sep or not pattern or not value.strip().lstrip("-").isdigit():
            raise DnnpruneError(f"--layer-bits takes PATTERN=BITS, e.g. type:Conv2d=8; got {item!r}")
        parsed[pattern] = int(value)
    return parsed


def _table(body: QuantizeReport) -> Table:
    table = Table(title=f"quantize ({body.method})")
    for column, justify in (("layer", "left"), ("type", "left"), ("bits", "right"), ("params", "right"),
                            ("MSE", "right"), ("SQNR dB", "right"), ("bytes", "right"), ("ratio", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in body.layers:
        sqnr = row["sqnr_db"]
        table.add_row(row["name"], row["type"], str(row["bits"]), f"{row['params']:,}", f"{row['mse']:.2e}",
                      "exact" if math.isinf(sqnr) else f"{sqnr:.1f}",
                      f"{row['bytes_before']:,} -> {row['bytes_after']:,}", f"{row['bytes_before'] / row['bytes_after']:.1f}x")
    return table


def _summary(body: QuantizeReport, output: Path, report_path: Path) -> str:
    totals = body.totals
    lines = [f"kept as it was: {name} ({why}; quantize.keep_larger: true encodes it anyway)"
             for name, why in body.kept_as_is.items()]
    if body.not_quantizable:
        left = sum(body.not_quantizable.values())
        example = next(iter(body.not_quantizable))
        lines.append(f"not quantizable here: {len(body.not_quantizable)} tensor(s), {left:,} parameters "
                     f"({left / max(1, totals['params']):.1%} of the model) stay float32, e.g. {example} (only Linear "
                     "and Conv weights are encoded; the report's not_quantizable lists them)")
    before = totals["disk_bytes_before"]
    lines.append(f"file {before:,} -> {totals['disk_bytes_after']:,} bytes ({totals['compression']:.2f}x), "
                 f"{totals['effective_bits_per_weight']:.2f} bits per weight, predicted {totals['predicted_file_bytes']:,}")
    acc, key = body.metrics, body.primary_metric
    tune = body.finetune or {}
    if "kept" in tune:
        verdict = "kept" if tune["kept"] else "undone (it lowered val; the codes before it are kept; try a smaller --finetune-lr)"
        lines.append(f"fine-tune {verdict}: val {key} {tune['val_before']:.4f} -> {tune['val_after']:.4f}")
    if acc["before"] and acc["after"]:
        lines.append(f"test {key} {acc['before'][key]:.4f} -> {acc['after'][key]:.4f} on {acc['after']['samples']} samples")
    int8 = body.int8_execution
    if int8 is not None:
        if int8["available"]:
            lines += [f"int8 Linear execution, batch {r['batch_size']}: {r['fp32_median_ms']:.2f} ms -> {r['int8_median_ms']:.2f} ms"
                      for r in int8["latency"]]
        else:
            lines.append(f"int8 execution not measured: {int8['reason']}")
    lines.append(f"-> {output}  (report {report_path})")
    return "\n".join(lines)
