"""Reading the files a user names: only regular files, every failure one line.

A FIFO blocks a read forever and a device (/dev/zero) never ends, so a path must name a regular file
before anything reads it; an unreadable one (/proc/self/mem, a bad disk) is an input error, not a crash.
"""

from __future__ import annotations

import stat
from pathlib import Path

from dnnprune.errors import DnnpruneError


def check_regular(path: Path, what: str, *, error: type[DnnpruneError] = DnnpruneError,
                  missing_hint: str = "check the path") -> Path:
    """`path` if it is a regular file (symlinks followed); otherwise one line saying what it is instead."""
    path = Path(path)
    try:
        mode = path.stat().st_mode  # follows symlinks
    except FileNotFoundError:
        raise error(f"{what} {shown(path)} not found; {missing_hint}") from None
    except (OSError, ValueError) as exc:  # a name too long, a link loop, a file used as a folder, a NUL byte
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise error(f"cannot open {what} {shown(path)} ({reason}); check the path") from None
    if stat.S_ISDIR(mode):
        raise error(f"{what} {shown(path)} is a directory; give the path of a file")
    if not stat.S_ISREG(mode):
        raise error(f"{what} {shown(path)} is not a regular file (a pipe, socket or device); give the path of a saved file")
    return path


def shown(path: Path | str, limit: int = 160) -> str:
    """A path for a one-line message: a 5,000-character one is cut in the middle."""
    text = str(path)
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]}"


def read_bytes(path: Path, what: str, *, error: type[DnnpruneError] = DnnpruneError,
               missing_hint: str = "check the path") -> bytes:
    """The whole file, after `check_regular`; an OS error while reading is one line too."""
    check_regular(path, what, error=error, missing_hint=missing_hint)
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise error(f"cannot read {what} {path} ({exc.strerror or type(exc).__name__}); check the file") from None


def read_text(path: Path, what: str, *, error: type[DnnpruneError] = DnnpruneError,
              missing_hint: str = "check the path") -> str:
    """The file as UTF-8 text; bytes that are not UTF-8 are one line."""
    payload = read_bytes(path, what, error=error, missing_hint=missing_hint)
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not UTF-8 text; give the file dnnprune or your editor wrote") from None
