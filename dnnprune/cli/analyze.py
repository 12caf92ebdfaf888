"""`dnnprune analyze CKPT`: how much each layer's accuracy suffers when it alone is pruned."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from dnnprune.analysis import (analyze, distributed_env, init_distributed, leave_distributed, output_paths, tune_malloc,
                               write_outputs)
from dnnprune.checkpoint import check_output_path, load, meta_of
from dnnprune.cli._app import (DataRootOption, DatasetOption, DeviceOption, DownloadOption, ForceOption, RecipeOption,
                               command, common_overrides, console, parse_floats, recipe_with)
from dnnprune.errors import DnnpruneError, OutputError
from dnnprune.loaders import split_dataset
from dnnprune.report import default_report_path, envelope
from dnnprune.training import resolve_device


@command("analyze")
def analyze_command(
    checkpoint: Annotated[Path, typer.Argument(help="A dnnprune checkpoint (.safetensors).")],
    recipe: RecipeOption = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help=(
        "JSON to write; its .csv and .png go beside it (default: NAME.analysis.json next to CKPT)."))] = None,
    ratios: Annotated[str | None, typer.Option(help="Pruning ratios in (0, 1), e.g. 0.1,0.3,0.5.")] = None,
    criterion: Annotated[str | None, typer.Option(help="Channel ranking: l1, l2, bn_scale or random.")] = None,
    samples: Annotated[int | None, typer.Option(help="Class-stratified validation subset (default 2000).")] = None,
    budget: Annotated[float | None, typer.Option(help="Top-1 drop allowed for suggested ratios, e.g. 0.01.")] = None,
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
    """Prune each layer alone over a ratio grid, measure validation accuracy, rank the layers by sensitivity.

    Run it under `torchrun --nproc-per-node N -m dnnprune analyze ...` to share the cells across processes.
    """
    rank, world = distributed_env()
    started = completed = False
    try:
        overrides = {"analyze.ratios": list(parse_floats(ratios, "--ratios") or ()) if ratios is not None else None,
                     "analyze.criterion": criterion, "analyze.samples": samples, "analyze.budget": budget,
                     "analyze.layers": layers or None, "analyze.batch_size": batch_size,
                     "analyze.winograd": winograd,
                     **common_overrides(device, data_root, dataset, download)}
        config = recipe_with(recipe, overrides)
        path = output or default_report_path(checkpoint, ".analysis.json")
        _check_outputs(path, force, checkpoint)
        model = load(checkpoint)
        meta = meta_of(model)
        run_device = _device(config.device, world)
        tune_malloc()
        started = init_distributed(world)
        section = config.analyze

        def data() -> Any:
            return split_dataset(meta, config.data, "val", section.samples, section.seed)

        bar = _LazyBar(rank, world)
        try:
            body = analyze(model, section, data, device=run_device, batch_size=config.data.batch_size,
                           progress=bar.update, rank=rank, world=world)
        finally:
            bar.close()
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
    report = envelope("analyze", body, inputs={"checkpoint": str(checkpoint), "recipe": recipe})
    written = write_outputs(report, path)
    console.print(sensitivity_table(body))
    timing = body["timing"]
    console.print(f"order (least sensitive first): {', '.join(body['order'])}")
    console.print(f"{timing['cells']} cells in {timing['seconds']:.1f} s on {timing['processes']} process(es); "
                  f"report: {written['json']} (+ {written['csv'].name}, {written['png'].name})")


def _check_outputs(path: Path, force: bool, checkpoint: Path) -> None:
    if path.suffix != ".json":
        raise OutputError(f"output {path} must end in .json (the .csv and .png are written next to it)")
    for target in output_paths(path).values():
        check_output_path(target, force=force, protect=(checkpoint,))


def _device(name: str, world: int) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda" and world > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return device


class _LazyBar:
    """A progress bar with ETA that appears with the first measured cell (so a bad request prints one line)."""

    def __init__(self, rank: int, world: int) -> None:
        self.enabled = rank == 0
        self.label = "analyze" + (f" (rank 0 of {world})" if world > 1 else "")
        self.progress: Progress | None = None
        self.task: Any = None

    def update(self, done: float, total: float, note: str) -> None:
        if not self.enabled:
            return
        if self.progress is None:
            self.progress = Progress(TextColumn(f"[bold]{self.label}"), BarColumn(), TaskProgressColumn(),
                                     TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                     TextColumn("{task.fields[info]}"), console=console)
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=total, info=note)
        self.progress.update(self.task, completed=done, total=total, info=note)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def sensitivity_table(body: dict[str, Any]) -> Table:
    """One row per layer, one coloured column per ratio: the top-1 drop in points (green within budget)."""
    base = body["baseline"]["top1"]
    budget = body["budget"]
    total_macs = max(1, body["model"]["macs"])
    rank_of = {name: i + 1 for i, name in enumerate(body["order"])}
    table = Table(title=f"sensitivity of {body['model']['arch']}: top-1 drop in points when one layer is pruned "
                        f"(baseline {base * 100:.2f} % on {body['samples']} {body['split']} samples, "
                        f"{body['criterion']})")
    for column in ("order", "layer", "width", "MACs %"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for ratio in body["ratios"]:
        table.add_column(f"{ratio:g}", justify="right")
    table.add_column("suggested", justify="right")
    for layer in body["layers"]:
        cells = []
        for cell in layer["cells"]:
            drop = base - cell["top1"]
            style = "green" if drop <= budget + 1e-12 else ("yellow" if drop <= 5 * budget else "red")
            cells.append(Text(f"{drop * 100:.1f}", style=style))
        table.add_row(str(rank_of[layer["name"]]), layer["name"], str(layer["width"]),
                      f"{layer['macs'] / total_macs * 100:.1f}", *cells, f"{layer['suggested_ratio']:g}")
    table.caption = (f"green: drop ≤ {budget * 100:g} points (the budget), yellow: ≤ {5 * budget * 100:g}, "
                     "red: more; order 1 = least sensitive, pruned first by `prune --order sensitivity`")
    return table
