"""Writes compiled models atomically and verifies them before anything is reported.

Everything is first written to a hidden temporary folder inside the output folder,
checked there (full ONNX checker, then an ONNX Runtime load with all optimizations and
one run), and only then renamed into place, data file before model. A failed check
leaves the output folder as it was. The input model is never a destination.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from planer.compiler.errors import BadInputError, PlanerError

logger = logging.getLogger(__name__)

MODEL_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
UNREACHABLE_NAME = "fastest-missed-target.onnx"
OWN_FILES = (MODEL_NAME, DATA_NAME, UNREACHABLE_NAME, f"{UNREACHABLE_NAME}.data", "plan.json",
             "report.json")
TWO_GB = 2**31
MAX_IR_VERSION = 10  # ORT releases before 1.20 reject newer IR versions


class VerificationError(PlanerError):
    """The emitted model failed the ONNX checker or would not run in ONNX Runtime."""


def check_output_location(model_path: Path, out_dir: Path) -> None:
    """Refuses output folders that would overwrite the input or a user's own files.

    Raises:
        BadInputError: `out_dir` is the input, a file, or holds files planer did not write.
    """
    src = model_path.resolve()
    out = out_dir.resolve()
    if out == src:
        raise BadInputError(f"-o {out_dir} points at the input model; choose a new folder.")
    if out.exists() and not out.is_dir():
        raise BadInputError(f"-o {out_dir} is a file; planer writes a folder of outputs there.")
    inputs = {src, *(src.parent / name for name in _external_files(src))}
    for name in OWN_FILES:
        if (out / name).resolve() in inputs:
            raise BadInputError(
                f"writing to {out_dir} would overwrite the input model's {name}; "
                "choose another folder."
            )
    if out.is_dir() and not _written_by_planer(out):
        clashes = [name for name in OWN_FILES if (out / name).exists()]
        if clashes:
            raise BadInputError(
                f"{out_dir} already holds {', '.join(clashes)} that planer did not write; "
                "choose an empty or new folder."
            )


def write_outputs(
    model: ir.Model,
    out_dir: Path,
    *,
    documents: Mapping[str, Any],
    external_data: bool,
    feeds: Mapping[str, np.ndarray],
    before_commit: Callable[[Path], Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Saves `model` plus JSON `documents` into `out_dir` after verifying the model.

    Args:
        model: the compiled model.
        out_dir: destination folder (created if missing).
        documents: file name -> JSON-ready object (plan.json, report.json).
        external_data: keep weights in `model.onnx.data` beside the model.
        feeds: inputs for the ORT load-and-run check.
        before_commit: called with the verified temporary model path; the dict it
            returns is merged into `report.json` (measured fidelity, latency).

    Returns:
        The documents as written (report.json with the measurements merged in).
    """
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".planer-tmp-", dir=out_dir))
    try:
        model.ir_version = min(model.ir_version, MAX_IR_VERSION)
        path = tmp / MODEL_NAME
        big = _weight_bytes(model) >= TWO_GB
        ir.save(model, path, external_data=DATA_NAME if (external_data or big) else None)
        verify_model(path, feeds)
        docs = dict(documents)
        if before_commit is not None:
            extra = before_commit(path)
            docs["report.json"] = {**docs.get("report.json", {}), **extra}
        for name, content in docs.items():
            (tmp / name).write_text(json.dumps(content, indent=2, default=_json_default) + "\n")
        _commit(tmp, out_dir, [DATA_NAME, *docs, MODEL_NAME])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return docs


def verify_model(path: Path, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Runs the full ONNX checker and an ORT load-and-run on `path`; returns the outputs.

    Raises:
        VerificationError: the model is invalid, fails to load, or produces NaN.
    """
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise VerificationError(f"the emitted model fails the ONNX checker: {exc}") from exc
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        outputs = session.run(None, dict(feeds))
    except Exception as exc:
        raise VerificationError(f"ONNX Runtime cannot run the emitted model: {exc}") from exc
    for name, array in zip((o.name for o in session.get_outputs()), outputs, strict=True):
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise VerificationError(f"the emitted model's output {name!r} holds NaN or Inf.")
    return outputs


def _commit(tmp: Path, out_dir: Path, names: list[str]) -> None:
    for name in names:
        source = tmp / name
        if source.exists():
            os.replace(source, out_dir / name)
        elif name == DATA_NAME and (out_dir / name).exists():
            (out_dir / name).unlink()  # a previous run's data file no model refers to now


def _written_by_planer(folder: Path) -> bool:
    report = folder / "report.json"
    try:
        return json.loads(report.read_text()).get("tool") == "planer"
    except (OSError, ValueError, AttributeError):
        return False


def _external_files(path: Path) -> set[str]:
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return set()
    names = set()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                names.add(entry.value)
    return names


def _weight_bytes(model: ir.Model) -> int:
    return sum(
        v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None
    )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")
