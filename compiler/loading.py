"""Loads an ONNX file into onnx-ir, turning every way a file can be unusable into one sentence.

    model path ─ regular file, ≤ 2 GB ─ inside a planer OUT: finished, one set (outdir)
    ─▶ protobuf (no weights) ─ IR version, opset ─ external data: named, inside the
       model's folder, regular files ─▶ graph checks (compiler.validation: structure,
       float32, inputs, ONNX checker, ORT session) ─▶ onnx-ir ─ every weight readable,
       no NaN

So the block finder only ever sees valid graphs, and a refusal names the defect rather
than a symptom further down. External weights stay memory-mapped by onnx-ir, so models
over 2 GB load without copying.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from planer.compiler import files, outdir, validation
from planer.compiler.errors import BadInputError

logger = logging.getLogger(__name__)

SUPPORTED_OPSETS = range(14, 25)
MAX_MODEL_BYTES = 2 * files.GIB  # protobuf cannot parse more; larger models use external data
MIN_IR_VERSION = 3  # the first IR version with opset imports


def load_model(path: str | Path) -> ir.Model:
    """Reads `path` into an `ir.Model`, checking it is a complete, valid, supported model.

    Raises:
        BadInputError: the file is missing, not a regular file, not ONNX, truncated,
            invalid (see compiler.validation), references external data that is not
            there or lies outside its folder, uses an opset or IR version planer does
            not read, or holds NaN weights.
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
    _check_ir_version(proto, path)
    _check_external_data(proto, path)
    _check_opset(proto, path)
    validation.check_graph(proto, path)
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


def position_limit(model: ir.Model) -> int | None:
    """Returns how many positions the model's learned position table holds, or None.

    The table is a constant [P, D] Gather whose indices the graph computes (a Range, a
    Slice of an arange buffer, a CumSum over the mask) or reads from `position_ids`;
    tables indexed by `input_ids` or `token_type_ids` are vocabularies, and tables of 16
    rows or fewer are token types. Models with rotary or relative positions have none.
    """
    inputs = {v.name for v in model.graph.inputs}
    limits = []
    for node in model.graph:
        if node.op_type != "Gather" or len(node.inputs) < 2:
            continue
        table, indices = node.inputs[0], node.inputs[1]
        if table is None or indices is None or table.const_value is None:
            continue
        shape = table.const_value.shape.numpy()  # an initializer's shape is concrete
        if len(shape) != 2 or shape[0] <= 16 or indices.const_value is not None:
            continue
        source = _index_source(indices)
        if source is not None and source.name in inputs and source.name != "position_ids":
            continue
        limits.append(int(shape[0]))
    return max(limits) if limits else None


# Ops that only re-lay an index tensor out: GPT-2 looks its tokens up through
# input_ids.view(-1, S), which must still count as indexed by input_ids.
_INDEX_PLUMBING = {"Reshape", "Cast", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand"}


def _index_source(indices: ir.Value) -> ir.Value | None:
    """Follows layout-only ops back from a Gather's indices to what they are computed from."""
    value: ir.Value | None = indices
    for _ in range(8):
        producer = value.producer() if value is not None else None
        if producer is None or producer.op_type not in _INDEX_PLUMBING:
            return value
        value = producer.inputs[0]
    return value


def check_sequence_length(model: ir.Model, seq_len: int) -> None:
    """Refuses a sequence length longer than the model's position table.

    Raises:
        BadInputError: `seq_len` exceeds `position_limit(model)`.
    """
    limit = position_limit(model)
    if limit is not None and seq_len > limit:
        raise BadInputError(sequence_too_long(limit, seq_len))


def sequence_too_long(limit: int, seq_len: int) -> str:
    """Says that `seq_len` is longer than a position table of `limit` rows."""
    return (f"the model's position table holds {limit} positions, so --seq-len {seq_len} is "
            f"longer than it can read; use --seq-len {limit} or less.")


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _check_ir_version(proto: onnx.ModelProto, path: Path) -> None:
    version = proto.ir_version
    if version < MIN_IR_VERSION:
        raise BadInputError(f"{path} declares IR version {version}, which no ONNX exporter "
                            "writes; re-export the model.")
    if version > onnx.IR_VERSION:
        raise BadInputError(f"{path} declares IR version {version}; planer reads IR versions "
                            f"{MIN_IR_VERSION} to {onnx.IR_VERSION}.")


def _check_external_data(proto: onnx.ModelProto, path: Path) -> None:
    missing: set[str] = set()
    folder = path.parent.resolve()
    for tensor in proto.graph.initializer:
        if not _is_external(tensor):
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        location = entries.get("location")
        where = f"weight {tensor.name!r} of {path}"
        if not location:
            raise BadInputError(f"{where} is stored in an external file but names none "
                                "(its 'location' is missing).")
        if os.path.isabs(location) or os.path.normpath(location).startswith(".."):
            raise BadInputError(f"{where} points outside the model's folder ({location}); "
                                "planer reads data files beside the model only.")
        target = path.parent / location
        if not os.path.lexists(target) and len(location) < 256:
            missing.add(location)
            continue
        size = files.regular_file(target, "data file")
        if not target.resolve().is_relative_to(folder):
            raise BadInputError(f"{where} points outside the model's folder ({location} "
                                f"links to {target.resolve()}).")
        _check_extent(entries, size, where, location)
    if missing:
        names = ", ".join(sorted(missing))
        raise BadInputError(
            f"{path} keeps its weights in {names}, which is missing beside it; "
            "copy the data file next to the model."
        )


def _check_extent(entries: dict[str, str], size: int, where: str, location: str) -> None:
    try:
        offset, length = int(entries.get("offset", 0)), int(entries.get("length", 0))
    except ValueError:
        raise BadInputError(f"{where} has a malformed offset or length in {location}.") from None
    if offset < 0 or length < 0 or offset + length > size:
        raise BadInputError(f"{where} lies beyond the end of {location}; the model or its "
                            "data file is truncated.")


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
            array = tensor.numpy()
        except Exception as exc:
            raise BadInputError(
                f"weight {value.name!r} of {path} cannot be read ({_short(exc)}); "
                "the model or its data file is truncated."
            ) from exc
        if array.dtype.kind == "f" and np.isnan(array).any():
            raise BadInputError(f"weight {value.name!r} of {path} holds NaN values; planer "
                                "cannot compile a model whose weights are not numbers.")


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]
