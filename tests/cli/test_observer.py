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


def test_a_long_task_prints_a_plain_progress_line_in_a_log_at_most_once_per_interval(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """rich draws bars in a log only when they stop: a 30-minute train printed nothing until its first epoch."""
    clock = iter([0.0, 10.0, 31.0, 40.0, 62.0])
    monkeypatch.setattr("dnnprune.cli._observer.time.monotonic", lambda: next(clock))
    console, buffer = _log_console()
    with RichObserver(console, log_every_s=30.0) as observer:
        task = observer.begin("train", 800)       # t = 0
        observer.update(task, advance=100)         # t = 10: too soon
        observer.update(task, advance=200, info="loss 0.41")  # t = 31: a line
        observer.update(task, advance=100)         # t = 40: too soon after the last line
        observer.update(task, advance=100)         # t = 62: a line
        observer.end(task)
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("train: 38 % (") and lines[0].endswith("loss 0.41")
    assert lines[1].startswith("train: 62 % (")
