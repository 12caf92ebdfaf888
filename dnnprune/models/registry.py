"""The registry itself: names -> constructors and tasks, filled by the zoo modules' `@register_model`.

It imports nothing of the zoo (the zoo imports it); `factory` imports both and builds models."""

from __future__ import annotations

from typing import Callable, Literal

import torch.nn as nn

ModelFactory = Callable[..., nn.Module]
TaskKind = Literal["classification", "reconstruction"]
_REGISTRY: dict[str, ModelFactory] = {}
_TASKS: dict[str, TaskKind] = {}
TORCHVISION_PREFIX = "torchvision."


def register_model(name: str, *, task: TaskKind = "classification") -> Callable[[ModelFactory], ModelFactory]:
    """Register a constructor and the task it serves; a duplicate name fails at import."""

    if name.startswith(TORCHVISION_PREFIX):
        raise ValueError(f"model {name!r}: names that start with {TORCHVISION_PREFIX!r} are torchvision's; choose another")

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = factory
        _TASKS[name] = task
        return factory

    return decorator
