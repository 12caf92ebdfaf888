"""`dnnprune import WEIGHTS --arch NAME -o OUT`: adopt a state dict trained elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dnnprune.checkpoint import meta_of, save
from dnnprune.cli._app import (
    DatasetOption,
    ForceOption,
    OutputOption,
    ReportOption,
    command,
    console,
    finish_report,
    parse_floats,
    prepare_output,
)
from dnnprune.errors import DnnpruneError
from dnnprune.importer import import_weights
from dnnprune.reports import envelope

_MAX_CLASSES = 100_000  # ImageNet-21k has 21,841; far more would allocate gigabytes before the weights are checked


@command("import")
def import_command(
    weights: Annotated[Path, typer.Argument(help="A plain state dict: .safetensors, or .pth/.pt (read with weights_only=True).")],
    arch: Annotated[str, typer.Option(help="Architecture name, e.g. torchvision.resnet18 or vgg16_bn.")],
    output: OutputOption,
    num_classes: Annotated[int | None, typer.Option(help="Classes \\[default: from --dataset or the weights].")] = None,
    input_shape: Annotated[str | None, typer.Option(help="C,H,W the model expects, e.g. 3,32,32.")] = None,
    mean: Annotated[str | None, typer.Option(help="Normalisation mean: one value per channel (0.485,0.456,0.406) or one for all.")] = None,
    std: Annotated[str | None, typer.Option(help="Normalisation std: one value per channel or one for all.")] = None,
    dataset: DatasetOption = None,
    report: ReportOption = None,
    force: ForceOption = False,
) -> None:
    """Turn a plain state dict into a self-describing dnnprune checkpoint."""
    if num_classes is not None and not 1 <= num_classes <= _MAX_CLASSES:
        raise DnnpruneError(f"--num-classes must be between 1 and {_MAX_CLASSES:,}, got {num_classes}")
    report_path = prepare_output(output, force=force, inputs=(weights,), report=report)
    if dataset is not None:
        from dnnprune.data import DATASETS

        if dataset not in DATASETS:
            raise DnnpruneError(f"unknown dataset {dataset!r}; choose one of {', '.join(sorted(DATASETS))}")
    model, result = import_weights(weights, arch, num_classes=num_classes, input_shape=_shape(input_shape),
                                   mean=parse_floats(mean, "--mean", "0.485,0.456,0.406"), std=parse_floats(std, "--std", "0.229,0.224,0.225"), dataset=dataset)
    meta_of(model).add_lineage("import", None, {"source": str(weights), **result.lineage_metrics()})
    save(model, output, force=force, protect=(weights,))
    body = {**result.as_json(), "output": str(output)}
    path = finish_report(envelope("import", body, inputs={"weights": str(weights)}), output, report_path)
    note = result.dropped_summary()
    if note:
        console.print(note)
    console.print(f"imported {weights} as {arch} -> {output}  (report {path})")


def _shape(text: str | None) -> tuple[int, int, int] | None:
    values = parse_floats(text, "--input-shape", "3,32,32")
    if values is None:
        return None
    if len(values) != 3 or any(v <= 0 or v != int(v) for v in values):
        raise DnnpruneError(f"--input-shape takes three positive integers C,H,W, e.g. 3,32,32; got {text!r}")
    return tuple(int(v) for v in values)  # type: ignore[return-value]
