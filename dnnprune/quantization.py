"""Weight quantization: linear and k-means weight sharing, per layer, weight-only (biases stay float32).

- linear: symmetric, one scale per output channel, codes in [-(2^(b-1)-1), 2^(b-1)-1];
- kmeans: weight sharing (Han et al. 2016), one codebook of 2^b centroids per layer, linear
  initialisation over [min, max], optional centroid fine-tuning with the codes frozen.

A quantized weight lives in memory as its dequantized float32 values, made by the very decode the
loader runs (`codecs.on_grid`), so a reloaded checkpoint gives bit-identical outputs. How it is
stored (packed codes, codebook, scales, and the sparse form beneath when the layer was pruned) is
the codecs' business; this module chooses the grid and records a typed `Encoding` per layer.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from dnnprune.checkpoint import CheckpointMeta, meta_of, predicted_file_bytes
from dnnprune.codecs import (
    Encoding,
    KMeansSpec,
    LinearSpec,
    as_encoding,
    encoded_nbytes,
    kmeans_grid,
    linear_grid,
    on_grid,
)
from dnnprune.constraints import held_encodings
from dnnprune.errors import DnnpruneError
from dnnprune.lineage import command
from dnnprune.loaders import eval_loader, subset_size, train_loader
from dnnprune.metrics import count_parameters, measure_latency
from dnnprune.observe import NULL_OBSERVER, Observer
from dnnprune.patterns import select_layers
from dnnprune.recipe import DataSection, FineTuneSection, LatencySection, QuantizeSection
from dnnprune.reports import Report
from dnnprune.tasks import make_task
from dnnprune.training import (
    check_distillation_runs,
    evaluate,
    fit_loop,
    frozen_teacher,
    undone_if_worse,
    wants_training,
)

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


# ----------------------------------------------------------------------------- the quantize step


@dataclass
class LayerResult:
    name: str
    type: str
    method: str
    bits: int
    params: int
    mse: float
    sqnr_db: float
    bytes_before: int
    bytes_after: int


@dataclass
class QuantizeResult:
    layers: list[LayerResult]
    encodings: dict[str, Encoding]
    finetune: dict[str, Any] | None = None
    weights_changed: dict[str, bool] = field(default_factory=dict)
    kept_as_is: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        finetune = None if self.finetune is None else {**self.finetune, "weights_changed": self.weights_changed}
        return {"layers": [asdict(layer) for layer in self.layers], "finetune": finetune,
                "kept_as_is": dict(self.kept_as_is)}


def plan_layers(model: nn.Module, config: QuantizeSection) -> dict[str, int]:
    """Layer name -> bits, in model order; raises on any pattern or layer the step cannot take."""
    bits: dict[str, int] = {}
    if config.layers:
        for name in select_layers(model, config.layers, supported=SUPPORTED, what="quantize layer pattern"):
            bits[name] = config.bits
    for pattern, layer_bits in config.layer_bits.items():
        for name in select_layers(model, [pattern], supported=SUPPORTED, what="layer_bits pattern"):
            bits[name] = layer_bits
    encodings = _encodings(model)
    for name in bits:
        module = model.get_submodule(name)
        spec = encodings.get(f"{name}.weight")
        if spec is not None and spec.values is not None:
            raise DnnpruneError(
                f"layer {name!r} is already quantized ({spec.describe()}); quantize the float checkpoint "
                f"it came from, or leave {name!r} out of the layer patterns"
            )
        if parametrize.is_parametrized(module):
            raise DnnpruneError(f"layer {name!r} is parametrized; remove its parametrizations before quantizing")
        if module.weight.dtype != torch.float32:
            raise DnnpruneError(f"layer {name!r} holds {module.weight.dtype} weights; quantize expects a float32 model")
    order = [name for name, _ in model.named_modules()]
    return {name: bits[name] for name in order if name in bits}


def quantize_layers(model: nn.Module, config: QuantizeSection, *, train_loader: Iterable | None = None,
                    val_loader: Iterable | None = None, device: torch.device | str = "cpu",
                    observer: Observer = NULL_OBSERVER) -> QuantizeResult:
    """Quantize the layers the config selects, in place; records the encodings in the model's metadata.

    A layer already stored sparse (pruned) keeps its sparse form, with the codes stacked on it. A layer
    whose codes and codebook would take more bytes than it takes now (a tiny layer at many bits) is left
    as it is, and the result says so, unless `config.keep_larger` asks for the codes anyway. With a
    `val_loader`, the fine-tune is undone when it makes the validation metric worse (`_kept_if_better`).
    """
    plan = plan_layers(model, config)
    check_distillation_runs(config.finetune)
    teacher = frozen_teacher(model, config.finetune)
    existing = _encodings(model)
    encodings = {f"{name}.weight": _stacked(existing.get(f"{name}.weight"), config.method, bits)
                 for name, bits in plan.items()}
    originals: dict[str, torch.Tensor] = {}
    stored_before: dict[str, int] = {}  # what each layer takes in the input checkpoint (sparse inputs: less than fp32)
    kept: dict[str, str] = {}
    for name, bits in plan.items():
        module = model.get_submodule(name)
        weight = module.weight.detach().to("cpu", torch.float32).clone()
        if not bool(torch.isfinite(weight).all()):
            raise DnnpruneError(f"layer {name!r} has NaN or infinite weights; it cannot be quantized")
        grid = linear_grid(weight, bits) if config.method == "linear" else kmeans_grid(weight, bits, config.iterations)
        coded = on_grid(grid, encodings[f"{name}.weight"])
        now = _stored_nbytes(weight, existing.get(f"{name}.weight"))
        after = encoded_nbytes(coded, encodings[f"{name}.weight"])
        if after >= now and not config.keep_larger:
            kept[name] = f"{bits}-bit codes would take {after:,} bytes, more than the {now:,} it takes now"
            del encodings[f"{name}.weight"]
            continue
        originals[name], stored_before[name] = weight, now
        _set_weight(module, coded)
    meta = getattr(model, "dnnprune_meta", None)
    if isinstance(meta, CheckpointMeta):
        meta.encodings.update(encodings)
    history = None
    changed: dict[str, bool] = {}
    if wants_finetune(config.finetune):
        if train_loader is None:
            raise DnnpruneError("quantize.finetune asks for training but no training data was given")
        def run() -> tuple[dict[str, Any], dict[str, bool]]:
            return finetune_codes(model, encodings, train_loader, config.finetune, device=device,  # type: ignore[arg-type]
                                  observer=observer, seed=config.seed, teacher=teacher)
        history, changed = (run() if val_loader is None else
                            _kept_if_better(model, run, val_loader, config.confidence, torch.device(device)))
    layers = [_layer_result(name, model.get_submodule(name), originals[name], encodings[f"{name}.weight"],
                            stored_before[name]) for name in plan if name in originals]
    return QuantizeResult(layers, encodings, history, changed, kept)


def _stored_nbytes(weight: torch.Tensor, existing: Encoding | None) -> int:
    """Bytes the weight takes in the checkpoint today: its current encoding, or fp32."""
    return encoded_nbytes(weight, existing) if existing is not None else weight.numel() * weight.element_size()


def wants_finetune(config: FineTuneSection) -> bool:
    return wants_training(config)


def _stacked(existing: Encoding | None, method: str, bits: int) -> Encoding:
    values = LinearSpec(bits=bits) if method == "linear" else KMeansSpec(bits=bits)
    return Encoding(sparse=existing.sparse if existing is not None else None, values=values)


def _encodings(model: nn.Module) -> dict[str, Encoding]:
    meta = getattr(model, "dnnprune_meta", None)
    return {k: as_encoding(v) for k, v in meta.encodings.items()} if isinstance(meta, CheckpointMeta) else {}


def _set_weight(module: nn.Module, value: torch.Tensor) -> None:
    with torch.no_grad():
        module.weight.copy_(value)


def _layer_result(name: str, module: nn.Module, original: torch.Tensor, spec: Encoding,
                  bytes_before: int) -> LayerResult:
    weight = module.weight.detach().cpu().float()
    error = (weight.double() - original.double()).pow(2).sum().item()
    signal = original.double().pow(2).sum().item()
    sqnr = 10.0 * math.log10(signal / error) if error > 0 and signal > 0 else float("inf")
    values = spec.values
    return LayerResult(name=name, type=type(module).__name__, method=values.codec if values else "float",
                       bits=values.bits if values else 32, params=weight.numel(), mse=error / max(1, weight.numel()),
                       sqnr_db=sqnr, bytes_before=bytes_before, bytes_after=encoded_nbytes(weight, spec))


# ----------------------------------------------------------------------------- fine-tuning with codes frozen


def finetune_codes(model: nn.Module, encodings: dict[str, Encoding], train_loader: Iterable, config: FineTuneSection, *,
                   device: torch.device | str, observer: Observer = NULL_OBSERVER,
                   seed: int = 0, teacher: nn.Module | None = None) -> tuple[dict[str, Any], dict[str, bool]]:
    """Train with every code frozen (Deep Compression's centroid fine-tuning); weights end on their grid.

    Returns the training history and, per layer, whether fine-tuning changed its weights.
    """
    before = {name: model.get_parameter(name).detach().cpu().clone() for name in encodings}
    with held_encodings(model, encodings):
        history = fit_loop(model, train_loader, config, device=torch.device(device), observer=observer,  # type: ignore[arg-type]
                           description="fine-tune codes", seed=seed, teacher=teacher)
    changed = {name.rpartition(".")[0]: not torch.equal(model.get_parameter(name).detach().cpu(), before[name])
               for name in encodings}
    model.eval()
    return history.as_dict(), changed


def _kept_if_better(model: nn.Module, run: Callable[[], tuple[dict[str, Any], dict[str, bool]]], val_loader: Iterable,
                    confidence: float, device: torch.device) -> tuple[dict[str, Any], dict[str, bool]]:
    """The fine-tune, undone when it lowers the validation metric: a step too large wrecks a quantized model
    rather than mending it, and the codes alone were the better model."""
    (history, changed), verdict = undone_if_worse(model, run, val_loader, device, task=make_task(meta_of(model).task),
                                                  confidence=confidence)
    model.eval()
    return {**history, **verdict}, changed if verdict["kept"] else dict.fromkeys(changed, False)


# ----------------------------------------------------------------------------- the command


class QuantizeReport(Report):
    method: str
    primary_metric: str
    layers: list[dict[str, Any]]
    kept_as_is: dict[str, str] = {}
    not_quantizable: dict[str, int] = Field(default_factory=dict, description="weight tensors no quantize pattern "
                                            "can reach (not a Linear or Conv weight, e.g. attention's packed "
                                            "in_proj_weight or an embedding), with their parameter counts; they "
                                            "stay float32")
    finetune: dict[str, Any] | None
    totals: dict[str, Any]
    metrics: dict[str, Any]
    int8_execution: dict[str, Any] | None
    section: dict[str, Any]

    def lineage_metrics(self) -> dict[str, Any]:
        before, after = self.metrics.get("before"), self.metrics.get("after")
        key = self.primary_metric
        return {"method": self.method, "layers": {row["name"]: row["bits"] for row in self.layers},
                f"test_{key}_before": before.get(key) if before else None,
                f"test_{key}_after": after.get(key) if after else None}

    def with_file_sizes(self, source: Path | None, output: Path) -> "QuantizeReport":
        """Fill in what only the written files can tell: their sizes, the compression, bits per weight."""
        totals = self.totals
        size = output.stat().st_size
        totals["disk_bytes_before"] = source.stat().st_size if source is not None and source.exists() else None
        totals["disk_bytes_after"] = size
        totals["effective_bits_per_weight"] = 8.0 * size / totals["params"] if totals["params"] else None
        totals["compression"] = totals["disk_bytes_before"] / size if totals["disk_bytes_before"] else None
        totals["prediction_error"] = abs(totals["predicted_file_bytes"] - size) / size
        return self


@command("quantize")
def quantize(model: nn.Module, section: QuantizeSection, *, data: DataSection, device: torch.device,
             observer: Observer) -> tuple[nn.Module, QuantizeReport]:
    """The task's metric before, quantize (and fine-tune codes), the metric after, optional int8 timing."""
    meta = meta_of(model)
    task = make_task(meta.task)
    plan_layers(model, section)  # every pattern checked before any data is read
    loader = eval_loader(meta, data, "test", samples=section.samples, seed=section.seed) if section.evaluate else None
    before = evaluate(model.to(device), loader, device, task=task) if loader is not None else None
    tuning = wants_finetune(section.finetune)
    train_data = train_loader(meta, data, section.finetune.batch_size, section.seed) if tuning else None
    val = (eval_loader(meta, data, "val", samples=subset_size(section, "val_samples", meta, data, "val"), seed=section.seed)
           if tuning and section.evaluate else None)
    result = quantize_layers(model, section, train_loader=train_data, val_loader=val, device=device, observer=observer)
    after = evaluate(model.to(device), loader, device, task=task) if loader is not None else None
    model.to("cpu")
    int8 = int8_execution(model, meta.input_shape, LatencySection(), loader) if section.int8_execution else None
    body = result.as_dict()
    return model, QuantizeReport(
        method=section.method, primary_metric=task.primary, layers=body["layers"], kept_as_is=body["kept_as_is"],
        not_quantizable=not_quantizable(model), finetune=body["finetune"],
        totals=_totals(model, meta, result),
        metrics={"split": "test", "before": before.as_dict() if before else None,
                 "after": after.as_dict() if after else None},
        int8_execution=int8, section=section.model_dump(mode="json"))


def not_quantizable(model: nn.Module) -> dict[str, int]:
    """Matrices (2-D and up) that are not the weight of a layer quantize encodes: a user asking for every
    layer should learn what stays float32 (a ViT's attention projections hold a quarter of its weights)."""
    reachable = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, SUPPORTED)}
    return {name: tensor.numel() for name, tensor in model.named_parameters()
            if tensor.dim() >= 2 and name not in reachable}


def _totals(model: nn.Module, meta: CheckpointMeta, result: QuantizeResult) -> dict[str, Any]:
    params = count_parameters(model)
    quantized = sum(layer.params for layer in result.layers)
    after = sum(layer.bytes_after for layer in result.layers)
    return {
        "params": params,
        "quantized_params": quantized,
        "quantized_weight_bytes_before": sum(layer.bytes_before for layer in result.layers),
        "quantized_weight_bytes_after": after,
        "quantized_bits_per_weight": 8.0 * after / quantized if quantized else None,
        "predicted_file_bytes": predicted_file_bytes(model, meta),
    }


# ----------------------------------------------------------------------------- optional real int8 execution


def int8_execution(model: nn.Module, input_shape: tuple[int, ...], latency: LatencySection,
                   loader: Iterable | None = None) -> dict[str, Any]:
    """Time torch's dynamic int8 Linear kernels against float32 on the CPU; the checkpoint is not affected."""
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError:
        return {"available": False, "reason": "this torch has no torch.ao.quantization.quantize_dynamic"}
    fp32 = copy.deepcopy(model).cpu().eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            int8 = quantize_dynamic(copy.deepcopy(fp32), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
            converted = sum(1 for m in int8.modules() if type(m).__module__.startswith("torch.ao.nn.quantized.dynamic")
                            and type(m).__name__ == "Linear")
            rows = []
            for batch in latency.batch_sizes:
                base = measure_latency(fp32, input_shape, batch, warmup=latency.warmup, repeats=latency.repeats, threads=latency.threads)
                fast = measure_latency(int8, input_shape, batch, warmup=latency.warmup, repeats=latency.repeats, threads=latency.threads)
                rows.append({"batch_size": batch, "fp32_median_ms": base.median_ms, "int8_median_ms": fast.median_ms,
                             "speedup": base.median_ms / fast.median_ms if fast.median_ms > 0 else None})
            accuracy = _int8_accuracy(int8, loader)
    except (RuntimeError, AssertionError, NotImplementedError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return {"available": False, "reason": f"torch dynamic int8 execution failed: {first}"}
    return {"available": True, "engine": torch.backends.quantized.engine, "linear_layers": converted,
            "latency": rows, "accuracy": accuracy,
            "note": "torch re-quantizes Linear weights per channel to int8 for this run; the checkpoint keeps dnnprune's encoding"}


def _int8_accuracy(model: nn.Module, loader: Iterable | None) -> dict[str, Any] | None:
    return evaluate(model, loader, "cpu").as_dict() if loader is not None else None
