"""`info`: what a checkpoint holds, read from its header, without building the model.

The safetensors header gives every stored tensor's name, dtype and shape; the dnnprune metadata
gives the architecture, task, input spec, encodings and lineage. Encoded tensors keep their
decoded shape and entry count in two tiny parts, read through safetensors' memory map, so even a
large file is described in milliseconds. Original widths come from the architecture built on the
meta device (shapes without memory). Exact non-zero counts and MACs need the tensors or the model:
`count_nonzero=True` reads every tensor (decoding encoded ones one at a time), `build=True` loads
the model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from safetensors import safe_open

from dnnprune.checkpoint import (
    check_header_tensors,
    load,
    model_bytes_limit,
    read_meta,
    skeleton,
    tensor_index,
    torch_dtype,
)
from dnnprune.codecs import as_encoding, decode_tensor
from dnnprune.errors import CheckpointError
from dnnprune.metrics import count_macs, count_nonzero_parameters, count_parameters
from dnnprune.reports import Report

SEPARATOR = "::"


class InfoReport(Report):
    path: str
    file_bytes: int
    arch: str
    arch_args: dict[str, Any]
    task: dict[str, Any]
    anomaly_threshold: dict[str, Any] | None = None
    input_shape: list[int]
    mean: list[float]
    std: list[float]
    dataset: str | None
    classes: list[str] | None
    format_version: int
    params: int
    nonzero_params: int | None
    """Exact when every tensor was counted; None when dense tensors were not read (see `nonzero_note`)."""
    nonzero_note: str
    macs: int | None
    macs_note: str
    layers: list[dict[str, Any]]
    replaced: dict[str, Any]
    lineage: list[dict[str, Any]]
    built: bool = Field(False, description="whether the model was built to count MACs and non-zeros")


def describe(path: Path | str, *, count_nonzero: bool = False, build: bool = False) -> InfoReport:
    """Everything `dnnprune info` shows; header-only unless asked to count or build."""
    path = Path(path)
    meta = read_meta(path)
    index = tensor_index(path)
    _check_length(path, index)
    encodings = {name: as_encoding(spec) for name, spec in meta.encodings.items()}
    small = _small_parts(path, index, encodings)
    shapes = _decoded_shapes(index, small)
    structure = _structure(path, meta)
    check_header_tensors(path, meta, structure, _header_tensors(index, small))
    layers = _layers(meta.arch, meta.arch_args, shapes, encodings, small, list(structure.state_dict()), meta.replaced)
    parameters = {name for name, _ in structure.named_parameters()}
    params = sum(math.prod(shape) for name, shape in shapes.items() if name in parameters)
    nonzero, nonzero_note = (_count_nonzero(path, index, shapes, encodings, parameters) if count_nonzero else
                             (None, "not counted: pass --count-nonzero (reads the tensors) or --build"))
    macs, macs_note = _macs_from_lineage(meta.lineage)
    if build:
        model = load(path)
        params, nonzero = count_parameters(model), count_nonzero_parameters(model)
        macs, macs_note = sum(count_macs(model, tuple(meta.input_shape)).values()), "counted on the built model"
        nonzero_note = "counted on the built model"
    return InfoReport(
        path=str(path), file_bytes=path.stat().st_size, arch=meta.arch, arch_args=dict(meta.arch_args),
        task=meta.task.model_dump(mode="json"),
        anomaly_threshold=meta.anomaly_threshold.model_dump(mode="json") if meta.anomaly_threshold else None,
        input_shape=list(meta.input_shape), mean=list(meta.mean),
        std=list(meta.std), dataset=meta.dataset, classes=meta.classes, format_version=meta.format_version,
        params=params, nonzero_params=nonzero, nonzero_note=nonzero_note, macs=macs, macs_note=macs_note,
        layers=layers, replaced={k: _plain(v) for k, v in meta.replaced.items()},
        lineage=[_plain(entry) for entry in meta.lineage], built=build)


def _structure(path: Path, meta: Any) -> torch.nn.Module:
    try:
        return skeleton(meta)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def _check_length(path: Path, index: dict[str, tuple[str, tuple[int, ...], int]]) -> None:
    """safetensors' tensors fill the file exactly after the header: a truncated file is caught without reading it."""
    with path.open("rb") as handle:
        header = int.from_bytes(handle.read(8), "little")
    expected = 8 + header + sum(nbytes for _, _, nbytes in index.values())
    size = path.stat().st_size
    if size < expected:
        raise CheckpointError(f"{path} holds {size:,} bytes where its header describes {expected:,}; it is truncated")
    if size > expected:
        raise CheckpointError(f"{path} holds {size - expected:,} bytes its header does not describe; the file is corrupt")


def _header_tensors(index: dict[str, tuple[str, tuple[int, ...], int]],
                    small: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The stored tensors as the header declares them: meta tensors (no data), with the encodings' tiny
    `shape` and `count` parts real, since decoded shapes are read from them."""
    tensors: dict[str, torch.Tensor] = {}
    for key, (dtype, shape, _) in index.items():
        name, _, part = key.partition(SEPARATOR)
        real = small.get(name, {}).get(part)
        tensors[key] = real if real is not None else torch.empty(shape, dtype=torch_dtype(dtype), device="meta")
    return tensors


def _plain(value: Any) -> Any:
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def _small_parts(path: Path, index: dict[str, tuple[str, tuple[int, ...], int]],
                 encodings: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """The `shape` and `count` parts of every encoded tensor (a few bytes each, memory-mapped)."""
    wanted = {key for key in index if key.partition(SEPARATOR)[0] in encodings
              and key.partition(SEPARATOR)[2] in ("shape", "count")}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    if not wanted:
        return parts
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in wanted:
                name, _, part = key.partition(SEPARATOR)
                parts.setdefault(name, {})[part] = handle.get_tensor(key)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot read the encoded tensors' sizes ({type(exc).__name__}); the file is "
                              "corrupt") from None
    return parts


def _decoded_shapes(index: dict[str, tuple[str, tuple[int, ...], int]],
                    small: dict[str, dict[str, torch.Tensor]]) -> dict[str, tuple[int, ...]]:
    shapes = {name: shape for name, (_, shape, _) in index.items() if SEPARATOR not in name}
    for name, parts in small.items():
        if "shape" in parts:
            shapes[name] = tuple(int(v) for v in parts["shape"].tolist())
        else:  # an 8-bit linear code tensor keeps the weight's own shape
            codes = index.get(f"{name}{SEPARATOR}codes")
            shapes[name] = codes[1] if codes else ()
    for key, (_, shape, _) in index.items():
        name, _, part = key.partition(SEPARATOR)
        if part == "codes" and name not in shapes:
            shapes[name] = shape
    return shapes


def _layers(arch: str, arch_args: dict[str, Any], shapes: dict[str, tuple[int, ...]], encodings: dict[str, Any],
            small: dict[str, dict[str, torch.Tensor]], order: list[str], replaced: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per weight tensor in model order: its shape against the fresh architecture's, how it is
    stored, and a row for each weight that layer pruning removed."""
    fresh = {name: tuple(t.shape) for name, t in skeleton(arch=arch, arch_args=arch_args).state_dict().items()}
    rank = {name: i for i, name in enumerate(order)}
    rows = []
    for name in sorted(shapes, key=lambda n: (rank.get(n, len(rank)), n)):
        shape = shapes[name]
        if not name.endswith("weight") or len(shape) < 2:
            continue
        original = fresh.get(_fresh_name(name, replaced))
        encoding = encodings.get(name)
        row: dict[str, Any] = {"tensor": name, "shape": list(shape), "original_shape": list(original) if original else None,
                               "width": shape[0], "original_width": original[0] if original else None,
                               "encoding": "float32"}
        if encoding is not None:
            row.update(_encoding_row(encoding, shape, small.get(name, {})))
        rows.append(row)
    kept = {_fresh_name(name, replaced) for name in shapes}
    for name, shape in fresh.items():
        if name.endswith("weight") and len(shape) >= 2 and name not in kept:
            rows.append({"tensor": name, "shape": None, "original_shape": list(shape), "width": 0,
                         "original_width": shape[0], "encoding": "removed"})
    return rows


def _fresh_name(name: str, replaced: dict[str, Any]) -> str:
    """The name a tensor had in the fresh architecture: a block replaced by its shortcut keeps the
    shortcut's tensors, one level up."""
    for module in sorted(replaced, key=len, reverse=True):
        replacement = _plain(replaced[module])
        if isinstance(replacement, dict) and name.startswith(module + "."):
            return f"{module}.{replacement['source']}.{name[len(module) + 1:]}"
    return name


def _encoding_row(encoding: Any, shape: tuple[int, ...], parts: dict[str, torch.Tensor]) -> dict[str, Any]:
    values = encoding.values
    described = [f"{values.codec} {values.bits}-bit"] if values is not None else []
    row: dict[str, Any] = {"bits": values.bits if values is not None else 32}
    if encoding.sparse is not None:
        entries = int(parts["count"].reshape(-1)[0]) if "count" in parts else None
        row["stored_entries"] = entries
        row["density"] = entries / max(1, math.prod(shape)) if entries is not None else None
        described.insert(0, f"sparse ({row['density']:.1%} stored)" if row["density"] is not None else "sparse")
    row["encoding"] = " + ".join(described)
    return row


def _count_nonzero(path: Path, index: dict[str, tuple[str, tuple[int, ...], int]], shapes: dict[str, tuple[int, ...]],
                   encodings: dict[str, Any], parameters: set[str]) -> tuple[int, str]:
    """Exact non-zero parameters: plain tensors read one at a time, encoded ones decoded one at a time
    (so memory stays at one tensor), after the same size budget `load` applies."""
    decoded = sum(math.prod(shapes.get(name, ())) * 4 for name in encodings)
    limit = model_bytes_limit(path.stat().st_size)
    if decoded > limit:
        raise CheckpointError(f"{path}: its encoded tensors would decode to {decoded:,} bytes, more than the {limit:,} a "
                              "file this size may; the file is corrupt (or raise DNNPRUNE_MAX_MODEL_BYTES)")
    total = 0
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in index:
                if SEPARATOR not in key and key in parameters:
                    total += int(torch.count_nonzero(handle.get_tensor(key)))
            for name, encoding in encodings.items():
                if name not in parameters:
                    continue
                parts = {key.partition(SEPARATOR)[2]: handle.get_tensor(key) for key in index
                         if key.partition(SEPARATOR)[0] == name and SEPARATOR in key}
                total += int(torch.count_nonzero(decode_tensor(parts, encoding)))
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot read its tensors ({type(exc).__name__}); the file is corrupt") from None
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return total, "counted from the stored tensors (encoded ones decoded)"


def _macs_from_lineage(lineage: list[Any]) -> tuple[int | None, str]:
    for entry in reversed(lineage):
        metrics = _plain(entry).get("metrics") or {}
        if isinstance(metrics.get("macs"), int):
            return metrics["macs"], f"from the lineage ({_plain(entry).get('command')}); --build counts them"
    return None, "not recorded: pass --build to count them"
