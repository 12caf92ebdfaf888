"""Thin command-line layer: parse options, call one library function, write outputs."""

from dnnprune.cli import analyze, double_prune, export, import_cmd, info, prune, quantize, score, train  # noqa: F401  (registers the commands)
from dnnprune.cli._app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
