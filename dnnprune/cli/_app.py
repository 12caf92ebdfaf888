"""The Typer app and what every command shares: options, error handling, outputs."""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, TypeVar

import torch
import torch.nn as nn
import typer
from pydantic import BaseModel
from rich.console import Console
from rich.text import Text

from dnnprune.checkpoint import check_output_path, save
from dnnprune.cli._observer import RichObserver, RowFormatter
from dnnprune.data import DATASETS, resolve_root
from dnnprune.distributed import distributed_env, init_distributed, leave_distributed, process_device
from dnnprune.errors import DnnpruneError, OutputError
from dnnprune.lineage import resolve_device
from dnnprune.recipe import DataSection, Recipe, load_recipe
from dnnprune.reports import Report, default_report_path, envelope, write_report

R = TypeVar("R", bound=Report)

app = typer.Typer(
    name="dnnprune",
    help="Make trained PyTorch networks smaller and faster while keeping their accuracy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def _print_version(wanted: bool) -> None:
    if wanted:
        from dnnprune import __version__

        console.print(f"dnnprune {__version__} (torch {torch.__version__})", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="Print the version (and torch's) and exit.")] = False) -> None:
    """Make trained PyTorch networks smaller and faster while keeping their accuracy."""

RecipeOption = Annotated[Path | None, typer.Option("--recipe", "-r", help="YAML recipe; options override its values.")]
OutputOption = Annotated[Path, typer.Option("--output", "-o", help="Checkpoint to write (.safetensors).")]
ReportOption = Annotated[Path | None, typer.Option("--report", help="JSON report path \\[default: next to the output; for score, next to the checkpoint].")]
ForceOption = Annotated[bool, typer.Option("--force", help="Overwrite an existing output (never the input).")]
DeviceOption = Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda.")]
DataRootOption = Annotated[Path | None, typer.Option("--data-root", help="Folder holding the dataset files.")]
DatasetOption = Annotated[str | None, typer.Option("--dataset", help="Dataset name (fashion-mnist, mnist, cifar10, ...).")]
DownloadOption = Annotated[bool | None, typer.Option("--download/--no-download", help="Let torchvision download the dataset.")]
DistillOption = Annotated[float | None, typer.Option(help="Weight of distillation in every fine-tune, in \\[0, 1]; 0 turns it off.")]
TeacherOption = Annotated[Path | None, typer.Option(help="Distil every fine-tune from this checkpoint (e.g. the unpruned original) instead of the input; needs a distill weight above 0.")]


def command(name: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a command whose domain errors print one red line and exit with code 2."""

    def decorator(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapper(*args: Any, **inner: Any) -> Any:
            try:
                return function(*args, **inner)
            except DnnpruneError as exc:
                fail(str(exc))
            except KeyboardInterrupt:
                err_console.print(Text("interrupted: ", style="bold red") + Text("no partial file was left (outputs are written whole or not at all)"))
                raise typer.Exit(130) from None

        return app.command(name, **kwargs)(wrapper)

    return decorator


@contextmanager
def torchrun_session(device_name: str) -> Iterator[tuple[int, int, torch.device]]:
    """(rank, world size, this process's device); under torchrun the process group lives for the block.

    Every process runs the command (DistributedDataParallel inside the training loop); only rank 0
    writes outputs and draws progress.
    """
    rank, world = distributed_env()
    device = process_device(resolve_device(device_name), world)
    started = init_distributed(world, device)
    completed = False
    try:
        yield rank, world, device
        completed = True
    finally:
        if started:
            leave_distributed(completed)


def run_and_save(function: Callable[..., tuple[nn.Module, R]], model: nn.Module, section: Any, config: Recipe,
                 output: Path, *, force: bool, inputs: tuple[Path, ...],
                 formatter: RowFormatter | None = None) -> R | None:
    """Run a library command (DistributedDataParallel under torchrun) and save its model on rank 0.

    Returns the report on rank 0, None on the other ranks (which write nothing)."""
    with (torchrun_session(config.device) as (rank, _, device),
          RichObserver(console, formatter=formatter, enabled=rank == 0) as observer):
        model, result = function(model, section, data=config.data, device=device, observer=observer)
    if rank != 0:
        return None
    save(model, output, force=force, protect=inputs)
    return result


def fail(message: str) -> None:
    err_console.print(Text("error: ", style="bold red") + Text(" ".join(_original(message).split())))
    raise typer.Exit(2)


def _original(message: str) -> str:
    """A DataLoader worker re-raises an error with the worker's traceback in its message; the user's one
    line is the original message, on the traceback's last line after the exception's name."""
    if "Original Traceback" not in message:
        return message
    last = message.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def recipe_with(path: Path | None, overrides: dict[str, Any]) -> Recipe:
    return load_recipe(path, overrides)


def common_overrides(device: str | None, data_root: Path | None, dataset: str | None = None,
                     download: bool | None = None) -> dict[str, Any]:
    if device is not None and device not in ("auto", "cpu", "cuda"):
        raise DnnpruneError(f"--device must be auto, cpu or cuda, not {device!r}")
    return {"device": device, "data.root": str(data_root) if data_root else None, "data.dataset": dataset,
            "data.download": download}


def distill_overrides(sections: tuple[str, ...], distill: float | None, teacher: Path | None) -> dict[str, Any]:
    """`--distill` and `--teacher` set every fine-tune section the command runs, so one option covers them all."""
    overrides: dict[str, Any] = {}
    for section in sections:
        overrides[f"{section}.distill"] = distill
        overrides[f"{section}.teacher"] = str(teacher) if teacher is not None else None
    return overrides


def prepare_output(output: Path, *, force: bool, inputs: tuple[Path, ...] = (), report: Path | None = None,
                   suffix: str = ".json", output_suffix: str = ".safetensors") -> Path:
    """Refuse a bad output or report path before any work is done; returns the report path."""
    if output.suffix != output_suffix:
        raise OutputError(f"output {output} must end in {output_suffix}")
    check_output_path(output, force=force, protect=inputs)
    report_path = report or default_report_path(output, suffix)
    if report_path.resolve() == output.resolve():
        raise OutputError(f"report {report_path} is the output; choose another --report path")
    check_report_path(report_path, force=force, inputs=inputs)
    return report_path


def check_report_path(path: Path, *, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    """A report is guarded like an output: never an input, never an existing file without --force."""
    if path.suffix != ".json":
        raise OutputError(f"report {path} must end in .json")
    check_output_path(path, force=force, protect=inputs, kind="report", option="--report")


_FILE_FIELDS = frozenset({"analysis", "teacher", "path", "root"})


def command_inputs(checkpoint: Path | None, recipe: Path | None, config: Recipe | None = None) -> tuple[Path, ...]:
    """Every file a command reads: the checkpoint, the recipe and the files the recipe names (analysis,
    teachers, a CSV or data root, the CSV found inside it). No output or report may land on one of them,
    --force or not."""
    paths = [path for path in (checkpoint, recipe) if path is not None]
    if config is not None:
        paths += _named_files(config) + _table_file(config.data)
    return tuple(paths)


def _table_file(data: DataSection) -> list[Path]:
    """The CSV a tabular dataset is read from, where --data-root names the folder that holds it."""
    if data.dataset not in DATASETS or DATASETS[data.dataset].kind != "tabular":
        return []
    try:
        return [resolve_root(data.dataset, data.path or data.root)]
    except DnnpruneError:  # not found: the command itself will say so
        return []


def _named_files(section: BaseModel) -> list[Path]:
    found: list[Path] = []
    for name in type(section).model_fields:
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            found += _named_files(value)
        elif name in _FILE_FIELDS and isinstance(value, (str, Path)):
            found.append(Path(value))
    return found


def finish_report(report: Report | dict[str, Any], output: Path | None, report_path: Path | None,
                  suffix: str = ".json") -> Path:
    """Write an already enveloped report next to the output (or at --report)."""
    path = report_path or default_report_path(output, suffix)  # type: ignore[arg-type]
    write_report(path, report.as_json() if isinstance(report, Report) else report)
    return path


def write_command_report(command_name: str, report: Report | dict[str, Any], path: Path,
                         inputs: dict[str, Any]) -> Path:
    write_report(path, envelope(command_name, report, inputs=inputs))
    return path


def parse_floats(text: str | None, option: str, example: str = "0.1,0.3,0.5") -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise DnnpruneError(f"{option} takes comma-separated numbers, e.g. {example}; got {text!r}") from None
    if not all(math.isfinite(value) for value in values):
        raise DnnpruneError(f"{option} takes finite numbers, e.g. {example}; got {text!r}")
    return values
