"""Layer selection by name pattern, shared by every command that acts on some layers only.

A pattern is either an fnmatch glob on the module name (`classifier.*`, `features.0`, `*`) or
`type:NAME` for every module of that class (`type:Linear` also matches subclasses of Linear). A pattern
that matches a container (a Sequential, a block) selects the candidate layers inside it. A glob, type or
container pattern picks the layers it can and passes over the others (`*` next to BatchNorm layers);
only a layer named exactly, of a type the command cannot handle, is an error, so a recipe never
silently skips what it names one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from fnmatch import fnmatchcase

from torch import nn

from dnnprune.errors import RecipeError

TYPE_PREFIX = "type:"


def select_layers(model: nn.Module, patterns: Iterable[str], *, within: Iterable[str] | None = None,
                  what: str = "layer pattern", supported: tuple[type[nn.Module], ...] | None = None) -> list[str]:
    """Names of the candidate layers the patterns pick, in model order.

    Candidates are the modules owning parameters, or only the names in `within` when given (and, with
    `supported`, only layers of those types). Naming one layer exactly whose type is not supported is an
    error naming the layer and its type; so is a pattern that picks nothing, naming the pattern.
    """
    modules = dict(model.named_modules())
    allowed = set(within) if within is not None else None

    def candidate(name: str, module: nn.Module) -> bool:
        if allowed is not None and name not in allowed:
            return False
        if allowed is None and not owns_parameters(module):
            return False
        return supported is None or isinstance(module, supported)

    chosen: set[str] = set()
    for pattern in patterns:
        if pattern.startswith(TYPE_PREFIX) and not pattern[len(TYPE_PREFIX):]:
            raise RecipeError(f"{what} {pattern!r} names no type; write e.g. type:Linear or type:Conv2d")
        picked: set[str] = set()
        passed_over: list[str] = []
        for name, module in modules.items():
            if not matches(name, module, pattern):
                continue
            if candidate(name, module):
                picked.add(name)
            elif supported is not None and owns_parameters(module):
                if pattern == name:
                    raise RecipeError(f"layer {name!r} is a {type(module).__name__}, which cannot be handled here: only "
                                      f"{_names(supported)} layers can; leave it out of the {what}s")
                passed_over.append(f"{name} ({type(module).__name__})")
            else:
                prefix = f"{name}." if name else ""
                picked.update(inner for inner, child in modules.items()
                              if inner.startswith(prefix) and inner != name and candidate(inner, child))
        if not picked:
            raise RecipeError(_nothing_picked(what, pattern, passed_over, supported, modules, candidate))
        chosen |= picked
    return [name for name in modules if name in chosen]


def matches(name: str, module: nn.Module, pattern: str) -> bool:
    """Whether a module is matched by a pattern itself (not through a parent)."""
    if pattern.startswith(TYPE_PREFIX):
        wanted = pattern[len(TYPE_PREFIX):]
        return any(cls.__name__ == wanted for cls in type(module).__mro__)
    return bool(name) and fnmatchcase(name, pattern)


def owns_parameters(module: nn.Module) -> bool:
    return any(p is not None for p in module._parameters.values())


def _names(types: tuple[type[nn.Module], ...]) -> str:
    return "/".join(t.__name__ for t in types)


def _nothing_picked(what: str, pattern: str, passed_over: list[str], supported: tuple[type[nn.Module], ...] | None,
                    modules: dict[str, nn.Module], candidate: Callable[[str, nn.Module], bool]) -> str:
    if passed_over and supported is not None:
        shown = ", ".join(passed_over[:3]) + (", ..." if len(passed_over) > 3 else "")
        return (f"{what} {pattern!r} matches only layers that cannot be handled here ({shown}): only "
                f"{_names(supported)} layers can; {_hint(modules, candidate)}")
    return f"{what} {pattern!r} matches no layer; {_hint(modules, candidate)}"


def _hint(modules: dict[str, nn.Module], candidate: Callable[[str, nn.Module], bool]) -> str:
    layers = [f"{name} ({type(m).__name__})" for name, m in modules.items() if name and candidate(name, m)]
    shown = ", ".join(layers[:6]) + (", ..." if len(layers) > 6 else "")
    return f"patterns are globs on module names or type:NAME; candidates here: {shown or 'none'}"
