"""Reading the files a user names: only regular files, every failure one line.

A FIFO blocks a read forever and a device (/dev/zero) never ends, so a path must name a regular file
before anything reads it; an unreadable one (/proc/self/mem, a bad disk) is an input error, not a crash.
"""

from __future__ import annotations

from pathlib import Path

from dnnprune.errors import DnnpruneError


def check_regular(path: Path, what: str, *, error: type[DnnpruneError] = DnnpruneError,
                  missing_hint: str = "check the path") -> Path:
    """`path` if it is a regular file (symlinks followed); otherwise one line saying what it is instead."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {path} is a directory; give the path of a file")
    if not path.exists():
        raise error(f"{what} {path} not found; {missing_hint}")
    if not path.is_file():
        raise error(f"{what} {path} is not a regular file (a pipe, socket or device); give the path of a saved file")
    return path


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
