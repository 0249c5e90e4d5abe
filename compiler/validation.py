"""Checks an ONNX graph up front, so later steps see valid models and refusals name causes.

    structure (own walk: duplicates, undefined tensors, dangling outputs, cycles)
    ─▶ what planer computes in (float32 weights, integer token ids, sane input dims)
    ─▶ onnx.checker, full (types and shapes through every node)
    ─▶ ONNX Runtime session creation (operators it implements, IR versions it reads)

One file the checker alone would refuse goes through: below opset 17 ONNX Runtime's
transformer optimizer writes LayerNormalization into the default domain (ORT runs it
there at any opset, ONNX defines it from 17). The checker then checks a copy where those
nodes sit in a private domain, and support.prepare spells them out before anything
reads the graph:

    LayerNormalization (ai.onnx, opset < 17) ─▶ checker sees planer.legacy:LayerNormalization

The first two are planer's own because the checker reports their symptoms far from the
cause (a deleted input surfaces as "not topologically sorted", float token ids as an
unsupported Gather index type). Each failure is one sentence; nothing below prints a
library's warning trace.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import onnx
import onnxruntime as ort

from planer.compiler.errors import BadInputError

HALF_TYPES = {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
MAX_DIM = 1 << 24  # a declared input dimension beyond this cannot be fed or timed here
_INTEGER_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}


def check_graph(proto: onnx.ModelProto, path: Path) -> None:
    """Runs every up-front check on the loaded (data-less) `proto` of the model at `path`.

    Raises:
        BadInputError: the first defect found, named in one sentence.
    """
    check_structure(proto.graph, path)
    check_types(proto.graph, path)
    check_inputs(proto.graph, path)
    legacy = legacy_layer_norms(proto)
    if legacy:
        check_onnx_proto(with_legacy_domain(proto, legacy), path)
    else:
        check_onnx(path)
    check_runtime(path)


def check_structure(graph: onnx.GraphProto, path: Path) -> None:
    """Refuses duplicate names, tensors nothing defines, dangling outputs and cycles."""
    _no_twice((i.name for i in graph.input), f"{path} declares the graph input {{!r}} twice.")
    _no_twice((t.name for t in graph.initializer),
              f"{path} defines the initializer {{!r}} twice.")
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    producer: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in filter(None, node.output):
            if name in defined or name in producer:
                raise BadInputError(f"{path}: node {_label(node, index)} writes the tensor "
                                    f"{name!r}, which is already defined (names must be "
                                    "assigned once).")
            producer[name] = index
    for index, node in enumerate(graph.node):
        for name in filter(None, node.input):
            if name not in defined and name not in producer:
                raise BadInputError(f"{path}: node {_label(node, index)} reads the tensor "
                                    f"{name!r}, which no node, input or initializer defines.")
    for output in graph.output:
        if output.name not in defined and output.name not in producer:
            raise BadInputError(f"{path}: graph output {output.name!r} is produced by no node.")
    cyclic = _node_on_cycle(graph, producer)
    if cyclic is not None:
        raise BadInputError(f"{path}: the graph has a cycle through node "
                            f"{_label(graph.node[cyclic], cyclic)}; an ONNX graph must be "
                            "acyclic.")


def check_types(graph: onnx.GraphProto, path: Path) -> None:
    """Refuses half-precision models and token inputs that are not integers."""
    for tensor in graph.initializer:
        if tensor.data_type in HALF_TYPES:
            raise BadInputError(
                f"{path} computes in {HALF_TYPES[tensor.data_type]} (weight {tensor.name!r}); "
                "planer compiles float32 models only, so export or convert it to float32.")
    for value in (*graph.input, *graph.output):
        elem = value.type.tensor_type.elem_type
        if elem in HALF_TYPES:
            raise BadInputError(
                f"{path} computes in {HALF_TYPES[elem]} (graph value {value.name!r}); planer "
                "compiles float32 models only, so export or convert it to float32.")
    for value in graph.input:
        elem = value.type.tensor_type.elem_type
        if value.name in TOKEN_INPUTS and elem not in _INTEGER_TYPES:
            kind = onnx.helper.tensor_dtype_to_np_dtype(elem) if elem else "untyped"
            raise BadInputError(f"input {value.name!r} of {path} is {kind}; token ids and masks "
                                "must be integers (int64 or int32).")


def check_inputs(graph: onnx.GraphProto, path: Path) -> None:
    """Refuses models without inputs and input dimensions that are negative, 0 or huge."""
    weights = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    if not inputs:
        raise BadInputError(f"{path} declares no inputs; planer compiles models that take "
                            "inputs (token ids, pixel values, ...).")
    for value in inputs:
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                continue
            size = dim.dim_value
            if size < 0:
                raise BadInputError(f"input {value.name!r} of {path} declares dimension {size}; "
                                    "a dimension is a positive number or a name.")
            if size == 0:
                raise BadInputError(f"input {value.name!r} of {path} declares dimension 0 (an "
                                    "empty tensor), which planer cannot calibrate or time.")
            if size > MAX_DIM:
                raise BadInputError(f"input {value.name!r} of {path} declares dimension {size}, "
                                    f"beyond the {MAX_DIM} planer can feed.")


def check_onnx(path: Path) -> None:
    """Runs the full ONNX checker (with shape and type inference) on the file at `path`."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # the checker raises ValidationError and InferenceError alike
        raise BadInputError(f"{path} is not a valid ONNX model: {_checker_cause(exc)}.") from exc


LEGACY_DOMAIN = "planer.legacy"
"""Where the checker's copy puts default-domain operators older opsets lack."""


def legacy_layer_norms(proto: onnx.ModelProto) -> list[int]:
    """Returns the indices of default-domain LayerNormalization nodes in an opset < 17 graph."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= 17:
        return []
    return [i for i, node in enumerate(proto.graph.node)
            if node.op_type == "LayerNormalization" and node.domain in ("", "ai.onnx")]


def with_legacy_domain(proto: onnx.ModelProto, nodes: list[int]) -> onnx.ModelProto:
    """Returns a copy with `nodes` in :data:`LEGACY_DOMAIN`, for the checker only.

    External weights become typed graph inputs in the copy: the checker reads an
    in-memory model's external data from no folder at all.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for index in nodes:
        copy.graph.node[index].domain = LEGACY_DOMAIN
    copy.opset_import.append(onnx.helper.make_opsetid(LEGACY_DOMAIN, 1))
    external = [t for t in copy.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    for tensor in external:
        copy.graph.input.append(onnx.helper.make_tensor_value_info(
            tensor.name, tensor.data_type, list(tensor.dims)))
        copy.graph.initializer.remove(tensor)
    return copy


def check_onnx_proto(proto: onnx.ModelProto, path: Path) -> None:
    """Runs the full ONNX checker on an in-memory model read from `path`."""
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise BadInputError(f"{path} is not a valid ONNX model: {_checker_cause(exc)}.") from exc


def check_runtime(path: Path) -> None:
    """Creates an ONNX Runtime session (no graph optimizations) to see it can load the model."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # its warnings are not the user's concern here
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BadInputError(_runtime_cause(path, exc)) from exc


def _no_twice(names: Iterable[str], message: str) -> None:
    counts = Counter(names)
    twice = next((name for name, n in counts.items() if n > 1), None)
    if twice is not None:
        raise BadInputError(message.format(twice))


def _label(node: onnx.NodeProto, index: int) -> str:
    op = f"{node.domain}:{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
    return f"{node.name!r} ({op})" if node.name else f"#{index} ({op})"


def _node_on_cycle(graph: onnx.GraphProto, producer: dict[str, int]) -> int | None:
    """Returns a node that sits on a cycle (Kahn's algorithm leaves it unvisited), or None."""
    users: dict[int, list[int]] = {i: [] for i in range(len(graph.node))}
    waiting = [0] * len(graph.node)
    for index, node in enumerate(graph.node):
        for source in {producer[n] for n in node.input if n in producer}:
            users[source].append(index)
            waiting[index] += 1
    ready = [i for i, n in enumerate(waiting) if n == 0]
    while ready:
        for user in users[ready.pop()]:
            waiting[user] -= 1
            if waiting[user] == 0:
                ready.append(user)
    return next((i for i, n in enumerate(waiting) if n > 0), None)


_CHECKER_PREFIX = re.compile(r"\[(?:Shape|Type)InferenceError\]\s*(?:Inference error\(s\):\s*)?")
_NODE = re.compile(r"\(op_type:(\w+), node name: ([^)]*)\):\s*")


_NO_OP = re.compile(r"No Op registered for (\w+) with domain_version of (\d+).*?"
                    r"Name: (.*?) OpType:")


def _checker_cause(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    missing = _NO_OP.search(text)
    if missing:
        return _missing_operator(*missing.groups())
    text = _CHECKER_PREFIX.sub("", text)
    match = _NODE.search(text)
    if match:
        rest = _CHECKER_PREFIX.sub("", text[match.end():])
        text = f"{match.group(1)} node {match.group(2)!r}: {rest}"
    return text.rstrip(". ")[:300]


def _missing_operator(op_type: str, opset: str, node: str) -> str:
    """Says that node `node` uses `op_type`, which ONNX's default domain lacks at `opset`."""
    try:
        since = onnx.defs.get_schema(op_type).since_version
    except Exception:  # not an ONNX operator at any opset
        return (f"node {node!r} ({op_type}) sits in the default ONNX domain, which has no "
                f"{op_type} operator; a custom operator needs its own domain")
    return (f"node {node!r} ({op_type}) uses an operator the default ONNX domain defines only "
            f"from opset {since}, but the model imports opset {opset}; re-export it at opset "
            f"{since} or later")


_UNKNOWN_OP = re.compile(r"([\w.]*):(\w+)\(-?\d+\) is not a registered function/op")
_NOT_IMPLEMENTED = re.compile(r"Could not find an implementation for (\w+)\((\d+)\) node "
                              r"with name '([^']*)'")


def _runtime_cause(path: Path, exc: Exception) -> str:
    text = " ".join(str(exc).split())
    unknown = _UNKNOWN_OP.search(text)
    if unknown:
        return (f"{path} uses the operator {unknown.group(1)}:{unknown.group(2)}, which ONNX "
                "Runtime does not implement.")
    missing = _NOT_IMPLEMENTED.search(text)
    if missing:
        return (f"{path}: ONNX Runtime has no kernel for node {missing.group(3)!r} "
                f"({missing.group(1)}, opset {missing.group(2)}) with these input types.")
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"Load model from \S+ failed:\s*", "", text)
    return f"ONNX Runtime cannot load {path}: {text.rstrip('. ')[:300]}."
