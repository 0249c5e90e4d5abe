"""Errors a user can act on, each carrying the process exit code the CLI returns.

Exit codes (documented in the README): 0 success, 1 internal error, 2 bad input,
3 latency target unreachable (the best model found is still written).
"""

from __future__ import annotations

from types import ModuleType

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_UNREACHABLE = 3


class PlanerError(Exception):
    """An error whose message is one sentence a user can act on."""

    exit_code = EXIT_INTERNAL


class BadInputError(PlanerError):
    """The model, plan, calibration data or an option cannot be used as given."""

    exit_code = EXIT_BAD_INPUT


class UnsupportedModelError(BadInputError):
    """The model is valid ONNX but not a Transformer planer can read."""


class PreconditionError(PlanerError):
    """A pass was asked to run on a graph that does not meet its requirements."""


class TargetUnreachableError(PlanerError):
    """The latency target could not be met; the best model found was still written."""

    exit_code = EXIT_UNREACHABLE

    def __init__(self, message: str, result: object = None):
        super().__init__(message)
        self.result = result


def require_torch(purpose: str) -> ModuleType:
    """Imports torch, or says in one sentence which extra provides it.

    Raises:
        BadInputError: torch is not installed.
    """
    try:
        import torch
    except ImportError as exc:
        raise BadInputError(
            f"{purpose} needs torch; install it with `pip install torch==2.13.0` "
            "(or the project's `export` extra)."
        ) from exc
    return torch
