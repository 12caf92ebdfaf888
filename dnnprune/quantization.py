"""Weight quantization (linear and k-means weight sharing) and its checkpoint codecs.

Two methods, both per layer and weight-only (biases stay float32):
- linear: symmetric, one scale per output channel, codes in [-(2^(b-1)-1), 2^(b-1)-1];
- kmeans: weight sharing (Han et al. 2016), one codebook of 2^b centroids per layer, linear
  initialisation over [min, max], optional centroid fine-tuning with the codes frozen.

A quantized weight lives in memory as its dequantized float32 values, made by the very decode the
loader runs, so a reloaded checkpoint gives bit-identical outputs. On disk it is its codes packed at
b bits (int8 for 8-bit linear), beside a float32 codebook or per-channel scales. Encoding is derived
from the values alone and checked on every save, so a later step that keeps the values on their grid
(e.g. removing channels) keeps the encoding, and one that changes them fails with a clear line.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn
from rich.progress import Progress
from torch.nn.utils import parametrize

from dnnprune.checkpoint import METADATA_KEY, CheckpointMeta, describe_structure, meta_of
from dnnprune.encoding import encode_state, register_codec
from dnnprune.errors import CheckpointError, DnnpruneError
from dnnprune.metrics import count_parameters, measure_latency
from dnnprune.patterns import select_layers
from dnnprune.recipe import FineTuneSection, LatencySection, QuantizeSection, Recipe

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CHUNK = 1 << 20  # codes per packing step; a multiple of 8, so every step fills whole bytes
_SCALE_BITS = 16  # significant bits kept in a linear scale: code x scale is then exact in float32


# ----------------------------------------------------------------------------- bit packing


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2^bits) as a flat uint8 tensor, `bits` per code, least significant bit first."""
    _check_bits(bits)
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) to pack at {bits} bits")
    flat = flat.to(torch.uint8)
    if bits == 8:
        return flat.clone()
    code_shifts = torch.arange(bits, dtype=torch.uint8)
    byte_shifts = torch.arange(8, dtype=torch.uint8)
    out = []
    for start in range(0, flat.numel(), _CHUNK):
        stream = ((flat[start:start + _CHUNK, None] >> code_shifts) & 1).reshape(-1)
        stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)])
        out.append((stream.view(-1, 8) << byte_shifts).sum(1).to(torch.uint8))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The `count` codes of `pack_bits`, as int64."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.numel() < math.ceil(count * bits / 8):
        raise CheckpointError(f"packed codes hold too few bytes for {count} {bits}-bit codes; the file is corrupt")
    packed = packed.reshape(-1)
    if bits == 8:
        return packed[:count].long()
    code_shifts = torch.arange(bits)
    byte_shifts = torch.arange(8, dtype=torch.uint8)
    out = []
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        first = start * bits // 8
        chunk = packed[first:first + math.ceil(n * bits / 8)]
        stream = ((chunk[:, None] >> byte_shifts) & 1).reshape(-1)[: n * bits]
        out.append((stream.view(n, bits).long() << code_shifts).sum(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _check_bits(bits: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")


# ----------------------------------------------------------------------------- linear


def linear_grid(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel quantization, returned dequantized."""
    qmax = (1 << (bits - 1)) - 1
    rows = weight.reshape(weight.shape[0], -1).float()
    scale = _round_significand(rows.abs().amax(1) / qmax)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(rows / safe[:, None]), -qmax, qmax)
    return (codes * scale[:, None]).reshape(weight.shape)


def _round_significand(x: torch.Tensor) -> torch.Tensor:
    mantissa, exponent = torch.frexp(x.double())
    return torch.ldexp(torch.round(mantissa * 2.0**_SCALE_BITS) / 2.0**_SCALE_BITS, exponent.double()).float()


def linear_codes(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (float, rows x cols) and scales that reproduce a weight on a linear grid exactly.

    The scale is max|row| / m for the largest m <= qmax that fits; trying smaller m covers a row whose
    largest code was cut away (its input channel pruned after quantization).
    """
    qmax = (1 << (bits - 1)) - 1
    rows = weight.reshape(weight.shape[0], -1).float()
    amax = rows.abs().amax(1)
    scales = torch.zeros_like(amax)
    codes = torch.zeros_like(rows)
    todo = amax > 0
    for m in range(qmax, 0, -1):
        if not bool(todo.any()):
            break
        idx = todo.nonzero().squeeze(1)
        s = amax[idx] / m
        q = torch.round(rows[idx] / s[:, None])
        ok = (q * s[:, None] == rows[idx]).all(1)
        scales[idx[ok]], codes[idx[ok]] = s[ok], q[ok]
        todo[idx[ok]] = False
    if bool(todo.any()) or not bool(torch.isfinite(rows).all()):
        raise CheckpointError(
            f"is stored as {bits}-bit linear but its values are off their grid: they changed after quantization "
            "(a step that trains or edits a quantized checkpoint must keep its weights); quantize the float checkpoint instead"
        )
    return codes, scales


class LinearCodec:
    """int8 codes for 8 bits, else codes + 2^(b-1)-1 packed at b bits; float32 scales per output channel."""

    def encode(self, weight: torch.Tensor, spec: dict[str, Any]) -> dict[str, torch.Tensor]:
        bits = int(spec["bits"])
        codes, scales = linear_codes(weight, bits)
        if bits == 8:
            parts = {"codes": codes.to(torch.int8).reshape(weight.shape), "scales": scales}
        else:
            qmax = (1 << (bits - 1)) - 1
            parts = {"codes": pack_bits(codes.long() + qmax, bits), "scales": scales, "shape": _shape_tensor(weight)}
        return _verified(self, parts, spec, weight)

    def decode(self, parts: dict[str, torch.Tensor], spec: dict[str, Any]) -> torch.Tensor:
        bits = int(spec["bits"])
        scales = _part(parts, "scales").float()
        if "shape" in parts:
            shape = _shape_of(parts)
            codes = unpack_bits(_part(parts, "codes"), bits, math.prod(shape)) - ((1 << (bits - 1)) - 1)
        else:
            codes = _part(parts, "codes")
            shape = tuple(codes.shape)
        if scales.numel() == 0 or codes.numel() % scales.numel():
            raise CheckpointError("linear-quantized tensor has codes and scales that do not fit together; the file is corrupt")
        return (codes.reshape(scales.numel(), -1).float() * scales[:, None]).reshape(shape)


# ----------------------------------------------------------------------------- k-means


def kmeans_grid(weight: torch.Tensor, bits: int, iterations: int) -> torch.Tensor:
    """Weight sharing: every weight replaced by the nearest of 2^bits centroids (exact zeros stay zero)."""
    codebook, codes = kmeans_codebook(weight, bits, iterations)
    return codebook[codes].reshape(weight.shape)


def kmeans_codebook(weight: torch.Tensor, bits: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebook (float32) and one code per weight.

    A layer with at most 2^bits distinct values keeps them exactly. Exact zeros (pruned weights) get a
    centroid of their own fixed at 0, and the remaining 2^bits - 1 cluster the non-zero weights, as in
    Deep Compression where only surviving weights are shared.
    """
    flat = weight.reshape(-1).float()
    k = 1 << bits
    distinct = torch.unique(flat)
    if distinct.numel() <= k:
        return distinct, torch.searchsorted(distinct, flat)
    zero = flat == 0
    if not bool(zero.any()):
        centroids = lloyd_1d(flat, k, iterations).float()
        return centroids, _nearest(centroids, flat)
    centroids = lloyd_1d(flat[~zero], k - 1, iterations).float()
    codes = torch.zeros_like(flat, dtype=torch.long)
    codes[~zero] = 1 + _nearest(centroids, flat[~zero])
    return torch.cat([torch.zeros(1), centroids]), codes


def lloyd_1d(values: torch.Tensor, k: int, iterations: int) -> torch.Tensor:
    """1-D k-means from centroids spread evenly over [min, max]; sorted float64 centroids.

    On sorted values every cluster is a contiguous run, so one step is a binary search of the
    midpoints plus prefix sums: O(k log n) per iteration after one sort.
    """
    xs = torch.sort(values.double().reshape(-1)).values
    distinct = torch.unique_consecutive(xs)
    if distinct.numel() <= k:
        return distinct
    prefix = torch.cat([xs.new_zeros(1), torch.cumsum(xs, 0)])
    ends = torch.tensor([0, xs.numel()])
    centroids = torch.linspace(float(xs[0]), float(xs[-1]), k, dtype=torch.float64)
    edges: torch.Tensor | None = None
    for _ in range(iterations):
        inner = torch.searchsorted(xs, (centroids[1:] + centroids[:-1]) / 2, right=True)
        new_edges = torch.cat([ends[:1], inner, ends[1:]])
        if edges is not None and torch.equal(new_edges, edges):
            break
        edges = new_edges
        counts = edges[1:] - edges[:-1]
        sums = prefix[edges[1:]] - prefix[edges[:-1]]
        centroids = torch.sort(torch.where(counts > 0, sums / counts.clamp(min=1), centroids)).values
    return centroids


def _nearest(sorted_centroids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.bucketize(values, (sorted_centroids[1:] + sorted_centroids[:-1]) / 2)


class KMeansCodec:
    """Codes packed at b bits into bytes, beside the float32 codebook (the layer's distinct values)."""

    def encode(self, weight: torch.Tensor, spec: dict[str, Any]) -> dict[str, torch.Tensor]:
        bits = int(spec["bits"])
        flat = weight.reshape(-1).float()
        codebook = torch.unique(flat)
        if codebook.numel() > 1 << bits:
            raise CheckpointError(
                f"is stored as {bits}-bit kmeans but holds {codebook.numel()} distinct values, more than its "
                f"{1 << bits} centroids: it changed after quantization (a step that trains or edits a quantized "
                "checkpoint must keep its weights on the codebook); quantize the float checkpoint instead"
            )
        parts = {"codes": pack_bits(torch.searchsorted(codebook, flat), bits), "codebook": codebook,
                 "shape": _shape_tensor(weight)}
        return _verified(self, parts, spec, weight)

    def decode(self, parts: dict[str, torch.Tensor], spec: dict[str, Any]) -> torch.Tensor:
        shape = _shape_of(parts)
        codebook = _part(parts, "codebook").float()
        codes = unpack_bits(_part(parts, "codes"), int(spec["bits"]), math.prod(shape))
        if codes.numel() and int(codes.max()) >= codebook.numel():
            raise CheckpointError("kmeans codes point past the end of their codebook; the file is corrupt")
        return codebook[codes].reshape(shape)


def _verified(codec: Any, parts: dict[str, torch.Tensor], spec: dict[str, Any], weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Never write a file that would load different weights."""
    if not torch.equal(codec.decode(parts, spec), weight.detach().float().cpu()):
        raise CheckpointError(f"does not survive its {spec['codec']} encoding exactly; quantize the float checkpoint again")
    return parts


def _shape_tensor(weight: torch.Tensor) -> torch.Tensor:
    return torch.tensor(list(weight.shape), dtype=torch.int64)


def _shape_of(parts: dict[str, torch.Tensor]) -> tuple[int, ...]:
    return tuple(int(v) for v in _part(parts, "shape").tolist())


def _part(parts: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in parts:
        raise CheckpointError(f"quantized tensor lacks its {name!r} part; the file is corrupt")
    return parts[name]


CODECS: dict[str, LinearCodec | KMeansCodec] = {"linear": LinearCodec(), "kmeans": KMeansCodec()}
for _name, _codec in CODECS.items():
    register_codec(_name, _codec)


def on_grid(weight: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
    """The weight exactly as a checkpoint will store and reload it."""
    codec = CODECS[spec["codec"]]
    return codec.decode(codec.encode(weight, spec), spec)


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
    encodings: dict[str, dict[str, Any]]
    finetune: dict[str, Any] | None = None
    weights_changed: dict[str, bool] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        finetune = None if self.finetune is None else {**self.finetune, "weights_changed": self.weights_changed}
        return {"layers": [asdict(layer) for layer in self.layers], "finetune": finetune}


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
        if spec is not None:
            raise DnnpruneError(
                f"layer {name!r} is already quantized ({spec['codec']}, {spec['bits']} bits); quantize the float checkpoint "
                f"it came from, or leave {name!r} out of the layer patterns"
            )
        if parametrize.is_parametrized(module):
            raise DnnpruneError(f"layer {name!r} is parametrized; remove its parametrizations before quantizing")
        if module.weight.dtype != torch.float32:
            raise DnnpruneError(f"layer {name!r} holds {module.weight.dtype} weights; quantize expects a float32 model")
    order = [name for name, _ in model.named_modules()]
    return {name: bits[name] for name in order if name in bits}


def quantize(model: nn.Module, config: QuantizeSection, *, train_loader: Iterable | None = None,
             device: torch.device | str = "cpu", progress: Progress | None = None) -> QuantizeResult:
    """Quantize the layers the config selects, in place; records the encodings in the model's metadata."""
    plan = plan_layers(model, config)
    specs = {name: {"codec": config.method, "bits": bits} for name, bits in plan.items()}
    originals: dict[str, torch.Tensor] = {}
    for name, spec in specs.items():
        module = model.get_submodule(name)
        weight = module.weight.detach().to("cpu", torch.float32).clone()
        if not bool(torch.isfinite(weight).all()):
            raise DnnpruneError(f"layer {name!r} has NaN or infinite weights; it cannot be quantized")
        originals[name] = weight
        grid = linear_grid(weight, spec["bits"]) if spec["codec"] == "linear" else kmeans_grid(weight, spec["bits"], config.iterations)
        _set_weight(module, on_grid(grid, spec))
    history = None
    changed: dict[str, bool] = {}
    if wants_finetune(config.finetune):
        if train_loader is None:
            raise DnnpruneError("quantize.finetune asks for training but no training data was given")
        history, changed = finetune_codes(model, specs, train_loader, config.finetune, device=device,
                                          progress=progress, seed=config.seed)
    layers = [_layer_result(name, model.get_submodule(name), originals[name], spec) for name, spec in specs.items()]
    encodings = {f"{name}.weight": spec for name, spec in specs.items()}
    meta = getattr(model, "dnnprune_meta", None)
    if isinstance(meta, CheckpointMeta):
        meta.encodings.update(encodings)
    return QuantizeResult(layers, encodings, history, changed)


def wants_finetune(config: FineTuneSection) -> bool:
    return config.epochs > 0


def _encodings(model: nn.Module) -> dict[str, dict[str, Any]]:
    meta = getattr(model, "dnnprune_meta", None)
    return meta.encodings if isinstance(meta, CheckpointMeta) else {}


def _set_weight(module: nn.Module, value: torch.Tensor) -> None:
    with torch.no_grad():
        module.weight.copy_(value)


def _layer_result(name: str, module: nn.Module, original: torch.Tensor, spec: dict[str, Any]) -> LayerResult:
    weight = module.weight.detach().cpu().float()
    error = (weight.double() - original.double()).pow(2).sum().item()
    signal = original.double().pow(2).sum().item()
    sqnr = 10.0 * math.log10(signal / error) if error > 0 and signal > 0 else float("inf")
    stored = CODECS[spec["codec"]].encode(weight, spec)
    return LayerResult(name=name, type=type(module).__name__, method=spec["codec"], bits=spec["bits"],
                       params=weight.numel(), mse=error / max(1, weight.numel()), sqnr_db=sqnr,
                       bytes_before=original.numel() * 4, bytes_after=sum(t.nbytes for t in stored.values()))


# ----------------------------------------------------------------------------- fine-tuning with codes frozen


class _SharedWeight(nn.Module):
    """weight = codebook[codes]: autograd sums the gradients of a cluster's weights into its centroid."""

    def __init__(self, codes: torch.Tensor, codebook: torch.Tensor, frozen: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("trainable", (~frozen).float())
        self.codebook = nn.Parameter(codebook.clone())
        self.codebook.register_hook(lambda grad: grad * self.trainable)

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        return self.codebook[self.codes]


class _ScaledCodes(nn.Module):
    """weight = codes x scale per output channel, with the scales trained."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, shape: torch.Size) -> None:
        super().__init__()
        self.register_buffer("codes", codes)
        self.scales = nn.Parameter(scales.clone())
        self.shape = shape

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        return (self.codes * self.scales[:, None]).reshape(self.shape)


def finetune_codes(model: nn.Module, specs: dict[str, dict[str, Any]], train_loader: Iterable, config: FineTuneSection, *,
                   device: torch.device | str, progress: Progress | None = None, seed: int = 0) -> tuple[dict[str, Any], dict[str, bool]]:
    """Train with every code frozen (Deep Compression's centroid fine-tuning), then put weights back on their grid."""
    from dnnprune.training import train

    device = torch.device(device)
    model.to(device)
    tied: dict[str, nn.Module] = {}
    for name, spec in specs.items():
        module = model.get_submodule(name)
        weight = module.weight.detach().cpu()
        if spec["codec"] == "kmeans":
            codebook, codes = torch.unique(weight, return_inverse=True)
            holder: nn.Module = _SharedWeight(codes, codebook, codebook == 0)
        else:
            codes, scales = linear_codes(weight, spec["bits"])
            holder = _ScaledCodes(codes, scales, weight.shape)
        parametrize.register_parametrization(module, "weight", holder.to(device), unsafe=True)
        module.parametrizations.weight.original.requires_grad_(False)
        tied[name] = holder
    changed: dict[str, bool] = {}
    try:
        history = train(model, train_loader, config, device=device, progress=progress, description="fine-tune codes", seed=seed)
    finally:
        for name, holder in tied.items():
            module = model.get_submodule(name)
            before = module.parametrizations.weight.original.detach().cpu().clone()
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            module.weight.requires_grad_(True)
            _set_weight(module, on_grid(_settled(holder), specs[name]))
            changed[name] = not torch.equal(module.weight.detach().cpu(), before)
    model.eval()
    return history.as_dict(), changed


def _settled(holder: nn.Module) -> torch.Tensor:
    if isinstance(holder, _SharedWeight):
        return holder.codebook.detach().cpu().float()[holder.codes.cpu()]
    scales = _round_significand(holder.scales.detach().cpu().abs())
    return (holder.codes.cpu() * scales[:, None]).reshape(holder.shape)


# ----------------------------------------------------------------------------- the command's body


def quantize_checkpoint(model: nn.Module, recipe: Recipe, *, device: torch.device, source: Path | None = None,
                        progress: Progress | None = None) -> dict[str, Any]:
    """Accuracy before, quantize (and fine-tune), accuracy after, optional int8 timing, lineage."""
    from dnnprune.loaders import eval_loader, train_loader
    from dnnprune.recipe import recipe_sha256
    from dnnprune.training import evaluate

    meta = meta_of(model)
    config = recipe.quantize
    plan_layers(model, config)  # every pattern checked before any data is read
    loader = eval_loader(meta, recipe.data, "test", samples=config.samples, seed=config.seed) if config.evaluate else None
    before = evaluate(model.to(device), loader, device) if loader is not None else None
    train_data = (train_loader(meta, recipe.data, config.finetune.batch_size, config.seed)
                  if wants_finetune(config.finetune) else None)
    result = quantize(model, config, train_loader=train_data, device=device, progress=progress)
    after = evaluate(model.to(device), loader, device) if loader is not None else None
    model.to("cpu")
    int8 = int8_execution(model, meta.input_shape, recipe.score.latency_config, loader) if config.int8_execution else None
    meta.lineage_entry("quantize", recipe_sha256(recipe), {
        "method": config.method, "layers": {r.name: r.bits for r in result.layers},
        "test_top1_before": before.top1 if before else None, "test_top1_after": after.top1 if after else None,
    })
    totals = _totals(model, meta, result, source)
    return {
        "method": config.method,
        **result.as_dict(),
        "totals": totals,
        "accuracy": {"split": "test", "before": before.as_dict() if before else None, "after": after.as_dict() if after else None},
        "int8_execution": int8,
        "recipe": recipe.model_dump(mode="json"),
    }


def _totals(model: nn.Module, meta: CheckpointMeta, result: QuantizeResult, source: Path | None) -> dict[str, Any]:
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
        "disk_bytes_before": source.stat().st_size if source is not None and source.exists() else None,
        "disk_bytes_after": None,
    }


def with_file_sizes(body: dict[str, Any], output: Path) -> dict[str, Any]:
    """Fill in what only the written file can tell: its size, the compression and bits per weight."""
    totals = body["totals"]
    size = output.stat().st_size
    totals["disk_bytes_after"] = size
    totals["effective_bits_per_weight"] = 8.0 * size / totals["params"] if totals["params"] else None
    totals["compression"] = totals["disk_bytes_before"] / size if totals["disk_bytes_before"] else None
    totals["prediction_error"] = abs(totals["predicted_file_bytes"] - size) / size
    return body


_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
                torch.bool: "BOOL"}


def predicted_file_bytes(model: nn.Module, meta: CheckpointMeta) -> int:
    """Size of the checkpoint `save` will write: the stored tensors' bytes plus the safetensors header."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    stored = encode_state(state, meta.encodings)
    described = copy.deepcopy(meta)
    described.structure, described.replaced = describe_structure(model, meta.arch, meta.arch_args)
    header: dict[str, Any] = {"__metadata__": {METADATA_KEY: described.to_json()}}
    offset = 0
    for name in sorted(stored):
        tensor = stored[name]
        header[name] = {"dtype": _DTYPE_NAMES.get(tensor.dtype, "F32"), "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    length = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode())
    return 8 + length + (-length) % 8 + offset


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
    from dnnprune.training import evaluate

    return evaluate(model, loader, "cpu").as_dict() if loader is not None else None
