"""`import`: a plain state dict from elsewhere becomes a self-describing checkpoint.

This is the only place that reads PyTorch's pickle format, and only with
`torch.load(weights_only=True)`, which refuses arbitrary objects.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from torch import nn

from dnnprune.checkpoint import (
    CheckpointMeta,
    attach_meta,
    check_runs,
    first_line,
    looks_like_safetensors,
    meta_of,
    pytorch_file_kind,
)
from dnnprune.data import DATASETS, InputSpec, default_spec, fit_channels, per_channel
from dnnprune.errors import CheckpointError, DnnpruneError
from dnnprune.files import read_bytes
from dnnprune.models import create_model
from dnnprune.models.registry import TORCHVISION_PREFIX
from dnnprune.models.tv import auxiliary_keys
from dnnprune.reports import Report

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


class ImportReport(Report):
    """What `import` built, and the file's tensors it left out (auxiliary training heads)."""

    arch: str
    arch_args: dict[str, Any]
    input_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dropped_keys: list[str] = Field(default_factory=list)

    def lineage_metrics(self) -> dict[str, Any]:
        return {"dropped_keys": len(self.dropped_keys)}

    def dropped_summary(self) -> str | None:
        """One line naming the heads whose tensors were left out, or None."""
        if not self.dropped_keys:
            return None
        heads = sorted({key.split(".")[0] for key in self.dropped_keys})
        return (f"left out {len(self.dropped_keys)} tensors of the auxiliary training heads {', '.join(heads)} "
                f"(used only by the training loss; inference never runs them)")


def import_weights(weights: Path, arch: str, *, num_classes: int | None = None,
                   input_shape: tuple[int, int, int] | None = None, mean: tuple[float, ...] | None = None,
                   std: tuple[float, ...] | None = None, dataset: str | None = None,
                   arch_args: dict[str, Any] | None = None) -> tuple[nn.Module, ImportReport]:
    """Rebuild `arch` around a plain state dict file; the model carries checkpoint metadata."""
    state, digest = read_weights(weights)
    model, report = import_state_dict(state, arch, num_classes=num_classes, input_shape=input_shape,
                                      mean=mean, std=std, dataset=dataset, arch_args=arch_args, source=str(weights))
    meta_of(model).file_sha256 = digest
    return model, report


def import_state_dict(state: dict[str, torch.Tensor], arch: str, *, num_classes: int | None = None,
                      input_shape: tuple[int, int, int] | None = None, mean: tuple[float, ...] | None = None,
                      std: tuple[float, ...] | None = None, dataset: str | None = None,
                      arch_args: dict[str, Any] | None = None, source: str = "the state dict"
                      ) -> tuple[nn.Module, ImportReport]:
    """`import_weights` on tensors already read (tests also run it on the meta device)."""
    spec = _input_spec(dataset, input_shape, mean, std)
    auxiliary = set(_auxiliary_keys(arch, state))
    args = {"num_classes": num_classes or _classes_count(dataset)
            or _infer_classes({k: v for k, v in state.items() if k not in auxiliary}),
            "in_channels": spec.shape[0], **(arch_args or {})}
    model = create_model(arch, **args)
    state, dropped = _drop_auxiliary_heads(model, state, arch)
    _load_strict(model, state, source, arch)
    check_runs(model, arch, spec.shape)
    classes = list(DATASETS[dataset].classes) if dataset and DATASETS[dataset].classes else None
    meta = CheckpointMeta(arch=arch, arch_args=args, input_shape=spec.shape, mean=spec.mean, std=spec.std,
                          dataset=dataset, classes=classes)
    report = ImportReport(arch=arch, arch_args=args, input_shape=spec.shape, mean=spec.mean, std=spec.std,
                          dropped_keys=dropped)
    return attach_meta(model.eval(), meta), report


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a state dict, with the format told from the file's bytes, not its name, and the
    SHA-256 of those same bytes (the file is read once, so the digest is of what was imported)."""
    payload = read_bytes(path, "weights file", error=CheckpointError)
    if not payload:
        raise CheckpointError(f"weights file {path} is empty; save the weights again")
    digest = hashlib.sha256(payload).hexdigest()
    kind = pytorch_file_kind(payload)
    if kind == "torchscript":
        raise CheckpointError(f"{path} is a TorchScript archive, whose weights cannot be matched to an architecture; "
                              "save the model's state_dict() with torch.save and import that")
    if kind is None and looks_like_safetensors(payload):
        return _unwrap(_read_safetensors(payload), path), digest
    if kind is None:
        raise CheckpointError(f"{path} is neither a PyTorch (torch.save) nor a safetensors file; save the weights "
                              "with torch.save(model.state_dict(), ...) or safetensors")
    return _unwrap(_read_torch(path, payload), path), digest


def _read_safetensors(payload: bytes) -> dict[str, torch.Tensor]:
    try:
        return st_load(payload)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read safetensors weights ({first_line(exc, 160)}); the file may be truncated") from None


def _read_torch(path: Path, payload: bytes) -> Any:
    """torch.load from memory: given a path, torch picks a loader by the file's suffix, not its content."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" (it pickles {found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path} holds Python objects other than tensors{what}, and dnnprune never unpickles those; save a plain "
            f"state_dict with torch.save(model.state_dict(), ...) and import that"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read {path} as PyTorch weights ({first_line(exc, 160)}); the file may be "
                              "truncated or corrupt") from None


def _unwrap(state: Any, path: Path) -> dict[str, torch.Tensor]:
    """Accept common wrappers ({'state_dict': ...}) and DataParallel's 'module.' prefix."""
    if isinstance(state, nn.Module):
        raise CheckpointError(f"{path} is a whole pickled model; save model.state_dict() instead")
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors; save model.state_dict() and import that")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    for key, value in state.items():
        _check_plain(key, value, path)
    return state


def _check_plain(key: str, value: torch.Tensor, path: Path) -> None:
    """Weights are dense real tensors in memory: a sparse, quantized or meta tensor would fail deep inside
    load_state_dict, and a complex one would lose its imaginary part without a word."""
    kind = None
    if value.layout != torch.strided:
        kind = f"a {str(value.layout).removeprefix('torch.')} tensor"
    elif value.is_quantized:
        kind = "a quantized tensor"
    elif value.is_meta:
        kind = "a meta tensor (no values)"
    elif value.is_complex():
        kind = f"complex ({value.dtype})"
    if kind is not None:
        raise CheckpointError(f"{path}: weight {key!r} is {kind}; save dense real weights "
                              "(e.g. tensor.to_dense(), .dequantize(), .real) and import those")


def _auxiliary_keys(arch: str, keys: Iterable[str]) -> list[str]:
    if not arch.startswith(TORCHVISION_PREFIX):
        return []
    return auxiliary_keys(arch[len(TORCHVISION_PREFIX):], keys)


def _drop_auxiliary_heads(model: nn.Module, state: dict[str, torch.Tensor], arch: str
                          ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """googlenet and inception_v3 are built without their training-only heads; weights saved with
    them would otherwise not fit, though inference never uses those tensors."""
    own = model.state_dict().keys()
    dropped = [key for key in _auxiliary_keys(arch, state) if key not in own]
    left_out = set(dropped)
    return {k: v for k, v in state.items() if k not in left_out}, dropped


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: str, arch: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        detail = []
        if missing:
            detail.append(f"missing {missing[:3]}")
        if unexpected:
            detail.append(f"unexpected {unexpected[:3]}")
        if wrong:
            k = wrong[0]
            detail.append(f"shape of {k} is {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in {arch}")
        raise CheckpointError(f"{path} does not fit --arch {arch}: {'; '.join(detail)}; check --arch, --num-classes and --input-shape")
    model.load_state_dict(state, strict=True)


def _input_spec(dataset: str | None, shape: tuple[int, int, int] | None, mean: tuple[float, ...] | None,
                std: tuple[float, ...] | None) -> InputSpec:
    base = default_spec(dataset) if dataset else InputSpec((3, 224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    shape = shape or base.shape
    mean = per_channel(mean, shape[0], "--mean") if mean else fit_channels(base.mean, shape[0])
    std = per_channel(std, shape[0], "--std") if std else fit_channels(base.std, shape[0])
    if any(s <= 0 for s in std):
        raise DnnpruneError(f"--std values must be positive (inputs are divided by them); got {','.join(map(str, std))}")
    return InputSpec(shape, mean, std)


def _classes_count(dataset: str | None) -> int | None:
    if dataset and DATASETS[dataset].classes:
        return len(DATASETS[dataset].classes)
    return None


def _infer_classes(state: dict[str, torch.Tensor]) -> int:
    """The last 2-D weight is the classifier; its rows are the classes."""
    matrices = [v for v in state.values() if v.ndim == 2]
    if not matrices:
        raise CheckpointError("cannot infer the number of classes from the weights; pass --num-classes")
    return int(matrices[-1].shape[0])
