"""`dnnprune analyze CKPT`: how much each layer's task metric suffers when it alone is pruned."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from dnnprune.analysis import AnalyzeReport, analyze, output_paths, write_outputs
from dnnprune.checkpoint import check_output_path
from dnnprune.cli._app import (
    DataRootOption,
    DatasetOption,
    DeviceOption,
    DownloadOption,
    ForceOption,
    RecipeOption,
    command,
    command_inputs,
    common_overrides,
    console,
    parse_floats,
    recipe_with,
)
from dnnprune.cli._observer import RichObserver
from dnnprune.distributed import (
    distributed_env,
    init_distributed,
    leave_distributed,
    process_device,
    tune_malloc,
)
from dnnprune.errors import DnnpruneError, OutputError
from dnnprune.fresh import load_for_recipe
from dnnprune.lineage import resolve_device
from dnnprune.reports import default_report_path
from dnnprune.tasks import Task
from dnnprune.training import task_of


@command("analyze")
def analyze_command(
    checkpoint: Annotated[Path, typer.Argument(help="A dnnprune checkpoint (.safetensors).")],
    recipe: RecipeOption = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help=(
        "JSON to write; its .csv and .png go beside it (default: NAME.analysis.json next to CKPT)."))] = None,
    granularity: Annotated[str | None, typer.Option(help=(
        "What one cell removes: filter (a ratio of one layer's channels) or layer (one whole unit: a residual "
        "block, a same-shape conv or a hidden Linear), for prune --granularity layer."))] = None,
    ratios: Annotated[str | None, typer.Option(help="Pruning ratios in (0, 1), e.g. 0.1,0.3,0.5.")] = None,
    criterion: Annotated[str | None, typer.Option(help="Channel ranking: l1, l2, bn_scale or random.")] = None,
    samples: Annotated[int | None, typer.Option(help="Class-stratified validation subset (default 2000).")] = None,
    budget: Annotated[float | None, typer.Option(help=(
        "Primary-metric drop allowed for suggested ratios, e.g. 0.01 (1 point of top-1; 1 % more MSE)."))] = None,
    layers: Annotated[list[str] | None, typer.Option(help="Only these layers (glob or type:NAME); repeatable.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Evaluation batch size (default: data.batch_size).")] = None,
    winograd: Annotated[bool | None, typer.Option("--winograd/--no-winograd", help=(
        "Winograd 3x3 convolutions on small maps in the cells (default on; off: direct convolution, "
        "bit for bit the naive engine)."))] = None,
    dataset: DatasetOption = None,
    data_root: DataRootOption = None,
    download: DownloadOption = None,
    device: DeviceOption = None,
    force: ForceOption = False,
) -> None:
    """Prune each layer alone over a ratio grid, measure the validation metrics, rank the layers by sensitivity.

    Run it under `torchrun --nproc-per-node N -m dnnprune analyze ...` to share the cells across processes.
    """
    rank, world = distributed_env()
    started = completed = False
    try:
        overrides = {"analyze.ratios": list(parse_floats(ratios, "--ratios") or ()) if ratios is not None else None,
                     "analyze.granularity": granularity, "analyze.criterion": criterion, "analyze.samples": samples,
                     "analyze.budget": budget, "analyze.layers": layers or None, "analyze.batch_size": batch_size,
                     "analyze.winograd": winograd, **common_overrides(device, data_root, dataset, download)}
        config = recipe_with(recipe, overrides)
        path = output or default_report_path(checkpoint, ".analysis.json")
        _check_outputs(path, force, command_inputs(checkpoint, recipe, config))
        model = load_for_recipe(checkpoint, config.model)
        run_device = process_device(resolve_device(config.device), world)
        tune_malloc()
        started = init_distributed(world, run_device)
        with RichObserver(console, enabled=rank == 0) as observer:
            _, report = analyze(model, config.analyze, data=config.data, device=run_device, observer=observer,
                                rank=rank, world=world)
        completed = True
    except DnnpruneError:
        if rank != 0:  # every process fails the same way; one line is enough
            raise typer.Exit(2) from None
        raise
    finally:
        if started:
            leave_distributed(completed)
    if rank != 0:
        return
    written = write_outputs(report, path, inputs={"checkpoint": str(checkpoint), "recipe": recipe})
    console.print(sensitivity_table(report, task_of(model)))
    timing = report.timing
    console.print(f"order (least sensitive first): {', '.join(report.order)}")
    console.print(f"{timing.cells} cells in {timing.seconds:.1f} s on {timing.processes} process(es); "
                  f"report: {written['json']} (+ {written['csv'].name}, {written['png'].name})")


def _check_outputs(path: Path, force: bool, inputs: tuple[Path, ...]) -> None:
    if path.suffix != ".json":
        raise OutputError(f"output {path} must end in .json (the .csv and .png are written next to it)")
    for target in output_paths(path).values():
        check_output_path(target, force=force, protect=inputs)


def sensitivity_table(report: AnalyzeReport, task: Task) -> Table:
    """One row per layer, one coloured column per ratio: the primary metric's drop (green within budget).

    An accuracy-like metric drops in points; a lower-is-better one (MSE) rises, shown in percent of the baseline.
    """
    primary, budget = report.primary_metric, report.budget
    base = report.baseline.get(primary)
    total_macs = max(1, report.model.macs)
    rank_of = {name: i + 1 for i, name in enumerate(report.order)}
    change = f"{primary} drop in points" if report.higher_is_better else f"{primary} increase in %"
    pruned = "one unit is removed" if report.granularity == "layer" else "one layer is pruned"
    table = Table(title=f"sensitivity of {report.model.arch}: {change} when {pruned} "
                        f"(baseline {_baseline(base, report.higher_is_better)} on {report.samples} {report.split} "
                        f"samples, {report.criterion})")
    units = report.granularity == "layer"
    columns = ("order", "unit", "kind", "saves params %", "saves MACs %") if units else ("order", "layer", "width", "MACs %")
    for column in columns:
        table.add_column(column, justify="left" if column in ("layer", "unit", "kind") else "right")
    for ratio in report.ratios:
        table.add_column("removed" if units else f"{ratio:g}", justify="right")
    table.add_column("suggested", justify="right")
    total_params = max(1, report.model.params)
    for layer in report.layers:
        cells = [_drop_text(_drop(task, base, cell.metrics().get(primary)), budget) for cell in layer.cells]
        shape = ([layer.type, _saving(layer.params, total_params), _saving(layer.macs, total_macs)] if units
                 else [str(layer.width), f"{layer.macs / total_macs * 100:.1f}"])
        suggested = ("yes" if layer.suggested_ratio else "no") if units else f"{layer.suggested_ratio:g}"
        table.add_row(str(rank_of[layer.name]), layer.name, *shape, *cells, suggested)
    unit = "points" if report.higher_is_better else "%"
    table.caption = (f"{change}; green: ≤ {budget * 100:g} {unit} (the budget), yellow: ≤ {5 * budget * 100:g}, "
                     "red: more; order 1 = least sensitive, pruned first by `prune --order sensitivity`"
                     + ("; a unit whose removal grows the model is passed over" if report.granularity == "layer" else ""))
    return table


def _saving(saved: int, total: int) -> str:
    """A unit's saving in percent of the model; removing a bottleneck can grow it, which is said, not signed."""
    share = saved / total * 100
    return f"{share:.1f}" if saved >= 0 else f"grows {-share:.1f}"


def _drop(task: Task, base: float | None, value: float | None) -> float:
    if base is None or value is None:
        return math.nan
    return task.drop(float(base), float(value))


def _drop_text(drop: float, budget: float) -> Text:
    if math.isnan(drop):
        return Text("n/a", style="dim")
    style = "green" if drop <= budget + 1e-12 else ("yellow" if drop <= 5 * budget else "red")
    return Text(f"{drop * 100:.1f}", style=style)


def _baseline(value: float | None, higher_is_better: bool) -> str:
    if value is None:
        return "undefined"
    return f"{value * 100:.2f} %" if higher_is_better else f"{value:.4g}"
