"""`dnnprune info CKPT`: what a checkpoint holds and where it came from, read from its header."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from dnnprune.cli._app import command, console
from dnnprune.info import InfoReport, describe


@command("info")
def info_command(
    checkpoint: Annotated[Path, typer.Argument(help="A dnnprune checkpoint (.safetensors).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the description as JSON.")] = False,
    count_nonzero: Annotated[bool, typer.Option("--count-nonzero", help="Read the dense tensors to count their non-zeros.")] = False,
    build: Annotated[bool, typer.Option("--build", help="Build the model to count MACs and non-zeros exactly.")] = False,
    all_layers: Annotated[bool, typer.Option("--all", help="List every layer, not only the changed or encoded ones.")] = False,
) -> None:
    """Architecture, task, input, size, per-layer widths and encodings, and the lineage as a tree."""
    report = describe(checkpoint, count_nonzero=count_nonzero, build=build)
    if as_json:
        console.print_json(json.dumps(report.as_json()))
        return
    console.print(_summary(report))
    layers = _layer_table(report, all_layers)
    if layers.row_count:
        console.print(layers)
    console.print(lineage_tree(report))


def _normal(report: InfoReport) -> str:
    """The normal classes by their labels where the checkpoint names its classes."""
    positions = report.task["normal_classes"]
    classes = report.classes or []
    return ", ".join(repr(classes[i]) if i < len(classes) else str(i) for i in positions)


def _summary(report: InfoReport) -> Table:
    table = Table(title=f"{report.path}", show_header=False)
    table.add_column("")
    table.add_column("")
    task = report.task["kind"] + (f" (normal: {_normal(report)})" if report.task.get("normal_classes") else "")
    rows = [("architecture", f"{report.arch} {json.dumps(report.arch_args)}"), ("task", task),
            *_threshold_row(report),
            ("input", f"{tuple(report.input_shape)}, mean {report.mean}, std {report.std}"),
            ("dataset", _dataset(report)),
            ("parameters", f"{report.params:,}"),
            ("non-zero parameters", f"{report.nonzero_params:,}" if report.nonzero_params is not None else report.nonzero_note),
            ("MACs (batch 1)", f"{report.macs:,} ({report.macs_note})" if report.macs is not None else report.macs_note),
            ("bytes on disk", f"{report.file_bytes:,} ({8 * report.file_bytes / max(1, report.params):.2f} bits per parameter)"),
            ("removed or replaced", ", ".join(f"{k} -> {_kind(v)}" for k, v in report.replaced.items()) or "none"),
            ("format", f"dnnprune {report.format_version}")]
    for key, value in rows:
        table.add_row(key, value)
    return table


def _threshold_row(report: InfoReport) -> list[tuple[str, str]]:
    """A detector's stored threshold, or why it has none (score then chooses one on val)."""
    if not report.task.get("normal_classes"):
        return []
    held = report.anomaly_threshold
    if held is None:
        return [("anomaly threshold", "none stored (written before dnnprune stored one, or without its data)")]
    f1 = f", that group's val F1 {held['f1'] * 100:.2f} %" if held.get("f1") is not None else ""
    return [("anomaly threshold", f"{held['value']:.6g} ({held['chosen_on']}, {held['samples']:,} samples{f1})")]


def _dataset(report: InfoReport) -> str:
    """Say plainly when a checkpoint records no dataset, since commands that need data will ask for one."""
    name = report.dataset or "not recorded (commands that need data take --dataset or data.dataset)"
    return f"{name}, {len(report.classes)} classes" if report.classes else name


def _kind(value: Any) -> str:
    return value if isinstance(value, str) else f"its {value.get('source')}"


def _layer_table(report: InfoReport, all_layers: bool) -> Table:
    table = Table(title="layers (weights): width against the original, and storage")
    for column in ("tensor", "shape", "original", "width", "storage"):
        table.add_column(column, justify="left" if column in ("tensor", "storage") else "right")
    for row in report.layers:
        changed = row["shape"] != row["original_shape"] or row["encoding"] != "float32"
        if not (all_layers or changed):
            continue
        width = f"{row['width']} / {row['original_width']}" if row["original_width"] else str(row["width"])
        table.add_row(row["tensor"], "x".join(map(str, row["shape"] or [])) or "-",
                      "x".join(map(str, row["original_shape"] or [])) or "-", width, row["encoding"])
    return table


def lineage_tree(report: InfoReport) -> Tree:
    """Each step hangs under the one it came from: import/train at the root, the latest step deepest."""
    tree = Tree("lineage")
    node = tree
    for entry in report.lineage:
        label = Text.assemble((entry["command"], "bold"), f"  {entry.get('time_utc', '')}  v{entry.get('version', '?')}",
                              no_wrap=False, overflow="fold")
        label.append(f"\nrecipe {str(entry.get('recipe_sha256') or '-')[:12]}  "
                     f"parent {str(entry.get('parent_sha256') or '-')[:12]}")
        metrics = ", ".join(f"{k}={_short(v)}" for k, v in (entry.get("metrics") or {}).items())
        if metrics:
            label.append(f"\n{metrics}")
        node = node.add(label)
    if not report.lineage:
        tree.add("(no lineage recorded)")
    return tree


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."
