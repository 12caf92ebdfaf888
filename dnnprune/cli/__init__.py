"""Thin command-line layer: parse options, call one library function, write outputs.

The commands (and torch) are imported on first use, inside `main`, so that a Ctrl-C while they load
ends in one line like any other interrupt.
"""

from __future__ import annotations

import sys
from typing import Any


def main() -> None:
    """The console entry point: the commands load inside it, so a Ctrl-C while torch imports ends in one
    line; `_entry.run` turns usage errors into one line too."""
    try:
        from dnnprune.cli._entry import run
    except KeyboardInterrupt:
        sys.stderr.write("interrupted while starting; nothing was written\n")
        sys.exit(130)
    run()


def __getattr__(name: str) -> Any:
    if name == "app":
        from dnnprune.cli._entry import app

        return app
    raise AttributeError(f"module 'dnnprune.cli' has no attribute {name!r}")


__all__ = ["app", "main"]
