"""The CLI's observer: library progress as rich progress bars, rows as formatted lines."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from dnnprune.observe import Observer

RowFormatter = Callable[[str, Mapping[str, Any]], str | None]


class RichObserver(Observer):
    """Bars appear with the first task (so a bad input prints only its error line) and stop on close."""

    def __init__(self, console: Console, *, formatter: RowFormatter | None = None, enabled: bool = True) -> None:
        self.console = console
        self.formatter = formatter
        self.enabled = enabled
        self.progress: Progress | None = None

    def _bars(self) -> Progress:
        if self.progress is None:
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                     TextColumn("{task.fields[info]}"), console=self.console)
            self.progress.start()
        return self.progress

    def begin(self, description: str, total: float) -> int:
        if not self.enabled:
            return 0
        return int(self._bars().add_task(description, total=total, info=""))

    def update(self, task: int, *, advance: float = 0.0, completed: float | None = None,
               total: float | None = None, info: str = "") -> None:
        if not self.enabled or self.progress is None:
            return
        kwargs: dict[str, Any] = {"advance": advance, "info": info}
        if completed is not None:
            kwargs["completed"] = completed
        if total is not None:
            kwargs["total"] = total
        self.progress.update(TaskID(task), **kwargs)

    def end(self, task: int, *, keep: bool = False) -> None:
        if self.enabled and self.progress is not None and not keep:
            self.progress.remove_task(TaskID(task))

    def log(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False)

    def row(self, kind: str, row: Mapping[str, Any]) -> None:
        if not self.enabled or self.formatter is None:
            return
        line = self.formatter(kind, row)
        if line is not None:
            self.console.print(line, highlight=False)

    def close(self) -> None:
        """Stop the bars; in a log (not a terminal) the kept bars end their line, and no bars print nothing
        (rich's own `stop` adds a blank line there, which landed before error lines)."""
        if self.progress is not None:
            self.progress.live.stop()
            if self.progress.task_ids and not self.console.is_interactive:
                self.console.print()
            self.progress = None

    def __enter__(self) -> "RichObserver":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None and self.progress is not None:  # a failed run ends on its error line alone
            for task in list(self.progress.task_ids):
                self.progress.remove_task(task)
        self.close()
