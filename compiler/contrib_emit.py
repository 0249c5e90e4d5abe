"""Shared helpers for spelling a fused operator out in standard ONNX ops.

`Emitter` inserts the replacement nodes before the fused node, names every node and
constant after it (`Attention_0/q/MatMul`, never a counter, so goldens stay stable) and
stamps `planer.pass = canonicalize` on each: the expansion is part of reading the model.
`refuse` raises the one-sentence error that names the node and says what planer needs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import numpy as np
import onnx_ir as ir

from planer.compiler.errors import UnsupportedModelError
from planer.compiler.irutil import add_initializer, const_array, replace_uses
from planer.compiler.names import PROVENANCE_PASS, PassName

MS = "com.microsoft"


def node_label(node: ir.Node) -> str:
    """Returns how a sentence names `node`: `com.microsoft.Attention node 'Attention_0'`."""
    domain = node.domain or "ai.onnx"
    return f"{domain}.{node.op_type} node {node_base(node)!r}"


def node_base(node: ir.Node) -> str:
    """Returns a stable name for `node`: its own, else its first output's."""
    if node.name:
        return node.name
    first = next((v.name for v in node.outputs if v.name), None)
    return first or node.op_type


def refuse(node: ir.Node, found: str, instead: str) -> NoReturn:
    """Raises the error naming `node`, what was found on it and what planer needs instead."""
    raise UnsupportedModelError(f"{node_label(node)} {found}; {instead}.")


def used(value: ir.Value | None) -> bool:
    """Tells whether anything (a node or the graph's outputs) reads `value`."""
    return value is not None and (bool(value.uses()) or value.is_graph_output())


def attr(node: ir.Node, name: str, default: Any) -> Any:
    """Returns attribute `name` of `node`, or `default` when it is absent."""
    found = node.attributes.get(name)
    return default if found is None else found.value


def rank_of(value: ir.Value | None) -> int | None:
    """Returns the rank of `value` from its shape or its producer, else None."""
    if value is None:
        return None
    if value.shape is not None:
        return len(value.shape)
    producer = value.producer()
    if producer is None:
        return None
    if producer.op_type == "Transpose" and "perm" in producer.attributes:
        return len(producer.attributes["perm"].value)
    if producer.op_type == "Reshape":
        target = const_array(producer.inputs[1])
        return None if target is None else int(target.size)
    if producer.op_type in ("Cast", "Add", "Mul", "Sub", "Div", "MatMul", "Where", "Not",
                            "Equal", "Softmax"):
        ranks = [rank_of(i) for i in producer.inputs if i is not None]
        known = [r for r in ranks if r is not None]
        return max(known) if known and len(known) == len(ranks) else None
    return None


class Emitter:
    """Inserts standard-ONNX nodes before a fused node, named after it."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node):
        self.graph = graph
        self.anchor = anchor
        self.base = node_base(anchor)
        self.dtype: np.dtype = np.dtype(np.float32)

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], name: str,
           attributes: Mapping[str, Any] | None = None) -> ir.Value:
        """Adds one single-output node `<base>/<name>` and returns its output."""
        full = f"{self.base}/{name}"
        node = ir.node(op_type, list(inputs), attributes=dict(attributes or {}), name=full,
                       metadata_props={PROVENANCE_PASS: PassName.CANONICALIZE})
        node.outputs[0].name = f"{full}_out"
        self.graph.insert_before(self.anchor, node)
        return node.outputs[0]

    def const(self, name: str, array: np.ndarray | float | int | list,
              dtype: Any = None) -> ir.Value:
        """Registers a constant `<base>/<name>` (floats in the model's float type)."""
        data = np.asarray(array)
        if dtype is None and data.dtype.kind == "f":
            dtype = self.dtype
        return add_initializer(self.graph, f"{self.base}/{name}",
                               data.astype(dtype) if dtype is not None else data)

    def replace(self, index: int, new: ir.Value) -> None:
        """Points every reader of the fused node's output `index` at `new`."""
        old = self.anchor.outputs[index]
        if not used(old):
            return
        if new.shape is None:
            new.shape = old.shape
        if new.type is None:
            new.type = old.type
        replace_uses(old, new)

    def finish(self) -> None:
        """Removes the fused node once nothing reads it."""
        self.graph.remove(self.anchor, safe=True)


def reduce_mean_last(e: Emitter, x: ir.Value, name: str, opset: int) -> ir.Value:
    """Emits ReduceMean over the last axis, keeping it (axes an input from opset 18)."""
    if opset >= 18:
        return e.op("ReduceMean", [x, e.const(f"{name}/axes", [-1], np.int64)], name,
                    {"keepdims": 1})
    return e.op("ReduceMean", [x], name, {"axes": [-1], "keepdims": 1})


def layer_norm(e: Emitter, x: ir.Value, gamma: ir.Value | None, beta: ir.Value | None,
               eps: float, opset: int, name: str = "LayerNorm") -> ir.Value:
    """Emits LayerNormalization over the last axis (spelled out below opset 17)."""
    if opset >= 17 and gamma is not None:
        return e.op("LayerNormalization", [x, gamma, beta], name,
                    {"axis": -1, "epsilon": float(eps)})
    # The decomposed chain canonicalize's FuseLayerNorm rule matches at opset >= 17.
    mean = reduce_mean_last(e, x, f"{name}/mean", opset)
    d = e.op("Sub", [x, mean], f"{name}/Sub")
    var = reduce_mean_last(e, e.op("Mul", [d, d], f"{name}/square"), f"{name}/var", opset)
    std = e.op("Sqrt", [e.op("Add", [var, e.const(f"{name}/eps", eps)], f"{name}/Add_eps")],
               f"{name}/Sqrt")
    y = e.op("Div", [d, std], f"{name}/Div")
    if gamma is not None:
        y = e.op("Mul", [y, gamma], f"{name}/Mul")
    if beta is not None:
        y = e.op("Add", [y, beta], f"{name}/Add")
    return y


def rms_norm(e: Emitter, x: ir.Value, gamma: ir.Value | None, eps: float, opset: int,
             name: str = "RMSNorm") -> ir.Value:
    """Emits x / √(mean(x²) + ε) · γ over the last axis."""
    square = e.op("Mul", [x, x], f"{name}/square")
    mean = reduce_mean_last(e, square, f"{name}/mean", opset)
    std = e.op("Sqrt", [e.op("Add", [mean, e.const(f"{name}/eps", eps)], f"{name}/Add_eps")],
               f"{name}/Sqrt")
    y = e.op("Div", [x, std], f"{name}/Div")
    return y if gamma is None else e.op("Mul", [y, gamma], f"{name}/Mul")
