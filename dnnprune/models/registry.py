"""The registry itself: names -> constructors and tasks, filled by the zoo modules' `@register_model`.

It imports nothing of the zoo (the zoo imports it); `factory` imports both and builds models."""

from __future__ import annotations

from typing import Callable, Literal, get_args

import torch.nn as nn

ModelFactory = Callable[..., nn.Module]
TaskKind = Literal["classification", "reconstruction"]
_REGISTRY: dict[str, ModelFactory] = {}
_TASKS: dict[str, TaskKind] = {}
TORCHVISION_PREFIX = "torchvision."


def register_model(name: str, *, task: TaskKind = "classification") -> Callable[[ModelFactory], ModelFactory]:
    """Register a constructor and the task it serves; a duplicate name fails at import."""

    if task not in get_args(TaskKind):
        raise ValueError(f"model {name!r}: task must be one of {', '.join(get_args(TaskKind))}, not {task!r}")
    if not name or any(c in name for c in ", \n"):
        raise ValueError(f"model name {name!r} must be non-empty, without spaces or commas")
    if name.startswith(TORCHVISION_PREFIX):
        raise ValueError(f"model {name!r}: names that start with {TORCHVISION_PREFIX!r} are torchvision's; choose another")

    def decorator(factory: ModelFactory) -> ModelFactory:
        held = _REGISTRY.get(name)
        if held is not None and _origin(held) != _origin(factory):  # the same definition run again: a new version
            raise ValueError(f"model {name!r} is registered twice ({_origin(held)} and {_origin(factory)}); give one "
                             "of them another name")
        _REGISTRY[name] = factory
        _TASKS[name] = task
        return factory

    return decorator


def _origin(factory: ModelFactory) -> str:
    """Where a constructor was defined: re-running a notebook cell or reloading a module defines it again."""
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"
