"""Loads an ONNX file into onnx-ir, turning every way a file can be unusable into one sentence.

A model inside a planer OUT is read only once OUT holds one whole output set
(compiler.outdir finishes a commit a killed writer left, and refuses a mixed set).

External weights stay memory-mapped by onnx-ir, so models over 2 GB load without copying.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import onnx_ir as ir

from planer.compiler import files, outdir
from planer.compiler.errors import BadInputError

logger = logging.getLogger(__name__)

SUPPORTED_OPSETS = range(14, 25)
MAX_MODEL_BYTES = 2 * files.GIB  # protobuf cannot parse more; larger models use external data


def load_model(path: str | Path) -> ir.Model:
    """Reads `path` into an `ir.Model`, checking it is a complete, supported ONNX file.

    Raises:
        BadInputError: the file is missing, not ONNX, truncated, references external
            data that is not there, or uses an opset planer does not support.
    """
    path = Path(path)
    check_model_file(path)
    outdir.check_readable(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types
        raise BadInputError(f"{path} is not a readable ONNX model ({_short(exc)}).") from exc
    if not proto.graph.node:
        raise BadInputError(f"{path} is not an ONNX model (it holds no graph nodes).")
    _check_external_data(proto, path)
    _check_opset(proto, path)
    try:
        model = ir.load(str(path))
    except Exception as exc:
        raise BadInputError(f"{path} could not be read as ONNX ({_short(exc)}).") from exc
    _check_tensors_readable(model, path)
    return model


def check_model_file(path: Path) -> None:
    """Refuses a model path that is not a regular file of at most 2 GB (never opening it).

    Raises:
        BadInputError: missing, a folder, a link loop, a FIFO or device, or too large.
    """
    if path.is_dir():
        raise BadInputError(f"{path} is a folder; pass the .onnx file inside it.")
    files.regular_file(path, "model file", max_bytes=MAX_MODEL_BYTES)


def has_external_data(path: str | Path) -> bool:
    """Tells whether the model at `path` keeps any initializer in an external file."""
    proto = onnx.load(str(path), load_external_data=False)
    return any(_is_external(t) for t in proto.graph.initializer)


def default_opset(model: ir.Model) -> int:
    """Returns the model's version of the default ONNX domain."""
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)))


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _check_external_data(proto: onnx.ModelProto, path: Path) -> None:
    missing: set[str] = set()
    for tensor in proto.graph.initializer:
        if not _is_external(tensor):
            continue
        location = next(e.value for e in tensor.external_data if e.key == "location")
        if not (path.parent / location).exists():
            missing.add(location)
    if missing:
        names = ", ".join(sorted(missing))
        raise BadInputError(
            f"{path} keeps its weights in {names}, which is missing beside it; "
            "copy the data file next to the model."
        )


def _check_opset(proto: onnx.ModelProto, path: Path) -> None:
    versions = {o.domain: o.version for o in proto.opset_import}
    version = versions.get("", versions.get("ai.onnx"))
    if version is None or version not in SUPPORTED_OPSETS:
        raise BadInputError(
            f"{path} uses ONNX opset {version}; planer reads opsets "
            f"{SUPPORTED_OPSETS.start} to {SUPPORTED_OPSETS.stop - 1}."
        )


def _check_tensors_readable(model: ir.Model, path: Path) -> None:
    # A truncated external data file only shows when the bytes are read.
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        try:
            tensor.numpy()
        except Exception as exc:
            raise BadInputError(
                f"weight {value.name!r} of {path} cannot be read ({_short(exc)}); "
                "the model or its data file is truncated."
            ) from exc


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]
