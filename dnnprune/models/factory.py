"""Architectures by name: the zoo (imported here, so its decorators have run) and torchvision."""

from __future__ import annotations

import inspect
from typing import Any

import torch.nn as nn

from dnnprune.errors import ModelError
from dnnprune.models import zoo  # noqa: F401  (importing the zoo runs its @register_model decorators)
from dnnprune.models.plugins import PLUGINS_VARIABLE, load_plugins
from dnnprune.models.registry import _REGISTRY, _TASKS, TORCHVISION_PREFIX, TaskKind


def zoo_names() -> list[str]:
    return sorted(_REGISTRY)


def torchvision_names() -> list[str]:
    from torchvision import models

    return [f"{TORCHVISION_PREFIX}{n}" for n in models.list_models(module=models)]


def list_models() -> list[str]:
    return zoo_names() + torchvision_names()


def create_model(name: str, **args: Any) -> nn.Module:
    """Build an untrained model; `args` are the constructor arguments stored in checkpoints."""
    if name.startswith(TORCHVISION_PREFIX):
        from dnnprune.models.tv import create_torchvision

        return create_torchvision(name[len(TORCHVISION_PREFIX):], **args)
    _require(name)
    try:
        model = _REGISTRY[name](**args)
    except ModelError:
        raise
    except TypeError as exc:
        raise ModelError(f"bad arguments for {name!r}, or a type error in its constructor: {exc} (a model built from "
                         "data or imported weights is given num_classes and in_channels; its constructor must take "
                         "them)") from None
    except Exception as exc:  # a user's constructor (DNNPRUNE_PLUGINS) may raise anything
        raise ModelError(f"building {name!r} failed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); fix "
                         "its constructor or its arguments") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"the constructor of {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def model_task(name: str) -> TaskKind:
    """The task an architecture serves (every torchvision model is a classifier)."""
    if name.startswith(TORCHVISION_PREFIX):
        return "classification"
    _require(name)
    return _TASKS[name]


def accepts_argument(name: str, argument: str) -> bool:
    """Whether a zoo constructor takes `argument` (torchvision constructors are not inspected)."""
    if name.startswith(TORCHVISION_PREFIX) or not _registered(name):
        return False
    return argument in inspect.signature(_REGISTRY[name]).parameters


def is_registered(name: str) -> bool:
    """Whether the zoo or a plugin has this name (torchvision names are checked when built); the plugins are
    imported the first time a name is missing."""
    if name.startswith(TORCHVISION_PREFIX):
        return True
    return _registered(name)


def _registered(name: str) -> bool:
    if name not in _REGISTRY:
        load_plugins()
    return name in _REGISTRY


def _require(name: str) -> None:
    if not _registered(name):
        raise ModelError(
            f"unknown architecture {name!r}; choose one of {_some(zoo_names())}, torchvision.NAME "
            f"(e.g. torchvision.resnet18), or register your own with dnnprune.models.register_model in a "
            f"module named by {PLUGINS_VARIABLE}"
        )


def _some(names: list[str], shown: int = 24) -> str:
    """A list short enough for one error line: plugins may register hundreds of names."""
    if len(names) <= shown:
        return ", ".join(names)
    return f"{', '.join(names[:shown])} and {len(names) - shown} more (dnnprune.models.list_models())"
