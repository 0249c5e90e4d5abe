"""argparse value types shared by the CLI's subcommands."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def positive_int(text: str) -> int:
    """Parses a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def positive_float(text: str) -> float:
    """Parses a number above 0."""
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from exc
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be above 0")
    return value


def output_folder(text: str) -> Path:
    """Parses -o: any path but the empty one (which would mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the output folder is empty; name a folder such as out/")
    return Path(text)


def latency_target(text: str) -> tuple[str, float]:
    """Parses `20ms`/`0.02s`/`20` as ("ms", 20.0) and `50%`/`0.5x` as ("dense", 0.5).

    Refuses at parse time what no search can meet: non-numbers, inf and nan, values not
    above 0, and fractions of the dense latency above 1.
    """
    value = text.strip().lower()
    for suffix, factor in (("%", 0.01), ("x", 1.0)):
        if value.endswith(suffix):
            fraction = _finite(value[: -len(suffix)], text, "50%") * factor
            if fraction > 1:
                raise argparse.ArgumentTypeError(
                    f"{text!r} is a fraction of the dense latency and must be at most 100%")
            return "dense", fraction
    scale = 1.0
    for suffix, factor in (("ms", 1.0), ("s", 1000.0)):
        if value.endswith(suffix):
            value, scale = value[: -len(suffix)], factor
            break
    return "ms", _finite(value, text, "20ms") * scale


def throughput_target(text: str) -> float:
    """Parses `200/s` or `200` (inputs per second) as 200.0; refuses what is not above 0."""
    value = text.strip().lower().removesuffix("/s")
    return _finite(value, text, "200/s")


def _finite(number: str, text: str, example: str) -> float:
    try:
        value = float(number)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a latency such as {example}") from exc
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite latency")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
    return value


def duration(text: str) -> float:
    """Parses a wall-clock budget, `90s`, `5m`, `1.5h` or plain seconds, into seconds."""
    value = text.strip().lower()
    scale = 1.0
    for suffix, factor in (("min", 60.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if value.endswith(suffix):
            value, scale = value[: -len(suffix)], factor
            break
    try:
        seconds = float(value) * scale
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 5m or 90s") from exc
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive, finite duration")
    return seconds
