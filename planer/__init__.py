"""planer: a compiler that rewrites Transformer ONNX models to meet a latency target.

    import planer
    summary = planer.inspect()                       # the bundled all-MiniLM-L6-v2
    result = planer.compile(target_flops=0.5, out="out/minilm-half")
    change = planer.diff(summary.path, result.model_path)

The functions and result types live in `planer.api`; they are imported on first use, so
`import planer` stays cheap (no ONNX, ONNX Runtime or torch import).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_API = ("compile", "inspect", "diff", "CompileResult", "DiffResult", "LayerSummary",
        "ModelSummary")
_ERRORS = ("PlanerError", "BadInputError", "UnsupportedModelError", "TargetUnreachableError")
__all__ = [
    "BadInputError", "CompileResult", "DiffResult", "LayerSummary", "ModelSummary",
    "PlanerError", "TargetUnreachableError", "UnsupportedModelError", "__version__",
    "compile", "diff", "inspect",
]

if TYPE_CHECKING:
    from planer.api import (
        CompileResult,
        DiffResult,
        LayerSummary,
        ModelSummary,
        compile,
        diff,
        inspect,
    )
    from planer.compiler.errors import (
        BadInputError,
        PlanerError,
        TargetUnreachableError,
        UnsupportedModelError,
    )


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module("planer.api"), name)
    if name in _ERRORS:
        return getattr(importlib.import_module("planer.compiler.errors"), name)
    raise AttributeError(f"module 'planer' has no attribute {name!r}")
