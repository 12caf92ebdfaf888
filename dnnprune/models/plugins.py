"""The user's own architectures: Python modules named in DNNPRUNE_PLUGINS, whose `@register_model`
decorators add names to the registry when they are imported.

They are imported only because the user named them, never because a checkpoint names an architecture
(a checkpoint is data and must not choose what code runs), and a module that fails to import is an
error with its reason, not a name quietly missing from the registry.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from importlib import import_module

from dnnprune.errors import ModelError

PLUGINS_VARIABLE = "DNNPRUNE_PLUGINS"
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_imported: set[str] = set()


def plugin_modules(spec: str | None = None) -> list[str]:
    """The module names in `spec` (default: the DNNPRUNE_PLUGINS variable), comma-separated."""
    spec = os.environ.get(PLUGINS_VARIABLE, "") if spec is None else spec
    names = [name.strip() for name in spec.split(",") if name.strip()]
    for name in names:
        if not _MODULE_NAME.fullmatch(name):
            raise ModelError(f"{PLUGINS_VARIABLE}: {name!r} is not a module name; name importable modules, comma-separated "
                             f"(e.g. mypackage.models, with its folder on PYTHONPATH), not files")
    return names


def load_plugins(spec: str | None = None) -> list[str]:
    """Import every named module once (its decorators register its architectures); returns the names."""
    names = plugin_modules(spec)
    for name in names:
        if name not in _imported:
            _import(name)
            _imported.add(name)
    return names


def _import(name: str) -> None:
    try:
        with contextlib.redirect_stdout(sys.stderr):  # a chatty plugin must not break `--json` output
            import_module(name)
    except SystemExit as exc:
        raise ModelError(f"{PLUGINS_VARIABLE}: importing {name!r} called sys.exit({exc.code!r}); a plugin module must "
                         "only define and register models") from None
    except ModuleNotFoundError as exc:
        if exc.name is not None and name.startswith(exc.name):
            raise ModelError(f"{PLUGINS_VARIABLE}: no module named {name!r}; put the folder that holds it on "
                             f"PYTHONPATH, or fix the name") from None
        raise ModelError(f"{PLUGINS_VARIABLE}: importing {name!r} failed, it needs {exc.name!r}; install that") from None
    except Exception as exc:  # the user's own code: report it, whatever it raised
        message = " ".join(str(exc).split())[:200]
        raise ModelError(f"{PLUGINS_VARIABLE}: importing {name!r} failed ({type(exc).__name__}: {message}); "
                         f"fix that module") from None
