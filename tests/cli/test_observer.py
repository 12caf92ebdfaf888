"""The CLI's progress bars in a log (stdout not a terminal): nothing but the bars that were kept, each ending its
line, so that an error line or a `--json` document never follows a stray blank line or shares a bar's line."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from dnnprune.cli._observer import RichObserver


def _log_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, soft_wrap=True, force_terminal=False, force_interactive=False), buffer


def test_bars_that_end_leave_nothing_in_a_log() -> None:
    console, buffer = _log_console()
    with RichObserver(console) as observer:
        task = observer.begin("fine-tune", 3)
        observer.update(task, advance=3)
        observer.end(task)
    assert buffer.getvalue() == ""


def test_a_kept_bar_ends_its_line_before_what_follows() -> None:
    console, buffer = _log_console()
    with RichObserver(console) as observer:
        task = observer.begin("train", 2)
        observer.update(task, advance=2)
        observer.end(task, keep=True)
    console.print("next")
    lines = buffer.getvalue().splitlines()
    assert lines[0].startswith("train") and "2/2" in lines[0] and lines[1] == "next"


def test_a_run_that_fails_mid_bar_prints_nothing_before_its_error() -> None:
    console, buffer = _log_console()
    with pytest.raises(RuntimeError):
        with RichObserver(console) as observer:
            observer.begin("analyze", 10)
            raise RuntimeError("data went bad")
    assert buffer.getvalue() == ""
