"""Self-describing safetensors checkpoints.

The metadata alone rebuilds the model in a new process: architecture and its constructor
arguments, then the structural changes (attributes that pruning changed, modules replaced by
Identity or by one of their own submodules), then tensors decoded by their codecs. Nothing is ever
unpickled, and a file is checked before it may cost anything: the metadata is typed and validated,
the model is first built on the meta device, and every stored tensor's name, shape and dtype must
match it, within a memory budget, before a single byte is decoded or allocated.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import io
import json
import math
import os
import re
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn
from torch.overrides import TorchFunctionMode

from dnnprune._version import __version__
from dnnprune.codecs import Encoding, declared_tensors, decode_state, encode_state
from dnnprune.codecs.spec import one_line
from dnnprune.errors import CheckpointError, DnnpruneError, OutputError
from dnnprune.files import check_regular, read_bytes, shown
from dnnprune.models import create_model, is_registered
from dnnprune.models.plugins import PLUGINS_VARIABLE
from dnnprune.tasks import TaskSpec

FORMAT = "dnnprune"
FORMAT_VERSION = 2
METADATA_KEY = "dnnprune"
META_ATTRIBUTE = "dnnprune_meta"
SHORTCUT_ATTRIBUTE = "dnnprune_shortcut_source"  # also set by pruning.layers when a block becomes its shortcut
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_METADATA_BYTES = 16 * 1024 * 1024
MAX_MODEL_BYTES_ENV = "DNNPRUNE_MAX_MODEL_BYTES"
_MIN_MODEL_BYTES = 1 << 30
_MODEL_BYTES_PER_FILE_BYTE = 256
_SIMPLE = (int, float, bool, str, type(None))
_RUNTIME_STATE = {"training"}  # mode, not structure: load() always returns an eval-mode model
_INT64 = 1 << 63

# ----------------------------------------------------------------------------- typed metadata

ModulePath = Annotated[str, StringConstraints(min_length=1, max_length=500, pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")]
Identifier = Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
ShortText = Annotated[str, StringConstraints(max_length=1000)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Scalar = bool | int | FiniteFloat | ShortText | None
AttributeValue = Scalar | Annotated[list[Scalar], Field(max_length=64)]
Dim = Annotated[int, Field(ge=1, le=4096)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Shortcut(_Strict):
    """The module was replaced by its own submodule at `source` (a residual block by its downsample path)."""

    kind: Literal["shortcut"]
    source: ModulePath


Replacement = Literal["Identity"] | Shortcut


class LineageEntry(_Strict):
    """One step that made this checkpoint from its parent."""

    command: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    recipe_sha256: Annotated[str, StringConstraints(max_length=128)] | None = None
    parent_sha256: Annotated[str, StringConstraints(max_length=128)] | None = None
    metrics: dict[ShortText, Any] = Field(default_factory=dict)
    time_utc: Annotated[str, StringConstraints(max_length=64)]
    version: Annotated[str, StringConstraints(max_length=64)]

    def __getitem__(self, key: str) -> Any:
        """Read access by key, for callers written when entries were plain dicts."""
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)

    @field_validator("metrics")
    @classmethod
    def _json_metrics(cls, value: dict[str, Any]) -> dict[str, Any]:
        return {key: _json_value(item, depth=8, finite=False) for key, item in value.items()}


class AnomalyThreshold(_Strict):
    """An anomaly detector's decision threshold: flag a sample whose reconstruction error is above `value`.

    Chosen for the best F1 on the validation split the model was last trained or compressed with, so that
    scoring a file of one's own, or a deployed export, never picks it on the labels it is judged by."""

    value: Annotated[float, Field(strict=True, allow_inf_nan=False)]
    chosen_on: ShortText
    samples: Annotated[int, Field(ge=0)]
    f1: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None


_OMITTED_WHEN_UNSET = ("features", "feature_mean", "feature_std", "anomaly_threshold")  # added after format 2 shipped


class CheckpointMeta(_Strict):
    """Everything besides the tensors; stored as one JSON string in the safetensors header."""

    arch: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    arch_args: Annotated[dict[Identifier, Any], Field(max_length=64)] = Field(default_factory=dict)
    input_shape: tuple[Dim, Dim, Dim] = (3, 32, 32)
    mean: Annotated[tuple[FiniteFloat, ...], Field(max_length=4096)] = (0.0,)
    std: Annotated[tuple[Annotated[float, Field(gt=0, allow_inf_nan=False)], ...], Field(max_length=4096)] = (1.0,)
    dataset: Annotated[str, StringConstraints(max_length=200)] | None = None
    classes: Annotated[list[ShortText], Field(max_length=1_000_000)] | None = None
    features: Annotated[list[ShortText], Field(max_length=4096)] | None = None  # a table's column names, in order
    # a table's standardisation, from the training split it was built on: later files are scaled the same way
    feature_mean: Annotated[list[FiniteFloat], Field(max_length=4096)] | None = None
    feature_std: Annotated[list[Annotated[float, Field(gt=0, allow_inf_nan=False)]], Field(max_length=4096)] | None = None
    task: TaskSpec = TaskSpec()
    anomaly_threshold: AnomalyThreshold | None = None
    structure: dict[ModulePath, dict[Identifier, AttributeValue]] = Field(default_factory=dict)
    replaced: dict[ModulePath, Replacement] = Field(default_factory=dict)
    encodings: dict[Annotated[str, StringConstraints(min_length=1, max_length=500)], Encoding] = Field(default_factory=dict)
    lineage: Annotated[list[LineageEntry], Field(max_length=100_000)] = Field(default_factory=list)
    format_version: Annotated[int, Field(ge=1, strict=True)] = FORMAT_VERSION
    _file_sha256: str | None = PrivateAttr(default=None)
    _file_path: Path | None = PrivateAttr(default=None)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise CheckpointError(f"invalid checkpoint metadata: {_short(one_line(exc))}; correct these values "
                                  "(in a file they mean it is corrupt or was edited by hand)") from None

    @property
    def file_sha256(self) -> str | None:
        """sha256 of the file this metadata was read from (runtime only, never stored)."""
        return self._file_sha256

    @file_sha256.setter
    def file_sha256(self, value: str | None) -> None:
        self._file_sha256 = value

    @property
    def file_path(self) -> Path | None:
        """The file this metadata was read from (runtime only, never stored): an input not to overwrite."""
        return self._file_path

    @file_path.setter
    def file_path(self, value: Path | None) -> None:
        self._file_path = value

    @field_validator("arch_args")
    @classmethod
    def _bounded_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        return {key: _json_value(item, depth=4, finite=True, mappings=False) for key, item in value.items()}

    @model_validator(mode="after")
    def _one_per_channel(self) -> CheckpointMeta:
        channels = self.input_shape[0]
        for key in ("mean", "std"):
            values = getattr(self, key)
            if len(values) == 1 and channels > 1:
                object.__setattr__(self, key, values * channels)
            elif len(values) != channels:
                raise ValueError(f"{key} has {len(values)} values for {channels} input channel(s); give one per channel")
        return self

    @model_validator(mode="after")
    def _one_scale_per_feature(self) -> CheckpointMeta:
        if self.feature_mean is None and self.feature_std is None:
            return self
        counts = {len(values) for values in (self.feature_mean, self.feature_std, self.features) if values is not None}
        if self.feature_mean is None or self.feature_std is None or len(counts) > 1:
            raise ValueError("feature_mean and feature_std come together, one value per feature column")
        return self

    @model_validator(mode="after")
    def _one_name_per_output(self) -> CheckpointMeta:
        outputs = self.arch_args.get("num_classes")
        named = self.classes
        if self.task.kind == "classification" and named and isinstance(outputs, int) and len(named) != outputs:
            raise ValueError(f"the class list has {len(named)} names but the model has {outputs} outputs; give one name "
                             "per output")
        return self

    @model_validator(mode="after")
    def _threshold_needs_anomalies(self) -> CheckpointMeta:
        if self.anomaly_threshold is not None and not (self.task.kind == "reconstruction" and self.task.normal_classes):
            raise ValueError("anomaly_threshold is set but the task is not anomaly detection (reconstruction with "
                             "normal_classes)")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, validated again so a file is never written that could not be read back."""
        data = _validated(dict(self.__dict__)).model_dump(mode="json")
        for key in _OMITTED_WHEN_UNSET:  # a file that does not use them stays readable by earlier versions
            if data.get(key) is None:
                data.pop(key, None)
        data["format_version"] = FORMAT_VERSION
        return {"format": FORMAT, **data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CheckpointMeta:
        """Parse and validate; format-1 files (flat encodings, no task, an `extra` key) still read."""
        if len(text) > MAX_METADATA_BYTES:
            raise CheckpointError(f"the dnnprune metadata is {len(text):,} bytes, more than {MAX_METADATA_BYTES:,}; the file is corrupt")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise CheckpointError(f"the dnnprune metadata is not JSON ({_short(str(exc))}); the file is corrupt") from None
        if not isinstance(data, dict):
            raise CheckpointError("the dnnprune metadata is not a JSON object; the file is corrupt")
        if data.pop("format", FORMAT) != FORMAT:
            raise CheckpointError("the metadata is not in dnnprune's format; the file is corrupt or from another tool")
        version = data.get("format_version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise CheckpointError(f"the metadata has format_version {version!r}, not a positive integer; the file is corrupt")
        if version > FORMAT_VERSION:
            raise CheckpointError(f"checkpoint format {version} is newer than this dnnprune reads ({FORMAT_VERSION}); upgrade dnnprune")
        if version == 1:
            data.pop("extra", None)
        return _validated(data)

    def add_lineage(self, command: str, recipe_sha256: str | None, metrics: dict[str, Any]) -> None:
        """Record a step; its parent is the file this metadata came from. Honours SOURCE_DATE_EPOCH."""
        try:
            entry = LineageEntry(command=command, recipe_sha256=recipe_sha256, parent_sha256=self.file_sha256,
                                 metrics=metrics, time_utc=_now_utc(), version=__version__)
        except ValidationError as exc:
            raise CheckpointError(f"lineage entry for {command!r} is invalid: {_short(one_line(exc))}") from None
        self.lineage.append(entry)


def _validated(data: Mapping[str, Any]) -> CheckpointMeta:
    """Validation runs `__init__` (pydantic calls a custom one), which turns errors into one line."""
    return CheckpointMeta.model_validate(data)


def _json_value(value: Any, *, depth: int, finite: bool, mappings: bool = True) -> Any:
    """A bounded JSON value (scalars, lists, and mappings where allowed); numpy/torch scalars become numbers."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        if not -_INT64 <= value < _INT64:
            raise ValueError(f"integer {value} is out of range")
        return value
    if isinstance(value, float):
        if finite and not math.isfinite(value):
            raise ValueError("numbers must be finite")
        return value
    if isinstance(value, str):
        if len(value) > 1000:
            raise ValueError("strings are at most 1000 characters")
        return value
    if depth <= 0:
        raise ValueError("values are nested too deeply")
    if isinstance(value, (list, tuple)):
        if len(value) > 4096:
            raise ValueError("lists hold at most 4096 items")
        return [_json_value(v, depth=depth - 1, finite=finite, mappings=mappings) for v in value]
    if mappings and isinstance(value, Mapping) and len(value) <= 4096:
        return {str(k): _json_value(v, depth=depth - 1, finite=finite) for k, v in value.items()}
    if hasattr(value, "item") and callable(value.item):
        return _json_value(value.item(), depth=depth, finite=finite, mappings=mappings)
    raise ValueError(f"{type(value).__name__} is not a JSON value")


def _now_utc() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    moment = dt.datetime.now(dt.timezone.utc)
    if epoch.isdigit():
        try:
            moment = dt.datetime.fromtimestamp(int(epoch), tz=dt.timezone.utc)
        except (OverflowError, ValueError, OSError):
            pass
    return moment.isoformat(timespec="seconds")


def _short(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def meta_of(model: nn.Module) -> CheckpointMeta:
    inner = _wrapped(model)  # torch.compile's wrapper hands the wrapped model's attributes through
    if inner is not None and isinstance(getattr(getattr(model, inner), META_ATTRIBUTE, None), CheckpointMeta):
        raise CheckpointError(f"this {type(model).__name__} wraps a dnnprune model: pass model.{inner}, the "
                              "model it wraps")
    meta = getattr(model, META_ATTRIBUTE, None)
    if not isinstance(meta, CheckpointMeta):
        raise CheckpointError("model carries no dnnprune metadata; build it with dnnprune.load, or import plain "
                              "weights (dnnprune import, or dnnprune.importer.import_state_dict)")
    return meta


def _wrapped(model: nn.Module) -> str | None:
    """The attribute of a wrapper (DataParallel, DistributedDataParallel, torch.compile) holding the model."""
    for attribute in ("module", "_orig_mod"):
        if isinstance(getattr(model, attribute, None), nn.Module) and type(model).__name__ in (
                "DataParallel", "DistributedDataParallel", "OptimizedModule"):
            return attribute
    return None


def check_plain_model(model: nn.Module) -> None:
    """What a checkpoint cannot hold faithfully, refused with the fix: tensors other than float32 (the
    codecs and every command assume it) and torch.nn.utils.prune's masks (dnnprune stores sparsity itself)."""
    from torch.nn.utils import prune as torch_prune

    masked = [name for name, module in model.named_modules()
              if any(isinstance(hook, torch_prune.BasePruningMethod) for hook in module._forward_pre_hooks.values())]
    if masked:
        raise CheckpointError(f"{masked[0] or 'the model'} carries torch.nn.utils.prune masks ({len(masked)} "
                              "module(s)); make them permanent with torch.nn.utils.prune.remove(module, 'weight') "
                              "first (the zeros are then stored sparse by dnnprune's own encodings)")
    tensors = [*model.named_parameters(), *model.named_buffers()]
    other = next(((name, t.dtype) for name, t in tensors if t.is_floating_point() and t.dtype != torch.float32), None)
    if other is not None:
        raise CheckpointError(f"tensor {other[0]!r} is {other[1]}; dnnprune works on float32 models: call "
                              "model.float() first (quantize makes a model smaller than half precision does)")


def attach_meta(model: nn.Module, meta: CheckpointMeta) -> nn.Module:
    object.__setattr__(model, META_ATTRIBUTE, meta)
    return model


def mark_shortcut(module: nn.Module, source: str) -> nn.Module:
    """Tag a module that replaces its former parent (it was the parent's submodule at `source`), so
    `save` records the replacement as `{"kind": "shortcut", "source": source}`."""
    setattr(module, SHORTCUT_ATTRIBUTE, source)
    return module


# ----------------------------------------------------------------------------- save


def save(model: nn.Module, path: Path | str, meta: CheckpointMeta | None = None, *, force: bool = False,
         protect: tuple[Path, ...] = ()) -> Path:
    """Describe the model's structure against a fresh build, encode tensors, write atomically."""
    path = Path(path)
    meta = copy.deepcopy(meta if meta is not None else meta_of(model))
    check_output_path(path, force=force, protect=protect)
    refuse_own_source(path, meta)
    check_plain_model(model)
    meta.structure, meta.replaced = describe_structure(model, meta.arch, meta.arch_args)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    stored = encode_state(state, meta.encodings)
    text = meta.to_json()
    if len(text) > MAX_METADATA_BYTES:
        raise CheckpointError(f"the metadata would take {len(text):,} bytes, more than {MAX_METADATA_BYTES:,}; "
                              "shorten the class names or the lineage")
    payload = st_save(stored, metadata={METADATA_KEY: text})
    _check_loads_back(model, meta, stored, len(payload))
    atomic_write_bytes(path, payload)
    return path


def _check_loads_back(model: nn.Module, meta: CheckpointMeta, stored: dict[str, torch.Tensor], size: int) -> None:
    """The checks `load` makes, made before writing, so that a file is never written that load refuses."""
    try:
        _check_tensors(_skeleton(meta), declared_tensors(stored, meta.encodings), meta.arch, model_bytes_limit(size))
        check_runs(model, meta.arch, meta.input_shape, fix="the model was changed so that it no longer runs on the "
                   "input shape its metadata declares; undo that change")
    except CheckpointError as exc:
        raise CheckpointError(f"not saved, since load would refuse the file: {exc}") from None


def check_output_path(path: Path, *, force: bool, protect: tuple[Path, ...] = (), kind: str = "output",
                      option: str = "-o") -> None:
    """Refuse, before any work is done, a path that would overwrite an input, clobber a file without
    --force, or fail to be written (a folder that is missing, read-only or not a folder, a name too long
    for the temporary file the atomic write puts beside it, a symlink loop)."""
    size = len(os.fsencode(path.name))
    if size + _TEMP_NAME_EXTRA > _NAME_MAX:
        raise OutputError(f"{kind} file name is {size} bytes long; at most {_NAME_MAX - _TEMP_NAME_EXTRA} fit (the "
                          f"atomic write's temporary file adds {_TEMP_NAME_EXTRA}); choose a shorter {option} name")
    try:
        _check_output_path(path, force=force, protect=protect, kind=kind, option=option)
    except (OSError, RuntimeError) as exc:  # a link loop, a path the OS cannot take
        reason = getattr(exc, "strerror", None) or first_line(exc, 120)
        raise OutputError(f"cannot use {kind} path {shown(path)} ({reason}); choose another {option} path") from None


def refuse_own_source(path: Path, meta: CheckpointMeta, option: str = "the output") -> None:
    """`force` replaces an older output, never the checkpoint the model was loaded from (an input, by path:
    a byte-identical copy elsewhere is another file)."""
    source = meta.file_path
    try:
        same = source is not None and path.exists() and os.path.samefile(path, source)
    except OSError:  # the source was moved or deleted since: nothing of it to protect at this path
        same = False
    if same:
        raise OutputError(f"{path} is the checkpoint this model was loaded from; choose another path for {option} "
                          "(inputs are never overwritten)")


def _exists(path: Path) -> bool:
    """Whether an input exists; one the OS cannot even look up (too long, a loop) is reported by its own check."""
    try:
        return path.exists()
    except (OSError, RuntimeError, ValueError):
        return False


_NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems
_TEMP_NAME_EXTRA = len(".") + len(".") + 8 + len(".tmp")  # atomic_write_bytes: ".{name}.XXXXXXXX.tmp"


def _check_output_path(path: Path, *, force: bool, protect: tuple[Path, ...], kind: str, option: str) -> None:
    path.resolve()  # a symlink loop raises here, not later in a comparison
    for guarded in protect:
        if _exists(guarded) and path.exists() and path.resolve() == guarded.resolve():
            raise OutputError(f"{kind} {path} is an input file; choose another {option} path (inputs are never overwritten)")
    if path.exists() and path.is_dir():
        raise OutputError(f"{kind} {path} is a directory; give {option} a file path")
    if path.exists() and not force:
        raise OutputError(f"{kind} {path} already exists; pass --force (force=True in Python) to overwrite it or "
                          f"choose another {option} path")
    if not path.parent.exists():
        raise OutputError(f"{kind} folder {path.parent} does not exist; create it first")
    if not path.parent.is_dir():
        raise OutputError(f"{kind} folder {path.parent} is not a folder; choose another {option} path")
    _check_writable(path.parent, kind, option)


def _check_writable(folder: Path, kind: str, option: str) -> None:
    """Create and remove a scratch file: the only test that also sees read-only mounts and immutable folders."""
    try:
        fd, scratch = tempfile.mkstemp(prefix=".dnnprune-probe.", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write to the {kind} folder {folder} ({exc.strerror or exc}); "
                          f"choose a writable folder for {option}") from None
    os.close(fd)
    Path(scratch).unlink(missing_ok=True)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Temp file in the same folder, fsync, rename, fsync the folder: a crash never leaves half a file."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path} ({exc.strerror or exc}); choose a writable folder") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # a full disk or a folder that turned read-only: say so, leave nothing behind
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"could not write {path} ({exc.strerror or exc}); nothing was written there") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; some platforms cannot open a folder, which is fine."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def describe_structure(model: nn.Module, arch: str, arch_args: dict[str, Any]
                       ) -> tuple[dict[str, dict[str, Any]], dict[str, Replacement]]:
    """Attributes that differ from a fresh build, and modules replaced (by Identity or a shortcut)."""
    fresh = _skeleton_model(arch, arch_args)
    fresh_modules = dict(fresh.named_modules())
    structure: dict[str, dict[str, Any]] = {}
    replaced: dict[str, Replacement] = {}
    for name, module in model.named_modules():
        replacement = _replacement_of(module, fresh_modules.get(name))
        if replacement is not None and name:
            _replace(fresh, name, replacement, arch)
            fresh_modules = dict(fresh.named_modules())
            replaced[name] = replacement
        template = fresh_modules.get(name)
        if template is None:
            raise CheckpointError(f"module {name!r} does not exist in a fresh {arch}; it cannot be described in a checkpoint")
        if type(module) is not type(template):
            raise CheckpointError(f"module {name!r} was replaced by {type(module).__name__}, which checkpoints cannot "
                                  "describe; replace modules by nn.Identity or by their own submodule (mark_shortcut)")
        changed = _changed_attributes(module, template)
        if changed:
            structure[name] = changed
    return structure, replaced


def _replacement_of(module: nn.Module, template: nn.Module | None) -> Replacement | None:
    source = getattr(module, SHORTCUT_ATTRIBUTE, None)
    if isinstance(source, str):
        return Shortcut(kind="shortcut", source=source)
    if isinstance(module, nn.Identity) and template is not None and not isinstance(template, nn.Identity):
        return "Identity"
    return None


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
    meta.file_path = path.absolute()
    try:
        skeleton = _skeleton(meta)
        _check_tensors(skeleton, declared_tensors(stored, meta.encodings), meta.arch, model_bytes_limit(len(payload)))
        state = decode_state(stored, meta.encodings)
        model = _materialize(meta, state)
        check_runs(model, meta.arch, meta.input_shape, fix="its input shape or structure does not fit the "
                   "architecture: re-import the weights with an --input-shape the architecture accepts, or the "
                   "file is corrupt")
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    model.to(map_location)
    model.eval()
    return attach_meta(model, meta)


def check_runs(model: nn.Module, arch: str, input_shape: tuple[int, ...] | list[int],
               fix: str = "import it with an --input-shape the architecture accepts") -> None:
    """One forward pass on the declared input shape, so that a shape the architecture cannot take (an
    AlexNet at 32 px, a ViT below 224) is refused here in one line, not deep inside every later command."""
    device = next(model.parameters(), torch.empty(0)).device
    if device.type == "meta":  # shapes without memory (tests): nothing to run
        return
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            output = model(torch.zeros(1, *input_shape, device=device))
    except Exception as exc:  # any failure of the probe means the shape does not fit
        shape = "x".join(str(d) for d in input_shape)
        raise CheckpointError(f"{arch} cannot run on its input shape {shape} ({type(exc).__name__}: "
                              f"{first_line(exc, 160)}); {fix}") from None
    finally:
        model.train(was_training)
    if not isinstance(output, torch.Tensor):
        raise CheckpointError(f"{arch}'s forward returns {type(output).__name__}, not a tensor; dnnprune compresses "
                              "models whose forward returns one tensor (wrap it to return the logits)")


def read_checkpoint_bytes(path: Path) -> bytes:
    return read_bytes(path, "checkpoint", error=CheckpointError)


def parse_checkpoint(path: Path, payload: bytes) -> tuple[CheckpointMeta, dict[str, torch.Tensor]]:
    meta = _meta_from_metadata(path, read_safetensors_metadata(path, payload))
    try:
        stored = st_load(payload)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({first_line(exc)}); it may be truncated") from None
    return meta, stored


def read_meta(path: Path | str) -> CheckpointMeta:
    """The metadata from the header alone (a bounded read, never the tensors): fast `info`."""
    metadata = read_safetensors_metadata(Path(path), _read_head(Path(path)))
    return _meta_from_metadata(Path(path), metadata)


def tensor_index(path: Path | str) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """Stored tensor name -> (safetensors dtype, shape, bytes), from the header alone."""
    path = Path(path)
    header = _parse_header(path, _read_head(path))
    index: dict[str, tuple[str, tuple[int, ...], int]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not (isinstance(dtype, str) and all(isinstance(s, int) and s >= 0 for s in shape)
                    and isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
                raise TypeError
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path} has a malformed header entry for {_short(name, 80)!r}; the file is corrupt") from None
        index[name] = (dtype, tuple(shape), end - start)
    _check_offsets(path, header)
    return index


def _check_offsets(path: Path, header: dict[str, Any]) -> None:
    """The tensors' byte ranges tile the data section exactly, as a safetensors reader requires: no gap, no
    overlap, nothing past the end (checked from the header and the file size, without reading the data)."""
    spans = sorted(tuple(entry["data_offsets"]) for name, entry in header.items() if name != "__metadata__")
    with path.open("rb") as handle:
        data_bytes = path.stat().st_size - 8 - int.from_bytes(handle.read(8), "little")
    position = 0
    for start, end in spans:
        if start != position:
            raise CheckpointError(f"{path} has tensors whose byte ranges overlap or leave gaps; the file is corrupt")
        position = end
    if position != data_bytes:
        raise CheckpointError(f"{path} declares {position:,} bytes of tensors but holds {data_bytes:,}; the file is "
                              "corrupt or truncated")


def read_safetensors_metadata(path: Path, payload: bytes) -> dict[str, str]:
    """Parse the header ourselves so a truncated or foreign file fails with a clear line."""
    try:
        header = _parse_header(path, payload)
    except CheckpointError:
        kind = pytorch_file_kind(path)
        if kind == "torchscript":
            raise CheckpointError(f"{path} is a TorchScript archive, which dnnprune cannot read; save the model's "
                                  "state_dict() with torch.save and `dnnprune import` that") from None
        if kind == "pickle":
            raise CheckpointError(
                f"{path} is a PyTorch pickle, which dnnprune never loads as a checkpoint; convert it with "
                f"`dnnprune import {path} --arch NAME -o model.safetensors`"
            ) from None
        raise
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path} has a malformed safetensors metadata block; the file is corrupt")
    return metadata


def _meta_from_metadata(path: Path, metadata: dict[str, str]) -> CheckpointMeta:
    if METADATA_KEY not in metadata:
        raise CheckpointError(
            f"{path} is a safetensors file without dnnprune metadata; turn it into a checkpoint with "
            f"`dnnprune import {path} --arch NAME -o model.safetensors`"
        )
    try:
        return CheckpointMeta.from_json(metadata[METADATA_KEY])
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def _read_head(path: Path) -> bytes:
    """The 8-byte length and the JSON header, read with bounded reads."""
    check_regular(path, "checkpoint", error=CheckpointError)
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return head
            length = int.from_bytes(head, "little")
            if 0 < length <= MAX_HEADER_BYTES:
                head += handle.read(length)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path} ({exc.strerror or type(exc).__name__}); check the file") from None
    return head


def looks_like_safetensors(payload: bytes) -> bool:
    """Whether the bytes open with a safetensors header (length, then a JSON mapping that fits)."""
    try:
        _parse_header(Path("weights"), payload)
    except CheckpointError:
        return False
    return True


class _DuplicateKey(Exception):
    """A JSON object with a key twice: json keeps the last, a safetensors reader may take either."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _parse_header(path: Path, payload: bytes) -> dict[str, Any]:
    if len(payload) < 8:
        raise CheckpointError(f"{path} is too short to be a safetensors file; it may be truncated")
    header_len = int.from_bytes(payload[:8], "little")
    if header_len <= 0 or header_len > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path} is not a safetensors file (bad header length); it may be another format")
    if 8 + header_len > len(payload):
        raise CheckpointError(f"{path} is not a safetensors file (header runs past the end); it may be truncated")
    try:
        header = json.loads(payload[8 : 8 + header_len], object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise CheckpointError(f"{path} names {_short(str(exc), 80)!r} twice in its header; the file is corrupt") from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{path} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (header is not a mapping)")
    return header


def model_bytes_limit(file_size: int) -> int:
    """How much a file may make us allocate: max(1 GiB, 256 x its size), or DNNPRUNE_MAX_MODEL_BYTES if larger."""
    limit = max(_MIN_MODEL_BYTES, _MODEL_BYTES_PER_FILE_BYTE * file_size)
    raw = os.environ.get(MAX_MODEL_BYTES_ENV, "").strip()
    if raw:
        if not raw.isdigit():
            raise CheckpointError(f"{MAX_MODEL_BYTES_ENV} must be a whole number of bytes, not {raw!r}")
        limit = max(limit, int(raw))
    return limit


# ----------------------------------------------------------------------------- rebuild


def rebuild(meta: CheckpointMeta, state: dict[str, torch.Tensor]) -> nn.Module:
    """The model `meta` describes, holding `state`; every tensor is checked against the structure first."""
    declared = {name: (tuple(t.shape), t.dtype) for name, t in state.items()}
    _check_tensors(_skeleton(meta), declared, meta.arch, limit=None)
    return _materialize(meta, state)


_SMALL_TENSOR = 1 << 12
_FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.randint,
                        torch.empty_strided, torch.eye, torch.arange, torch.linspace, torch.tensor})


class _LargeTensorsOnMeta(TorchFunctionMode):
    """Factory calls that would make a large tensor make it on the meta device instead.

    A whole-meta build breaks constructors that compute with small tensors (torchvision's RegNet
    widths); parameters are what may be huge, so only large tensors skip their memory.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _FACTORIES and kwargs.get("device") is None:
            probe = func(*args, **{**kwargs, "device": "meta"})
            if isinstance(probe, torch.Tensor) and probe.numel() > _SMALL_TENSOR:
                return probe
        return func(*args, **kwargs)


def _skeleton_model(arch: str, arch_args: dict[str, Any]) -> nn.Module:
    """The fresh architecture with its large tensors on the meta device: shapes without memory."""
    try:
        with _LargeTensorsOnMeta():
            return create_model(arch, **arch_args)
    except DnnpruneError as exc:
        raise CheckpointError(str(exc)) from None
    except Exception as exc:
        raise CheckpointError(f"{arch}'s constructor rejects the stored arch_args ({first_line(exc, 200)}); "
                              "the file is corrupt or from another version") from None


def _skeleton(meta: CheckpointMeta) -> nn.Module:
    if not is_registered(meta.arch):
        raise CheckpointError(f"unknown architecture {_short(meta.arch, 80)!r}: neither built in nor registered here; "
                              f"if it is your own, set {PLUGINS_VARIABLE} to the module that registers it (with its "
                              "folder on PYTHONPATH), as when the file was made")
    skeleton = _skeleton_model(meta.arch, meta.arch_args)
    _apply_changes(skeleton, meta)
    return skeleton


def skeleton(meta: CheckpointMeta | None = None, *, arch: str | None = None,
             arch_args: dict[str, Any] | None = None) -> nn.Module:
    """The architecture with its large tensors on the meta device (no memory): the checkpoint's structure
    when `meta` is given, else the fresh `arch`."""
    if meta is not None:
        return _skeleton(meta)
    return _skeleton_model(arch or "", arch_args or {})


def _materialize(meta: CheckpointMeta, state: dict[str, torch.Tensor]) -> nn.Module:
    """The real CPU model, called only once the skeleton has vouched for every tensor."""
    try:
        model = create_model(meta.arch, **meta.arch_args)
    except DnnpruneError as exc:
        raise CheckpointError(str(exc)) from None
    _apply_changes(model, meta)
    _resize_tensors(model, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint tensors do not fit {meta.arch} ({first_line(exc, 200)}); "
                              "the file is corrupt or from another model") from None
    return model


def _apply_changes(model: nn.Module, meta: CheckpointMeta) -> None:
    for name in sorted(meta.replaced, key=lambda n: n.count(".")):
        _replace(model, name, meta.replaced[name], meta.arch)
    modules = dict(model.named_modules())
    for name, attributes in meta.structure.items():
        if name not in modules:
            raise CheckpointError(f"checkpoint describes module {name!r}, which {meta.arch} does not have; "
                                  "the file is corrupt or from another model")
        for key, value in attributes.items():
            _set_attribute(modules[name], name, key, value)


def _replace(model: nn.Module, name: str, replacement: Replacement, arch: str) -> None:
    target = _submodule(model, name, f"checkpoint replaces module {name!r}, which {arch} does not have")
    if isinstance(replacement, Shortcut):
        new = _submodule(target, replacement.source,
                         f"checkpoint replaces {name!r} by its submodule {replacement.source!r}, which it does not have")
        mark_shortcut(new, replacement.source)
    else:
        new = nn.Identity()
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _submodule(model: nn.Module, name: str, problem: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"{problem}; the file is corrupt or from another model") from None


def _set_attribute(module: nn.Module, name: str, key: str, value: Any) -> None:
    """Only an existing simple attribute, to a value of the same kind: a file cannot plant anything else."""
    current = vars(module).get(key, _MISSING)
    if key.startswith("_") or key in _RUNTIME_STATE or current is _MISSING or not _is_simple(current):
        raise CheckpointError(f"checkpoint sets {name}.{key}, which is not a simple attribute of "
                              f"{type(module).__name__}; the file is corrupt or from another model")
    if not _same_kind(current, value):
        raise CheckpointError(f"checkpoint sets {name}.{key} to {_short(repr(value), 80)}, which does not fit "
                              f"its current value {_short(repr(current), 80)}; the file is corrupt")
    setattr(module, key, tuple(value) if isinstance(current, tuple) else value)


_MISSING = object()


def _same_kind(current: Any, value: Any) -> bool:
    if current is None:
        return not isinstance(value, list)
    if isinstance(current, (tuple, list)):
        return isinstance(value, list) and len(value) == len(current)
    if isinstance(current, bool) or isinstance(value, bool):
        return isinstance(current, bool) and isinstance(value, bool)
    if isinstance(current, float) and value is None:
        return True  # optional floats (BatchNorm momentum=None for a cumulative average); never a size
    if isinstance(current, (int, float)):
        return isinstance(value, (int, float)) and (isinstance(current, float) or isinstance(value, int))
    return isinstance(value, type(current))


def _check_tensors(skeleton: nn.Module, declared: dict[str, tuple[tuple[int, ...], torch.dtype]], arch: str,
                   limit: int | None) -> None:
    """Names, shapes and dtypes against the structure, and the memory they will take, before decoding."""
    expected = _expected_tensors(skeleton)
    missing, unexpected = sorted(set(expected) - set(declared)), sorted(set(declared) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint tensors do not match {arch}: missing {missing[:3]}, unexpected "
                              f"{[_short(u, 80) for u in unexpected[:3]]}; the file is corrupt or from another model")
    for name, (shape, dtype) in declared.items():
        want_shape, want_dtype = expected[name]
        if tuple(shape) != want_shape or dtype != want_dtype:
            raise CheckpointError(f"tensor {name!r} is {dtype} {list(shape)[:9]}, but the model's structure gives "
                                  f"{want_dtype} {list(want_shape)}; the file is corrupt or from another model")
    if limit is None:
        return
    fresh = sum(t.numel() * t.element_size() for t in _tensors(skeleton))
    needed = max(fresh, sum(math.prod(s) * torch.empty(0, dtype=d).element_size() for s, d in declared.values()))
    if needed > limit:
        raise CheckpointError(f"the checkpoint would make a model of {needed:,} bytes, more than the {limit:,} a file "
                              f"this size may; if it is genuine, set {MAX_MODEL_BYTES_ENV} higher")


def check_header_tensors(path: Path, meta: CheckpointMeta, structure: nn.Module,
                         stored: Mapping[str, torch.Tensor]) -> None:
    """What `load` checks before decoding (names, shapes, dtypes, encodings, memory), on the header's
    tensors alone (meta tensors stand in for the data), so a header-only reader vouches as much as `load`."""
    try:
        declared = declared_tensors(stored, meta.encodings)
        _check_tensors(structure, declared, meta.arch, model_bytes_limit(path.stat().st_size))
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name; an unknown one means a corrupt or foreign file."""
    if name not in _DTYPES_BY_NAME:
        raise CheckpointError(f"a tensor has the unknown dtype {_short(name, 20)!r}; the file is corrupt")
    return _DTYPES_BY_NAME[name]


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *(b for b in model.buffers() if b is not None)]


def _expected_tensors(skeleton: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every state-dict entry with the shape its module's (possibly pruned) attributes give."""
    keys = set(skeleton.state_dict())
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for module_name, module in skeleton.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        shapes = _shapes_from_attributes(module, module_name)
        for registry in (module._parameters, module._buffers):
            for key, tensor in registry.items():
                if tensor is not None and prefix + key in keys:
                    expected[prefix + key] = (shapes.get(key, tuple(tensor.shape)), tensor.dtype)
    return expected


def _shapes_from_attributes(module: nn.Module, name: str) -> dict[str, tuple[int, ...]]:
    try:
        return _layer_shapes(module)
    except (TypeError, ValueError, ZeroDivisionError):
        raise CheckpointError(f"the structure of module {name!r} ({type(module).__name__}) is inconsistent; "
                              "the file is corrupt") from None


def _layer_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the layers pruning changes, from their attributes (others keep their fresh shapes)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        inp, out, groups = _sizes(module.in_channels, module.out_channels, module.groups)
        kernel = _sizes(*module.kernel_size)
        if groups == 0 or inp % groups or out % groups:
            raise ValueError("groups must divide the channels")
        weight = (inp, out // groups, *kernel) if module.transposed else (out, inp // groups, *kernel)
        return {"weight": weight, "bias": (out,)}
    if isinstance(module, nn.Linear):
        inp, out = _sizes(module.in_features, module.out_features)
        return {"weight": (out, inp), "bias": (out,)}
    if isinstance(module, nn.modules.batchnorm._NormBase):
        (n,) = _sizes(module.num_features)
        return {key: (n,) for key in ("weight", "bias", "running_mean", "running_var")}
    if isinstance(module, nn.LayerNorm):
        shape = _sizes(*module.normalized_shape)
        return {"weight": shape, "bias": shape}
    if isinstance(module, nn.GroupNorm):
        channels, groups = _sizes(module.num_channels, module.num_groups)
        if groups == 0 or channels % groups:
            raise ValueError("num_groups must divide num_channels")
        return {"weight": (channels,), "bias": (channels,)}
    if isinstance(module, nn.PReLU):
        return {"weight": _sizes(module.num_parameters)}
    if isinstance(module, nn.Embedding):
        return {"weight": _sizes(module.num_embeddings, module.embedding_dim)}
    return {}


def _sizes(*values: Any) -> tuple[int, ...]:
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _INT64 for v in values):
        raise TypeError("sizes must be non-negative integers")
    return tuple(values)


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


_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def pytorch_file_kind(source: Path | bytes) -> Literal["pickle", "torchscript"] | None:
    """What torch.save or torch.jit.save made, told from the bytes and the zip's file list alone (never
    unpickled): "torchscript" (code/ and constants.pkl), "pickle" (torch.save), or None (neither).
    `source` is a file, or bytes already read from one (so a caller reads its file once)."""
    try:
        if isinstance(source, bytes):
            magic = source[:4]
        else:
            with source.open("rb") as handle:
                magic = handle.read(4)
        if magic[:2] in _PICKLE_MAGIC:
            return "pickle"
        if magic != b"PK\x03\x04":
            return None
    except OSError:
        return None
    try:
        with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return "pickle"  # torch.save's zip, truncated or damaged: still nothing dnnprune may unpickle
    if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
        return "torchscript"
    return "pickle" if any(name.endswith("data.pkl") for name in names) else None


def first_line(exc: BaseException, limit: int = 400) -> str:
    """An exception's first line for a one-line error: terminal colour codes dropped, at most `limit`
    characters, never empty."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return _short(text.splitlines()[0] if text else type(exc).__name__, limit)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- size before writing


_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
                torch.bool: "BOOL"}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


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
