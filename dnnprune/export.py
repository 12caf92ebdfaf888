"""`export`: the rebuilt model as ONNX, checked against onnxruntime, with both runtimes' CPU latency.

ONNX has no sparse or n-bit weights that every runtime reads, so quantized and sparse layers are
exported with their decoded (dense float32) weights; the report lists them. The batch axis is
dynamic. The export is only kept if onnxruntime reproduces the PyTorch outputs on a random batch
within the tolerance, relative to the outputs' scale (float32 rounding grows with it); otherwise
nothing is written and the command fails with the difference.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dnnprune.checkpoint import atomic_write_bytes, meta_of
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


@command("export", lineage=False)
def export(model: nn.Module, section: ExportSection, *, data: DataSection, device: torch.device, observer: Observer,
           output: Path) -> tuple[nn.Module, ExportReport]:
    """Write `output` (ONNX) only after onnxruntime agrees with PyTorch."""
    meta = meta_of(model)
    model = model.cpu().eval()
    shape = tuple(meta.input_shape)
    generator = torch.Generator().manual_seed(section.seed)
    sample = torch.randn(2, *shape, generator=generator)
    payload = onnx_bytes(model, sample, exporter=section.exporter, opset=section.opset)
    session = onnx_session(payload)
    check = torch.randn(section.check_batch, *shape, generator=generator)
    parity = _parity(model, session, check, section.tolerance)
    atomic_write_bytes(output, payload)
    latency = _latency(model, session, shape, section) if section.latency else []
    report = ExportReport(output=str(output), onnx_bytes=len(payload), opset=section.opset, exporter=section.exporter,
                          input_name=session.get_inputs()[0].name, input_shape=list(session.get_inputs()[0].shape),
                          dense_layers=sorted(meta.encodings), parity=parity, latency=latency)
    return model, report


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


def _latency(model: nn.Module, session: Any, shape: tuple[int, ...], section: ExportSection) -> list[dict[str, Any]]:
    """PyTorch and onnxruntime on the same inputs, interleaved in one process, medians."""
    rows = []
    name = session.get_inputs()[0].name
    for batch in section.batch_sizes:
        x = torch.randn(batch, *shape)
        feed = {name: x.numpy()}
        torch_ms, ort_ms = interleaved_ms([functools.partial(_torch_run, model, x),
                                           functools.partial(session.run, None, feed)], section.repeats)
        rows.append({"batch_size": batch, "torch_ms": torch_ms, "onnxruntime_ms": ort_ms,
                     "speedup": torch_ms / ort_ms if ort_ms else None})
    return rows


def _torch_run(model: nn.Module, x: torch.Tensor) -> None:
    with torch.inference_mode():
        model(x)

