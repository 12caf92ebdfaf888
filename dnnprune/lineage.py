"""The one shape every library command has, and the one place lineage is written.

    fn(model, section, *, data, device, observer) -> (model, Report)

`@command("prune")` wraps such a function: it fills in the defaults (no data section, the CPU,
a silent observer), and when the command changed the model it chooses an anomaly detector's
threshold again (`thresholds`) and appends a lineage entry to the model's metadata (command, the
sha256 of the recipe parts it used, the report's key metrics, the parent checkpoint's sha256), so a
later `save` records the step.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import random
import typing
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch
import torch.nn as nn
from pydantic import BaseModel

from dnnprune import thresholds
from dnnprune.checkpoint import check_plain_model, meta_of
from dnnprune.errors import DnnpruneError
from dnnprune.observe import NULL_OBSERVER, Observer
from dnnprune.recipe import DataSection
from dnnprune.reports import Report

R = TypeVar("R", bound=Report)
CommandFn = Callable[..., tuple[nn.Module, R]]


def command(name: str, *, lineage: bool = True) -> Callable[[CommandFn[R]], CommandFn[R]]:
    """Register `name` as a library command; `lineage=False` for commands that only measure.

    The caller's world is left as it was: the model comes back in the mode (train/eval) and on the
    device it was passed in, and the global random generators and cuDNN flags a run seeds or sets are restored. Commands that rebuild the model (accuracy-aware
    pruning works on copies) may return another object than the one passed in: use the returned model."""

    def decorator(function: CommandFn[R]) -> CommandFn[R]:
        @functools.wraps(function)
        def wrapper(model: nn.Module, section: BaseModel, *, data: DataSection | None = None,
                    device: torch.device | str = "cpu", observer: Observer | None = None,
                    **extra: Any) -> tuple[nn.Module, R]:
            _check_arguments(function, name, model, section, data)
            data_section, device_name, observer = data or DataSection(), resolve_device(device), observer or NULL_OBSERVER
            with _caller_state_kept(model) as keep:
                result_model, report = function(model, section, data=data_section, device=device_name,
                                                observer=observer, **extra)
                if lineage:
                    dropped = thresholds.refresh(result_model, data_section, device_name)
                    if dropped:
                        observer.log(f"note: {dropped}")
                    meta_of(result_model).add_lineage(name, sections_sha256(section, data), report.lineage_metrics())
                keep(result_model)
            return result_model, report

        wrapper.command_name = name  # type: ignore[attr-defined]
        return wrapper

    return decorator


def _check_arguments(function: Callable[..., Any], name: str, model: nn.Module, section: Any, data: Any) -> None:
    """Wrong arguments fail here in one line, not deep inside the command."""
    _check_section(function, name, section)
    if data is not None and not isinstance(data, DataSection):
        raise DnnpruneError(f"{name}: data must be a dnnprune.recipe.DataSection, not {type(data).__name__}")
    meta_of(model)  # a model without metadata cannot be run through a command: say so up front
    check_plain_model(model)


def _check_section(function: Callable[..., Any], name: str, section: Any) -> None:
    """The section a command reads, by type: a dict or another command's section would fail deep inside."""
    try:
        expected = typing.get_type_hints(function).get("section")
    except Exception:  # annotations that cannot be resolved here: nothing to check against
        return
    if isinstance(expected, type) and not isinstance(section, expected):
        raise DnnpruneError(f"{name} takes a dnnprune.recipe.{expected.__name__}, not {type(section).__name__}; "
                            f"build one, e.g. dnnprune.recipe.{expected.__name__}(...)")


@contextlib.contextmanager
def _caller_state_kept(model: nn.Module) -> Iterator[Callable[[nn.Module], None]]:
    """Runs seed the global generators (and, on CUDA, ask cuDNN for deterministic kernels) and change the
    model's mode and device; a library caller's streams and settings must not change because a command
    ran. Autograd is on inside, even under a caller's no_grad. Yields `keep(result)`, which gives the
    result the model's mode and device (frozen parameters stay frozen in surgery itself)."""
    python_state, torch_state = random.getstate(), torch.random.get_rng_state()
    numpy_state = np.random.get_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    was_training, home = model.training, next(model.parameters(), torch.empty(0)).device

    def keep(result: nn.Module) -> None:
        result.train(was_training).to(home)

    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield keep
    finally:
        random.setstate(python_state)
        torch.random.set_rng_state(torch_state)
        np.random.set_state(numpy_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def sections_sha256(*sections: BaseModel | None) -> str:
    """A fingerprint of the recipe parts a command used (its section and the data section)."""
    dumped = [s.model_dump(mode="json") if s is not None else None for s in sections]
    return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()


def resolve_device(name: torch.device | str) -> torch.device:
    """`auto` is CUDA where there is a GPU, else the CPU; asking for CUDA without one is an input error."""
    if isinstance(name, torch.device):
        if name.type not in ("cpu", "cuda"):
            raise DnnpruneError(f"the device must be auto, cpu, cuda or cuda:N, not {str(name)!r}")
        if name.type == "cuda" and not torch.cuda.is_available():
            raise DnnpruneError("a CUDA device was asked for but no CUDA GPU is available; use cpu or auto")
        return name
    if not isinstance(name, str) or not (name in ("auto", "cpu", "cuda") or name.startswith("cuda:")):
        raise DnnpruneError(f"the device must be auto, cpu, cuda or cuda:N, not {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DnnpruneError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise DnnpruneError(f"the device must be auto, cpu, cuda or cuda:N, not {name!r}") from None
