"""The CLI's observer: library progress as rich progress bars, rows as formatted lines."""

from __future__ import annotations

import time
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


LOG_EVERY_S = 30.0
"""In a log (not a terminal) rich draws bars only when they stop: a 30-minute train showed nothing until its
first epoch ended, so a plain progress line is printed at most this often per task instead."""


class RichObserver(Observer):
    """Bars appear with the first task (so a bad input prints only its error line) and stop on close."""

    def __init__(self, console: Console, *, formatter: RowFormatter | None = None, enabled: bool = True,
                 log_every_s: float = LOG_EVERY_S) -> None:
        self.console = console
        self.formatter = formatter
        self.enabled = enabled
        self.progress: Progress | None = None
        self.log_every_s = log_every_s
        self._last_line: dict[int, float] = {}

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
        task = int(self._bars().add_task(description, total=total, info=""))
        self._last_line[task] = time.monotonic()
        return task

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
        if not self.console.is_interactive:
            self._progress_line(task)

    def _progress_line(self, task: int) -> None:
        """One plain line for a log, when this task's last one is `log_every_s` old."""
        now = time.monotonic()
        if self.progress is None or now - self._last_line.get(task, now) < self.log_every_s:
            return
        self._last_line[task] = now
        state = next((t for t in self.progress.tasks if t.id == task), None)
        if state is None:
            return
        # a percentage: some bars advance by estimated cost (analysis cells) and name the true count in `info`
        done = f"{100 * state.completed / state.total:.0f} %" if state.total else f"{state.completed:,.0f}"
        eta = f", eta {state.time_remaining:,.0f} s" if state.time_remaining is not None else ""
        info = f"  {state.fields['info']}" if state.fields.get("info") else ""
        self.console.print(f"{state.description}: {done} ({state.elapsed or 0:,.0f} s{eta}){info}", highlight=False,
                           markup=False)

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
