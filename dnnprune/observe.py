"""How a library command tells the outside what it is doing, without knowing who listens.

The library never prints: it calls an `Observer`. This base class ignores everything, so Python
users get silence by default; the CLI passes one that draws rich progress bars and lines.
"""

from __future__ import annotations

from typing import Any, Mapping


class Observer:
    """Progress tasks, free-form log lines and structured rows (one accuracy-aware step, one epoch)."""

    def begin(self, description: str, total: float) -> int:
        """Start a progress task; returns its handle."""
        return 0

    def update(self, task: int, *, advance: float = 0.0, completed: float | None = None,
               total: float | None = None, info: str = "") -> None:
        """Move a task on (by `advance`, or to `completed`) and show `info` beside it."""

    def end(self, task: int, *, keep: bool = False) -> None:
        """The task is done; `keep` leaves its bar on screen."""

    def log(self, message: str) -> None:
        """One line worth showing (an epoch summary, a warning)."""

    def row(self, kind: str, row: Mapping[str, Any]) -> None:
        """A structured event, e.g. kind `prune.step` with the step's row; the CLI formats it."""


NULL_OBSERVER = Observer()
