"""The one shape every library command has, and the one place lineage is written.

    fn(model, section, *, data, device, observer) -> (model, Report)

`@command("prune")` wraps such a function: it fills in the defaults (no data section, the CPU,
a silent observer), and when the command changed the model it chooses an anomaly detector's
threshold again (`thresholds`) and appends a lineage entry to the model's metadata (command, the sha256 of the recipe parts it used, the report's key metrics,
the parent checkpoint's sha256), so a later `save` records the step.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any, Callable, TypeVar

import torch
import torch.nn as nn
from pydantic import BaseModel

from dnnprune import thresholds
from dnnprune.checkpoint import meta_of
from dnnprune.errors import DnnpruneError
from dnnprune.observe import NULL_OBSERVER, Observer
from dnnprune.recipe import DataSection
from dnnprune.reports import Report

R = TypeVar("R", bound=Report)
CommandFn = Callable[..., tuple[nn.Module, R]]


def command(name: str, *, lineage: bool = True) -> Callable[[CommandFn[R]], CommandFn[R]]:
    """Register `name` as a library command; `lineage=False` for commands that only measure."""

    def decorator(function: CommandFn[R]) -> CommandFn[R]:
        @functools.wraps(function)
        def wrapper(model: nn.Module, section: BaseModel, *, data: DataSection | None = None,
                    device: torch.device | str = "cpu", observer: Observer | None = None,
                    **extra: Any) -> tuple[nn.Module, R]:
            meta_of(model)  # a model without metadata cannot be run through a command: say so up front
            data_section, device_name = data or DataSection(), resolve_device(device)
            result_model, report = function(model, section, data=data_section, device=device_name,
                                            observer=observer or NULL_OBSERVER, **extra)
            if lineage:
                thresholds.refresh(result_model, data_section, device_name)
                meta_of(result_model).add_lineage(name, sections_sha256(section, data), report.lineage_metrics())
            return result_model, report

        wrapper.command_name = name  # type: ignore[attr-defined]
        return wrapper

    return decorator


def sections_sha256(*sections: BaseModel | None) -> str:
    """A fingerprint of the recipe parts a command used (its section and the data section)."""
    dumped = [s.model_dump(mode="json") if s is not None else None for s in sections]
    return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()


def resolve_device(name: torch.device | str) -> torch.device:
    """`auto` is CUDA where there is a GPU, else the CPU; asking for CUDA without one is an input error."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DnnpruneError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise DnnpruneError(f"--device must be auto, cpu or cuda, not {name!r}") from None
