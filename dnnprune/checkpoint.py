"""Self-describing safetensors checkpoints.

The metadata alone rebuilds the model in a new process: architecture and its
constructor arguments, then the structural changes (attributes that pruning
changed, modules replaced by Identity), then tensors decoded by their codecs.
Nothing is ever unpickled.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from dnnprune import __version__
from dnnprune.encoding import decode_state, encode_state
from dnnprune.errors import CheckpointError, OutputError
from dnnprune.models import create_model

FORMAT = "dnnprune"
FORMAT_VERSION = 1
METADATA_KEY = "dnnprune"
META_ATTRIBUTE = "dnnprune_meta"
_SIMPLE = (int, float, bool, str, type(None))
_REPLACEABLE: dict[str, type[nn.Module]] = {"Identity": nn.Identity}
_RUNTIME_STATE = {"training"}  # mode, not structure: load() always returns an eval-mode model


@dataclass
class CheckpointMeta:
    """Everything besides the tensors; stored as one JSON string in the safetensors header."""

    arch: str
    arch_args: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] = (3, 32, 32)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    dataset: str | None = None
    classes: list[str] | None = None
    structure: dict[str, dict[str, Any]] = field(default_factory=dict)
    replaced: dict[str, str] = field(default_factory=dict)
    encodings: dict[str, dict[str, Any]] = field(default_factory=dict)
    lineage: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    file_sha256: str | None = field(default=None, compare=False)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("file_sha256")
        return json.dumps({"format": FORMAT, **data}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CheckpointMeta:
        data = json.loads(text)
        data.pop("format", None)
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint format {data['format_version']} is newer than this dnnprune reads ({FORMAT_VERSION}); upgrade dnnprune"
            )
        known = set(cls.__dataclass_fields__)
        data = {k: v for k, v in data.items() if k in known}
        for key in ("input_shape", "mean", "std"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)

    def lineage_entry(self, command: str, recipe_sha256: str | None, metrics: dict[str, Any]) -> None:
        self.lineage.append(
            {
                "command": command,
                "recipe_sha256": recipe_sha256,
                "parent_sha256": self.file_sha256,
                "metrics": metrics,
                "time_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "version": __version__,
            }
        )


def meta_of(model: nn.Module) -> CheckpointMeta:
    meta = getattr(model, META_ATTRIBUTE, None)
    if not isinstance(meta, CheckpointMeta):
        raise CheckpointError("model carries no dnnprune metadata; build it with dnnprune.load or attach_meta")
    return meta


def attach_meta(model: nn.Module, meta: CheckpointMeta) -> nn.Module:
    object.__setattr__(model, META_ATTRIBUTE, meta)
    return model


# ----------------------------------------------------------------------------- save


def save(model: nn.Module, path: Path | str, meta: CheckpointMeta | None = None, *, force: bool = False,
         protect: tuple[Path, ...] = ()) -> Path:
    """Describe the model's structure against a fresh build, encode tensors, write atomically."""
    path = Path(path)
    meta = copy.deepcopy(meta if meta is not None else meta_of(model))
    check_output_path(path, force=force, protect=protect)
    meta.structure, meta.replaced = describe_structure(model, meta.arch, meta.arch_args)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    stored = encode_state(state, meta.encodings)
    payload = st_save(stored, metadata={METADATA_KEY: meta.to_json()})
    atomic_write_bytes(path, payload)
    return path


def check_output_path(path: Path, *, force: bool, protect: tuple[Path, ...] = ()) -> None:
    for guarded in protect:
        if guarded.exists() and path.exists() and path.resolve() == guarded.resolve():
            raise OutputError(f"output {path} is the input file; choose another -o path (inputs are never overwritten)")
    if path.exists() and not force:
        raise OutputError(f"output {path} already exists; pass --force to overwrite it or choose another -o path")
    if path.exists() and path.is_dir():
        raise OutputError(f"output {path} is a directory; give a file path ending in .safetensors")
    if not path.parent.exists():
        raise OutputError(f"output folder {path.parent} does not exist; create it first")


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Temp file in the same folder, fsync, rename: a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def describe_structure(model: nn.Module, arch: str, arch_args: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Attributes that differ from a fresh build, and modules replaced by Identity."""
    fresh_modules = dict(create_model(arch, **arch_args).named_modules())
    structure: dict[str, dict[str, Any]] = {}
    replaced: dict[str, str] = {}
    for name, module in model.named_modules():
        fresh = fresh_modules.get(name)
        if fresh is None:
            if _inside(name, replaced):
                continue
            raise CheckpointError(f"module {name!r} does not exist in a fresh {arch}; it cannot be described in a checkpoint")
        if type(module) is not type(fresh):
            kind = type(module).__name__
            if kind not in _REPLACEABLE:
                raise CheckpointError(f"module {name!r} was replaced by {kind}, which checkpoints cannot describe")
            replaced[name] = kind
            continue
        changed = _changed_attributes(module, fresh)
        if changed:
            structure[name] = changed
    return structure, replaced


def _inside(name: str, prefixes: dict[str, str]) -> bool:
    return any(name.startswith(p + ".") for p in prefixes)


def _changed_attributes(module: nn.Module, fresh: nn.Module) -> dict[str, Any]:
    changed = {}
    for key, value in vars(module).items():
        if key.startswith("_") or key in _RUNTIME_STATE or not _is_simple(value):
            continue
        if vars(fresh).get(key, object()) != value:
            changed[key] = list(value) if isinstance(value, tuple) else value
    return changed


def _is_simple(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(isinstance(v, _SIMPLE) for v in value)
    return isinstance(value, _SIMPLE)


# ----------------------------------------------------------------------------- load


def load(path: Path | str, *, map_location: str = "cpu") -> nn.Module:
    """Rebuild the model from the file alone; the metadata is `model.dnnprune_meta`."""
    path = Path(path)
    payload = read_checkpoint_bytes(path)
    meta, stored = parse_checkpoint(path, payload)
    meta.file_sha256 = hashlib.sha256(payload).hexdigest()
    state = decode_state(stored, meta.encodings)
    model = rebuild(meta, state)
    model.to(map_location)
    model.eval()
    return attach_meta(model, meta)


def read_checkpoint_bytes(path: Path) -> bytes:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found; check the path")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    return path.read_bytes()


def parse_checkpoint(path: Path, payload: bytes) -> tuple[CheckpointMeta, dict[str, torch.Tensor]]:
    metadata = read_safetensors_metadata(path, payload)
    if METADATA_KEY not in metadata:
        raise CheckpointError(
            f"{path} is a safetensors file without dnnprune metadata; turn it into a checkpoint with "
            f"`dnnprune import {path} --arch NAME -o model.safetensors`"
        )
    try:
        meta = CheckpointMeta.from_json(metadata[METADATA_KEY])
    except (json.JSONDecodeError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{path} has unreadable dnnprune metadata ({exc}); the file is corrupt") from None
    try:
        stored = st_load(payload)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({_first_line(exc)}); it may be truncated") from None
    return meta, stored


def read_safetensors_metadata(path: Path, payload: bytes) -> dict[str, str]:
    """Parse the header ourselves so a truncated or foreign file fails with a clear line."""
    try:
        return _parse_header(path, payload)
    except CheckpointError:
        if _looks_like_pickle(payload):
            raise CheckpointError(
                f"{path} is a PyTorch pickle, which dnnprune never loads as a checkpoint; convert it with "
                f"`dnnprune import {path} --arch NAME -o model.safetensors`"
            ) from None
        raise


def _parse_header(path: Path, payload: bytes) -> dict[str, str]:
    if len(payload) < 8:
        raise CheckpointError(f"{path} is too short to be a safetensors file; it may be truncated")
    header_len = int.from_bytes(payload[:8], "little")
    if header_len <= 0 or 8 + header_len > len(payload):
        raise CheckpointError(f"{path} is not a safetensors file (bad header); it may be truncated or another format")
    try:
        header = json.loads(payload[8 : 8 + header_len])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (header is not a mapping)")
    metadata = header.get("__metadata__") or {}
    return metadata if isinstance(metadata, dict) else {}


def rebuild(meta: CheckpointMeta, state: dict[str, torch.Tensor]) -> nn.Module:
    model = create_model(meta.arch, **meta.arch_args)
    for name in meta.replaced:
        _set_submodule(model, name, _REPLACEABLE[meta.replaced[name]]())
    modules = dict(model.named_modules())
    for name, attrs in meta.structure.items():
        if name not in modules:
            raise CheckpointError(f"checkpoint describes module {name!r}, which {meta.arch} does not have; the file is corrupt")
        for key, value in attrs.items():
            setattr(modules[name], key, tuple(value) if isinstance(getattr(modules[name], key, None), tuple) else value)
    _resize_tensors(model, state)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint tensors do not match {meta.arch}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}; the file is corrupt or from another model"
        )
    return model


def _resize_tensors(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give every parameter and buffer the stored shape before a strict load."""
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for registry in (module._parameters, module._buffers):
            for key, tensor in registry.items():
                stored = state.get(prefix + key)
                if tensor is None or stored is None or stored.shape == tensor.shape:
                    continue
                empty = torch.empty(stored.shape, dtype=tensor.dtype)
                registry[key] = nn.Parameter(empty, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _looks_like_pickle(payload: bytes) -> bool:
    return payload[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or payload[:4] == b"PK\x03\x04"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
