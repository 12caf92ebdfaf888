"""Typed reports: every command returns one, and the CLI writes it as JSON inside a common envelope."""

from __future__ import annotations

import datetime as dt
import json
import math
import platform
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from dnnprune._version import __version__
from dnnprune.checkpoint import atomic_write_bytes


class Report(BaseModel):
    """Base of every command's report. Subclasses list their fields; unknown ones are refused."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, ser_json_inf_nan="null")

    def lineage_metrics(self) -> dict[str, Any]:
        """The few numbers a checkpoint's lineage keeps of this step."""
        return {}

    def as_json(self) -> dict[str, Any]:
        return _clean(self.model_dump(mode="json"))


def envelope(command: str, body: Report | dict[str, Any], *, inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report file: what ran, where and with which inputs, then the command's own report."""
    payload = body.as_json() if isinstance(body, Report) else body
    return {
        "command": command,
        "dnnprune_version": __version__,
        "time_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "inputs": inputs or {},
        **payload,
    }


def machine_description() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def write_report(path: Path, report: dict[str, Any]) -> Path:
    text = json.dumps(_clean(report), indent=2, sort_keys=False) + "\n"
    atomic_write_bytes(path, text.encode())
    return path


def default_report_path(output: Path, suffix: str = ".json") -> Path:
    """Next to the output: model.safetensors -> model.json."""
    return output.with_suffix(suffix) if output.suffix else output.with_name(output.name + suffix)


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf or Paths; make the report strictly valid."""
    if isinstance(value, BaseModel):
        return _clean(value.model_dump(mode="json"))
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return _clean(value.tolist())
    return value
