"""Reads the files a user names, refusing what could hang or exhaust memory.

Every model, data, plan and calibration file goes through `regular_file` first: it
follows symbolic links (a loop is named as one), refuses FIFOs, devices, sockets and
folders (reading a FIFO blocks forever, /dev/zero never ends), and bounds the size. JSON
is parsed by the standard library, whose nesting limit (the interpreter's recursion
limit) turns a 100,000-deep document into one sentence rather than a crash.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

from planer.compiler.errors import BadInputError

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def regular_file(path: Path, what: str, *, max_bytes: int | None = None) -> int:
    """Checks that `path` is a readable regular file of at most `max_bytes`; returns its size.

    Args:
        path: the file (symbolic links are followed).
        what: how the sentence names it, e.g. "model file" or "plan file".
        max_bytes: refuse larger files (None: no bound).

    Raises:
        BadInputError: missing, a link loop, a folder, not a regular file, or too large.
    """
    try:
        info = os.stat(path)
    except OSError as exc:
        raise BadInputError(_stat_error(path, what, exc)) from exc
    if stat.S_ISDIR(info.st_mode):
        raise BadInputError(f"{what} {path} cannot be read (it is a folder).")
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _KINDS if test(info.st_mode)), "a special file")
        raise BadInputError(f"{what} {path} is not a regular file (it is {kind}).")
    if max_bytes is not None and info.st_size > max_bytes:
        raise BadInputError(f"{what} {path} holds {_size(info.st_size)}, more than the "
                            f"{_size(max_bytes)} planer reads from such a file.")
    if not os.access(path, os.R_OK):
        raise BadInputError(f"{what} {path} cannot be read (permission denied).")
    return info.st_size


def read_bytes(path: Path, what: str, *, max_bytes: int) -> bytes:
    """Reads a regular file of at most `max_bytes` (see `regular_file`)."""
    regular_file(path, what, max_bytes=max_bytes)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BadInputError(f"{what} {path} cannot be read ({_reason(exc)}).") from exc


def parse_json(text: str, what: str) -> Any:
    """Parses JSON, naming a syntax error or a document nested too deeply in one sentence.

    Raises:
        BadInputError: the text is not JSON or is nested deeper than Python's
            recursion limit (about 1,000 levels).
    """
    try:
        return json.loads(text)
    except RecursionError:
        raise BadInputError(f"{what} is nested too deeply (more than about 1,000 levels of "
                            "brackets).") from None
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{what} is not valid JSON ({exc}).") from exc


def _stat_error(path: Path, what: str, exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        broken = " (a symbolic link to nothing)" if os.path.islink(path) else ""
        return f"{what} {path} does not exist{broken}."
    if exc.errno == errno.ELOOP:
        return f"{what} {path} is a symbolic link loop."
    if exc.errno == errno.ENAMETOOLONG:
        return f"{what} path {_shorten(path)} is too long for the file system."
    return f"{what} {path} cannot be read ({_reason(exc)})."


def _shorten(path: Path) -> str:
    text = str(path)
    return text if len(text) <= 80 else f"{text[:40]}…{text[-30:]} ({len(text):,} characters)"


def _reason(exc: OSError) -> str:
    return (exc.strerror or type(exc).__name__).lower()


def _size(n: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"
