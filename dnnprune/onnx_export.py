"""`export`: the rebuilt model as ONNX, checked against onnxruntime, with both runtimes' CPU latency.

ONNX has no sparse or n-bit weights that every runtime reads, so quantized and sparse layers are
exported with their decoded (dense float32) weights; the report lists them. The batch axis is
dynamic. The export is only kept if onnxruntime reproduces the PyTorch outputs on a random batch
within the tolerance, relative to the outputs' scale (float32 rounding grows with it); otherwise
nothing is written and the command fails with the difference.

A deployed model needs its inputs prepared as in training. The ONNX file's metadata (`dnnprune`, a JSON
string) says how: shape, per-channel mean and std, a table's columns and scaling, the classes. With
`raw_inputs` the scaling is inside the graph instead, so it takes pixels in [0, 1] (or a table's raw
values) at the model's shape; resizing and colour conversion stay outside.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn

from dnnprune.checkpoint import CheckpointMeta, atomic_write_bytes, check_output_path, meta_of, refuse_own_source
from dnnprune.errors import DnnpruneError
from dnnprune.inference import onnx_bytes, onnx_session
from dnnprune.latency import interleaved_ms
from dnnprune.lineage import command
from dnnprune.observe import Observer
from dnnprune.recipe import DataSection, ExportSection
from dnnprune.reports import Report


class ExportReport(Report):
    output: str
    onnx_bytes: int
    opset: int
    exporter: str
    input_name: str
    input_shape: list[Any]
    dense_layers: list[str]
    """Encoded (quantized or sparse) tensors that ONNX stores dense."""
    parity: dict[str, Any]
    latency: list[dict[str, Any]]
    raw_inputs: bool = Field(False, description="whether the input scaling is inside the graph")
    preprocessing: dict[str, Any] = Field(default_factory=dict, description="what the ONNX input expects; also in "
                                                                            "the file's metadata under 'dnnprune'")
    warnings: list[str] = Field(default_factory=list)


@command("export", lineage=False)
def export(model: nn.Module, section: ExportSection, *, data: DataSection, device: torch.device, observer: Observer,
           output: Path | str, force: bool = False) -> tuple[nn.Module, ExportReport]:
    """Write `output` (ONNX) only after onnxruntime agrees with PyTorch; an existing file only with `force`,
    and never the checkpoint the model was loaded from."""
    meta = meta_of(model)
    output = Path(output)
    check_output_path(output, force=force)
    refuse_own_source(output, meta)
    if section.raw_inputs and meta.task.kind == "reconstruction":
        raise DnnpruneError("--raw-inputs does not suit an autoencoder: it reconstructs the scaled input, and its "
                            "anomaly score compares the two in scaled units; export without it and scale inputs as "
                            "the ONNX metadata says")
    model = model.cpu().eval()
    shape = tuple(meta.input_shape)
    shift, scale = _input_scaling(meta)
    graph = RawInputs(model, shift, scale).eval() if section.raw_inputs else model
    inputs = _InputSampler(shift, scale, raw=section.raw_inputs, table=meta.feature_mean is not None, seed=section.seed)
    preprocessing = _preprocessing(meta, raw=section.raw_inputs)
    payload = onnx_bytes(graph, inputs(2, shape), exporter=section.exporter, opset=section.opset)
    payload = with_metadata(payload, {"dnnprune": json.dumps(preprocessing, sort_keys=True)})
    session = onnx_session(payload)
    parity = _parity(graph, session, inputs(section.check_batch, shape), section.tolerance)
    atomic_write_bytes(output, payload)
    latency = _latency(graph, session, shape, section, inputs) if section.latency else []
    report = ExportReport(output=str(output), onnx_bytes=len(payload), opset=section.opset, exporter=section.exporter,
                          input_name=session.get_inputs()[0].name, input_shape=list(session.get_inputs()[0].shape),
                          dense_layers=sorted(meta.encodings), parity=parity, latency=latency,
                          raw_inputs=section.raw_inputs, preprocessing=preprocessing,
                          warnings=_float32_columns(meta) if section.raw_inputs else [])
    return model, report


def _float32_columns(meta: CheckpointMeta) -> list[str]:
    """Raw float32 inputs keep about 7 significant digits: a column of timestamps near 1.7e9 that vary by a
    thousand loses a tenth of its spread before the graph can centre it."""
    if meta.feature_mean is None or meta.feature_std is None:
        return []
    names = meta.features or [str(i) for i in range(len(meta.feature_mean))]
    lost = {name: abs(mean) * 2.0 ** -24 / std for name, mean, std in zip(names, meta.feature_mean, meta.feature_std)
            if std > 0}
    coarse = sorted((name for name, share in lost.items() if share > 1e-4), key=lambda n: -lost[n])
    if not coarse:
        return []
    worst = coarse[0]
    return [f"{len(coarse)} column(s) lose precision as float32 raw inputs (worst: {worst!r}, rounded by "
            f"{lost[worst]:.1e} of its spread: large values with a small spread); for exact results export without "
            "--raw-inputs and scale those columns in float64 before the model"]


class RawInputs(nn.Module):
    """The model behind its input scaling, `(x - shift) / scale`, so the graph takes what the data holds."""

    def __init__(self, model: nn.Module, shift: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("shift", shift)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.shift) / self.scale)


def _input_scaling(meta: CheckpointMeta) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine map from raw values to the model's input, broadcast over (B, C, H, W): per channel for
    images; for a table (shape 1x1xF) its column standardisation composed with the spec's mean and std."""
    channels = len(meta.mean)
    mean = torch.tensor(meta.mean, dtype=torch.float64).view(1, channels, 1, 1)
    std = torch.tensor(meta.std, dtype=torch.float64).view(1, channels, 1, 1)
    if meta.feature_mean is None or meta.feature_std is None:
        return mean.float(), std.float()
    column_mean = torch.tensor(meta.feature_mean, dtype=torch.float64).view(1, 1, 1, -1)
    column_std = torch.tensor(meta.feature_std, dtype=torch.float64).view(1, 1, 1, -1)
    return (column_mean + mean * column_std).float(), (column_std * std).float()


class _InputSampler:
    """Check inputs where the exported graph is used: scaled inputs are standard normal; raw ones are pixels
    in [0, 1] or a table's values around its columns' means."""

    def __init__(self, shift: torch.Tensor, scale: torch.Tensor, *, raw: bool, table: bool, seed: int) -> None:
        self.shift, self.scale, self.raw, self.table = shift, scale, raw, table
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, batch: int, shape: tuple[int, ...]) -> torch.Tensor:
        if not self.raw:
            return torch.randn(batch, *shape, generator=self.generator)
        if self.table:
            return self.shift + self.scale * torch.randn(batch, *shape, generator=self.generator)
        return torch.rand(batch, *shape, generator=self.generator)


def _preprocessing(meta: CheckpointMeta, *, raw: bool) -> dict[str, Any]:
    """What the exported input expects, for whoever deploys it."""
    table = meta.feature_mean is not None
    described: dict[str, Any] = {
        "input_shape": ["batch", *meta.input_shape], "layout": "a table row as (batch, 1, 1, features)" if table
        else "NCHW", "classes": meta.classes, "task": meta.task.model_dump(mode="json"), "arch": meta.arch}
    if table:
        described.update(features=meta.features, feature_mean=meta.feature_mean, feature_std=meta.feature_std)
    described["mean"], described["std"] = list(meta.mean), list(meta.std)
    if raw:
        described["expects"] = ("raw column values in the order of 'features'; the scaling is inside the graph" if table
                                else "pixel values in [0, 1] at the input shape (resize and convert the colour "
                                     "first); the mean/std scaling is inside the graph")
    else:
        described["expects"] = ("(value - feature_mean) / feature_std per column, then (z - mean) / std" if table
                                else "pixel values in [0, 1] at the input shape, then (x - mean) / std per channel")
    if meta.task.kind == "reconstruction":
        described["output"] = ("the reconstruction of the scaled input: an anomaly score is the mean squared "
                               "difference between the two")
        classes = meta.classes or []
        described["normal_labels"] = [classes[i] if i < len(classes) else i for i in meta.task.normal_classes]
        if meta.anomaly_threshold is not None:
            described["anomaly_threshold"] = {**meta.anomaly_threshold.model_dump(mode="json"),
                                              "rule": "anomalous where the anomaly score is above value"}
    return described


def with_metadata(payload: bytes, properties: dict[str, str]) -> bytes:
    """ONNX bytes with `properties` in the model's metadata (onnxruntime: `get_modelmeta().custom_metadata_map`)."""
    import onnx

    proto = onnx.load_from_string(payload)
    for key, value in properties.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def _parity(model: nn.Module, session: Any, batch: torch.Tensor, tolerance: float) -> dict[str, Any]:
    """max |torch - onnxruntime| must be within `tolerance` times the largest |output|: float32 rounding
    grows with the outputs, and tiny outputs must not pass trivially.

    An absolute bound says nothing about a model whose outputs are tiny (an untrained torchvision
    MobileNetV3 returns logits of about 1e-10: any graph would pass), and refuses a correct export whose
    outputs are large (logits of 1e5 differ by about 1e-2 from rounding alone).
    """
    with torch.inference_mode():
        expected = model(batch).numpy()
    if not np.isfinite(expected).all():
        raise DnnpruneError("PyTorch's own output is not finite (NaN or inf) on a random batch, so the export cannot "
                            "be checked; nothing was written")
    got = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
    if got.shape != expected.shape:
        raise DnnpruneError(f"the ONNX model returns shape {got.shape}, PyTorch {expected.shape}; nothing was written")
    diff = float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max()) if expected.size else 0.0
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    bound = tolerance * scale
    if not diff <= bound:
        raise DnnpruneError(f"onnxruntime differs from PyTorch by {diff:.3g}, more than tolerance {tolerance:g} times "
                            f"the largest output {scale:.3g} ({bound:.3g}); nothing was written; raise --tolerance "
                            "only if that is acceptable")
    return {"samples": int(batch.shape[0]), "max_abs_diff": diff, "max_abs_output": scale, "bound": bound,
            "tolerance": tolerance, "passed": True}


def _latency(model: nn.Module, session: Any, shape: tuple[int, ...], section: ExportSection,
             inputs: _InputSampler) -> list[dict[str, Any]]:
    """PyTorch and onnxruntime on the same inputs, interleaved in one process, medians."""
    rows = []
    name = session.get_inputs()[0].name
    for batch in section.batch_sizes:
        x = inputs(batch, shape)
        feed = {name: x.numpy()}
        torch_ms, ort_ms = interleaved_ms([functools.partial(_torch_run, model, x),
                                           functools.partial(session.run, None, feed)], section.repeats)
        rows.append({"batch_size": batch, "torch_ms": torch_ms, "onnxruntime_ms": ort_ms,
                     "speedup": torch_ms / ort_ms if ort_ms else None})
    return rows


def _torch_run(model: nn.Module, x: torch.Tensor) -> None:
    with torch.inference_mode():
        model(x)

