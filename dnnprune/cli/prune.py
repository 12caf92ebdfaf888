"""`dnnprune prune CKPT -o OUT`: structured (channel) pruning that really removes channels."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Mapping

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
from dnnprune.pruning import PruneReport, prune
from dnnprune.pruning.structured import parse_target


@command("prune")
def prune_command(
    checkpoint: Annotated[Path, typer.Argument(help="A dnnprune checkpoint (.safetensors).")],
    output: OutputOption,
    recipe: RecipeOption = None,
    report: ReportOption = None,
    granularity: Annotated[str | None, typer.Option(help="filter: remove channels; layer: remove whole units (blocks, layers).")] = None,
    ratio: Annotated[float | None, typer.Option(help="Fraction of channels to remove from every layer, in \\[0, 1).")] = None,
    remove: Annotated[int | None, typer.Option(help="Layer granularity: remove this many units.")] = None,
    units: Annotated[str | None, typer.Option(help="Layer granularity: remove exactly these units, comma-separated (e.g. layer4.0,layer4.1).")] = None,
    target: Annotated[str | None, typer.Option(help="METRIC:FACTOR, e.g. macs:3 for 3x fewer MACs, latency:2 for a measured 2x speedup (params, macs, bytes or latency).")] = None,
    criterion: Annotated[str | None, typer.Option(help="l1, l2, bn_scale, taylor or random.")] = None,
    order: Annotated[str | None, typer.Option(help="sequential, reverse, sensitivity, random, or (--granularity layer) efficiency: "
                                                   "least drop per parameter or MAC saved first.")] = None,
    analysis: Annotated[Path | None, typer.Option(help="Report from `dnnprune analyze` (for --order sensitivity).")] = None,
    accuracy_aware: Annotated[bool | None, typer.Option("--accuracy-aware/--one-shot", help="Prune step by step, fine-tuning and backing off layers that lose accuracy.")] = None,
    global_threshold: Annotated[bool | None, typer.Option("--global/--per-layer", help="One threshold over all layers' normalised scores.")] = None,
    max_accuracy_drop: Annotated[float | None, typer.Option(help="Accuracy-aware: largest val top-1 drop a step may cause (0.01 = 1 point).")] = None,
    step: Annotated[float | None, typer.Option(help="Accuracy-aware: ratio added to a layer per step.")] = None,
    target_basis: Annotated[str | None, typer.Option(help="input: count --target from this checkpoint; original: from the model its lineage started with (params, macs), so chained prunes share one target.")] = None,
    round_to: Annotated[int | None, typer.Option(help="Keep channel counts a multiple of this (8 suits CPU kernels).")] = None,
    latency_widths: Annotated[bool | None, typer.Option("--latency-widths/--no-latency-widths", help="Move each width to the fastest nearby one (measured, cached).")] = None,
    plan_cost: Annotated[str | None, typer.Option(help="Accuracy-aware increments: none cuts every layer to one predicted drop; macs or latency cut where the predicted drop per MAC, or per measured ms on --latency-runtime, saved is least.")] = None,
    report_latency: Annotated[bool | None, typer.Option("--report-latency/--no-report-latency", help="Time the model before and after (batch 1 and 64, interleaved).")] = None,
    latency_runtime: Annotated[str | None, typer.Option(help="What latency is timed on: eager (PyTorch as trained), fused (TorchScript-frozen, BatchNorm folded into the convs, oneDNN layouts kept: as deployed) or onnxruntime (the ONNX export).")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Layer pattern to leave alone (glob or type:NAME); repeatable.")] = None,
    samples: Annotated[int | None, typer.Option(help="Before/after accuracy on stratified subsets of this size.")] = None,
    evaluate: Annotated[bool | None, typer.Option("--evaluate/--no-evaluate", help="Measure val/test accuracy before and after (needs the dataset).")] = None,
    distill: DistillOption = None,
    teacher: TeacherOption = None,
    dataset: DatasetOption = None,
    data_root: DataRootOption = None,
    download: DownloadOption = None,
    device: DeviceOption = None,
    force: ForceOption = False,
) -> None:
    """Remove whole channels (filters) so the saved model is really smaller and faster."""
    metric, factor = parse_target(target) if target is not None else (None, None)
    overrides = {"prune.granularity": granularity, "prune.remove": remove, "prune.units": _names(units), "prune.ratio": ratio, "prune.target": metric, "prune.target_factor": factor, "prune.target_basis": target_basis,
                 "prune.criterion": criterion, "prune.order": order, "prune.analysis": str(analysis) if analysis else None,
                 "prune.accuracy_aware": accuracy_aware, "prune.global_threshold": global_threshold,
                 "prune.max_accuracy_drop": max_accuracy_drop, "prune.step": step, "prune.round_to": round_to, "prune.latency_widths": latency_widths, "prune.plan_cost": plan_cost, "prune.report_latency": report_latency, "prune.latency_runtime": latency_runtime, "prune.exclude": exclude or None,
                 "prune.samples": samples, "prune.evaluate": evaluate, **distill_overrides(("prune.step_finetune", "prune.finetune"), distill, teacher), **common_overrides(device, data_root, dataset, download)}
    config = recipe_with(recipe, overrides)
    inputs = command_inputs(checkpoint, recipe, config)
    report_path = prepare_output(output, force=force, inputs=inputs, report=report)
    result = run_and_save(prune, load_for_recipe(checkpoint, config.model), config.prune, config, output, force=force, inputs=inputs,
                          formatter=_row_line)
    if result is None:
        return
    inputs = {"checkpoint": str(checkpoint), "recipe": recipe, "analysis": config.prune.analysis}
    path = write_command_report("prune", result, report_path, inputs)
    _print_summary(result, output, path)


def _row_line(kind: str, row: Mapping[str, Any]) -> str | None:
    if kind == "prune.step":
        return _step_line(row)
    if kind == "prune.layer":
        return _layer_line(row)
    if kind == "prune.increment":
        return _increment_line(row)
    return None


def _increment_line(row: Mapping[str, Any]) -> str:
    if "val" not in row:
        return f"increment {row['increment']} (try {row['attempt']}): [yellow]{row.get('reason', 'stopped')}[/]"
    verdict = "[green]kept[/]" if row["accepted"] else "[red]undone[/]"
    error = f" ± {row['drop_stderr'] * 100:.2f}" if row.get("drop_stderr") is not None else ""
    return (f"increment {row['increment']} (try {row['attempt']}): {row['layers_cut']} layers, -{row['channels_removed']} "
            f"channels -> params {row['params']:,} MACs {row['macs']:,}  val {row['val']:.4f}  drop "
            f"{row['drop'] * 100:.2f}{error} pts  {verdict}  ({row['seconds']:.0f} s)")


def _layer_line(row: Mapping[str, Any]) -> str:
    verdict = "[green]removed[/]" if row["accepted"] else "[red]put back (drop over budget)[/]"
    measured = f"  val {row['val']:.4f}  drop {row['drop'] * 100:.2f} pts" if "val" in row else ""
    return (f"step {row['step']:>3}  {row['unit']:<28} {row['kind']:<6} -{row['unit_params']:,} params "
            f"-{row['unit_macs']:,} MACs  now {row['params']:,} params {row['macs']:,} MACs{measured}  {verdict}")


def _step_line(row: Mapping[str, Any]) -> str:
    verdict = "[green]kept[/]" if row["accepted"] else "[red]undone[/]"
    return (f"step {row['step']:>3}  {row['layer']:<28} ratio {row['ratio']:.2f}  width {row['width_before']}->"
            f"{row['width_after']}  params {row['params']:,}  MACs {row['macs']:,}  val {row['val']:.4f}"
            f"  drop {row['drop'] * 100:.2f} pts  {verdict}{_step_notes(row)}")


def _step_notes(row: Mapping[str, Any]) -> str:
    notes = ["jump to the suggested ratio"] if row.get("kind") == "jump" else []
    if row.get("finetune_steps") and not row.get("finetune_kept"):
        notes.append("fine-tune rolled back")
    return f" ({'; '.join(notes)})" if notes else ""


def _print_summary(result: PruneReport, output: Path, report_path: Path) -> None:
    table = Table(title=f"prune: {result.arch} ({result.mode}, {result.criterion})")
    for column in ("", "before", "after", "reduction"):
        table.add_column(column, justify="right")
    before, after, metric = result.before, result.after, result.primary_metric
    for key in ("params", "macs", "bytes"):
        table.add_row("bytes (as stored)" if key == "bytes" else key, f"{before[key]:,}", f"{after[key]:,}",
                      f"{result.reduction[key]:.2f}x")
        if key == "params" and "nonzero_params" in before and "nonzero_params" in after:
            table.add_row("non-zero params", f"{before['nonzero_params']:,}", f"{after['nonzero_params']:,}",
                          f"{before['nonzero_params'] / max(1, after['nonzero_params']):.2f}x")
    for split in ("val", "test"):
        drop = result.accuracy_drop.get(split)
        if before.get(split) and after.get(split) and drop is not None:
            table.add_row(f"{split} {metric}", f"{before[split][metric]:.4f}", f"{after[split][metric]:.4f}",
                          f"{-drop * 100:+.2f} {'pts' if result.higher_is_better else '%'}")
    for row in (result.latency or {}).get("rows", []):
        table.add_row(f"latency batch {row['batch_size']} ({result.latency.get('runtime', 'eager')})",
                      f"{row['before_ms']:.2f} ms", f"{row['after_ms']:.2f} ms", f"{row['speedup']:.2f}x")
    console.print(table)
    if after["params"] == before["params"] and after["macs"] == before["macs"]:
        console.print("[yellow]nothing was removed: the plan kept every channel and layer; check --ratio or --target, "
                      "--round-to and the per-layer floors")
    target = result.target
    if target and target["metric"] == "latency":
        verdict = "met" if target["met"] else "[yellow]not met[/yellow]"
        console.print(f"target {target['factor']:g}x latency {verdict}: measured {target['reached']:.2f}x afresh "
                      f"(tolerance {target['tolerance']:.0%})"
                      + ("" if target["met"] else "; timings moved more than the tolerance: run on a quieter "
                                                  "machine or raise prune.latency_repeats"))
    if target and target.get("basis") == "original":
        verdict = "met" if target["met_of_original"] else "[yellow]not met[/yellow]"
        console.print(f"target {target['factor_of_original']:g}x {target['metric']} of the original {verdict}: "
                      f"{target['reached_of_original']:.2f}x in all ({target['input_reduction_of_original']:.2f}x before "
                      f"this step, {target['reached']:.2f}x in it)")
    elif target and target["metric"] != "latency" and not target["met"]:
        console.print(f"[yellow]target {target['factor']:g}x {target['metric']} not met "
                      f"(reached {target['reached']:.2f}x): {_why_short(result)}")
    overshoot = _overshoot(result)
    if overshoot:
        console.print(f"[yellow]{overshoot}")
    asked, removed = result.config.get("remove"), sum(1 for step in result.steps if step.get("accepted"))
    if result.mode == "layers" and asked and removed < asked:
        console.print(f"[yellow]removed {removed} of the {asked} units asked: {_why_short(result)}")
    console.print(f"-> {output}  (report {report_path}, {result.seconds['total']:.1f} s)")


def _overshoot(result: PruneReport, slack: float = 1.10) -> str | None:
    """A size target passed by far more than asked: the user asked for less compression than they got."""
    target = result.target
    if not target or target["metric"] == "latency" or not target["met"] or target["reached"] <= slack * target["factor"]:
        return None
    config = result.config
    causes = [f"widths move in multiples of round_to ({config.get('round_to')})"] if (config.get("round_to") or 1) > 1 else []
    if result.mode == "target-uniform":
        causes.append("every layer takes the same ratio")
    fix = ("a smaller --round-to or --global (one ranking over all channels) lands closer" if result.mode != "layers"
           else "whole units are coarse steps: --remove N or --units choose exactly")
    return (f"note: this step removed {target['reached']:.2f}x of the {target['metric']}, {target['factor']:.2f}x was "
            f"asked" + (f" ({'; '.join(causes)})" if causes else "") + f"; {fix}")


def _why_short(result: PruneReport) -> str:
    """Why a run stopped before its goal, in the words of its mode."""
    if result.mode != "layers":
        return "no layer could take more within the accuracy budget"
    budget = " or went over the accuracy budget" if result.accuracy_aware else ""
    return f"every unit left would have grown the model{budget}"


def _names(text: str | None) -> list[str] | None:
    """A comma-separated list of unit names, blanks dropped; None keeps the recipe's."""
    return None if text is None else [name.strip() for name in text.split(",") if name.strip()]
