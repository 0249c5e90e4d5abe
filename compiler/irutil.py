"""Small onnx-ir helpers shared by the finder and the passes.

New nodes are built through `NodeBuilder`, which derives every name from a block id
(`layer3/attn/q/MatMul`) and stamps provenance metadata (`planer.pass`,
`planer.block`) that `planer diff` and the report read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from planer.compiler.errors import PreconditionError

# Defined once in compiler.names; re-exported (`as`) for modules that import them from here.
from planer.compiler.names import PROVENANCE_BLOCK as PROVENANCE_BLOCK
from planer.compiler.names import PROVENANCE_PASS as PROVENANCE_PASS


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """Returns the constant contents of `value` (initializer or Constant output), else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain == "":
        attr = next(iter(producer.attributes.values()), None)
        if attr is not None and attr.name == "value":
            return attr.as_tensor().numpy()
        if attr is not None and attr.name in ("value_float", "value_int"):
            return np.asarray(attr.value)
        if attr is not None and attr.name in ("value_floats", "value_ints"):
            return np.asarray(list(attr.value))
    return None


def scalar(value: ir.Value | None) -> float | None:
    """Returns the value of a one-element constant, else None."""
    array = const_array(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def other_input(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """Returns the input of a two-input node that is not `value`."""
    ins = list(node.inputs)
    if len(ins) != 2:
        return None
    if ins[0] is value:
        return ins[1]
    if ins[1] is value:
        return ins[0]
    return None


class NodeBuilder:
    """Appends nodes with deterministic names and provenance before an anchor node."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node, *, pass_name: str, block: str):
        self.graph = graph
        self.anchor = anchor
        self.pass_name = pass_name
        self.block = block
        self.nodes: list[ir.Node] = []

    def op(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        name: str,
        attributes: Mapping[str, Any] | None = None,
        *,
        domain: str = "",
    ) -> ir.Value:
        """Adds one single-output node named `<block>/<name>` and returns its output."""
        full = f"{self.block}/{name}"
        node = ir.node(
            op_type,
            inputs,
            attributes=dict(attributes or {}),
            domain=domain,
            name=full,
            metadata_props={PROVENANCE_PASS: self.pass_name, PROVENANCE_BLOCK: self.block},
        )
        node.outputs[0].name = f"{full}_out"
        self.graph.insert_before(self.anchor, node)
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        """Registers `array` as an initializer named `<block>/<name>`."""
        return add_initializer(self.graph, f"{self.block}/{name}", array)


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Registers a new initializer; the name must be unused (names come from block ids)."""
    # ascontiguousarray turns 0-d arrays into [1]; keep scalars scalar (Gather/Range need it).
    array = np.ascontiguousarray(array).reshape(np.shape(array))
    tensor = ir.tensor(array, name=name)
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(tensor.dtype),
        const_value=tensor,
    )
    if name in graph.initializers:
        del graph.initializers[name]
    graph.register_initializer(value)
    return value


def replace_uses(old: ir.Value, new: ir.Value) -> None:
    """Points every reader of `old` (graph outputs included) at `new`, keeping the output name.

    Callers that replace a whole block follow with `remove_dead_producers(old)`.
    """
    if old.is_graph_output():
        name = old.name
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        old.name = f"{name}__replaced"
        new.name = name
    else:
        old.replace_all_uses_with(new)


def is_dead(node: ir.Node) -> bool:
    """Whether none of `node`'s outputs is read or is a graph output."""
    return not any(v.uses() or v.is_graph_output() for v in node.outputs)


def remove_dead_producers(value: ir.Value) -> None:
    """Removes the producer of `value` and its inputs' producers while none feeds anything.

    A rewrite that replaced a block calls this on the block's old output, so it never
    leaves a dead copy behind for the finder to read again (shared plumbing such as the
    mask path stays: other layers still read it).
    """
    producer = value.producer()
    graph = producer.graph if producer is not None else None
    stack = [producer]
    while stack:
        node = stack.pop()
        if node is None or graph is None or node.graph is not graph:
            continue
        if not is_dead(node):
            continue
        inputs = [v for v in node.inputs if v is not None]
        graph.remove(node, safe=True)
        stack.extend(v.producer() for v in inputs)


SHAPE_READERS = frozenset({"Shape", "Size"})
"""Ops that read only a tensor's dimensions, never its values."""


def region_between(entry: ir.Value, end: ir.Value) -> set[int]:
    """Returns the ids of the nodes computed from `entry` that `end` depends on.

    Paths through Shape/Size readers do not count: they read dimensions, not values, so
    what follows them is not computed from `entry`'s values.
    """
    after: set[int] = set()
    stack = list(entry.consumers())
    while stack:
        node = stack.pop()
        if id(node) in after or node.op_type in SHAPE_READERS:
            continue
        after.add(id(node))
        for out in node.outputs:
            stack.extend(out.consumers())
    before: set[int] = set()
    up = [end.producer()]
    while up:
        producer = up.pop()
        if producer is None or id(producer) in before:
            continue
        before.add(id(producer))
        up.extend(v.producer() for v in producer.inputs if v is not None)
    return after & before


def bypass_with_constant(graph: ir.Graph, old: ir.Value, bias: np.ndarray, block: str) -> None:
    """Feeds a dropped sub-block's constant output (its bias) straight to its residual Adds."""
    consumers = list(old.consumers())
    if old.is_graph_output() or any(c.op_type != "Add" for c in consumers):
        raise PreconditionError(
            f"{block} cannot be dropped: its output is read by something other than a "
            "residual Add."
        )
    constant = add_initializer(graph, f"{block}/dropped_bias", bias)
    for node in consumers:
        for i, item in enumerate(node.inputs):
            if item is old:
                node.replace_input_with(i, constant)
    remove_dead_producers(old)
