"""The app with every command registered, and the run that turns click's usage errors into one line."""

from __future__ import annotations

import sys

import typer
from rich.text import Text

from dnnprune.cli import analyze, double_prune, export, import_cmd, info, prune, quantize, score, train  # noqa: F401  (registers the commands)
from dnnprune.cli._app import app, err_console

# click's exception classes, wherever this typer keeps them (its own copy of click from 0.22, click itself before)
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def run() -> None:
    """Run the app; exit 2 with one line on a usage error."""
    try:
        code = app(standalone_mode=False, prog_name="dnnprune")
    except _USAGE_ERROR as exc:
        context = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError":  # `dnnprune` alone: typer has printed the help
            sys.exit(2)
        command = context.command_path if context is not None else "dnnprune"
        message = " ".join(exc.format_message().split()).rstrip(".")
        err_console.print(Text("error: ", style="bold red") + Text(f"{message}; see '{command} --help'"))
        sys.exit(2)
    except _CLICK_ERROR as exc:
        err_console.print(Text("error: ", style="bold red") + Text(" ".join(exc.format_message().split())))
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print(Text("interrupted", style="bold red"))
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "run"]
