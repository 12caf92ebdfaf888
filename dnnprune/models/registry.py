"""One registry for every architecture: our zoo by short name, torchvision by `torchvision.NAME`."""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch.nn as nn

from dnnprune.errors import ModelError

ModelFactory = Callable[..., nn.Module]
TaskKind = Literal["classification", "reconstruction"]
_REGISTRY: dict[str, ModelFactory] = {}
_TASKS: dict[str, TaskKind] = {}
TORCHVISION_PREFIX = "torchvision."


def register_model(name: str, *, task: TaskKind = "classification") -> Callable[[ModelFactory], ModelFactory]:
    """Register a constructor and the task it serves; a duplicate name fails at import."""

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = factory
        _TASKS[name] = task
        return factory

    return decorator


def model_task(name: str) -> TaskKind:
    """The task an architecture serves (every torchvision model is a classifier)."""
    if name.startswith(TORCHVISION_PREFIX):
        return "classification"
    _load_zoo()
    if name not in _TASKS:
        raise ModelError(f"unknown architecture {name!r}; choose one of {', '.join(zoo_names())} or torchvision.NAME")
    return _TASKS[name]


def zoo_names() -> list[str]:
    _load_zoo()
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
    _load_zoo()
    if name not in _REGISTRY:
        raise ModelError(
            f"unknown architecture {name!r}; choose one of {', '.join(zoo_names())} "
            f"or torchvision.NAME (e.g. torchvision.resnet18)"
        )
    try:
        return _REGISTRY[name](**args)
    except TypeError as exc:
        raise ModelError(f"bad arguments for {name!r}: {exc}") from None


def _load_zoo() -> None:
    """Import the zoo modules so their decorators run; explicit, never swallowed."""
    from dnnprune.models import zoo  # noqa: F401


def accepts_argument(name: str, argument: str) -> bool:
    """Whether a zoo constructor takes `argument` (torchvision constructors are not inspected)."""
    import inspect

    _load_zoo()
    factory = _REGISTRY.get(name)
    return factory is not None and argument in inspect.signature(factory).parameters
