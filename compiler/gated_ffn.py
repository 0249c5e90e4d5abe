"""Names gated feed-forward blocks (SwiGLU, GeGLU), which planer does not rewrite yet.

Llama-style decoders (SmolLM, Llama, Mistral, Qwen) multiply two projections of the
same input before the down projection:

    x ─ MatMul(W_gate) ─ act ─┐
    x ─ MatMul(W_up) ─────────┴─ Mul ─ MatMul(W_down) ─ out

The finder reads FFNs of the form act(x·W1)·W2, so such a layer has "no feed-forward
block"; this module lets that refusal say what it found instead.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir

from planer.compiler.contrib_emit import node_label
from planer.compiler.irutil import const_array

_ELEMENTWISE = {"Mul", "Sigmoid", "Tanh", "Erf", "Div", "Add", "Relu", "Gelu", "Pow",
                "Sub", "Cast"}


def gated_ffn_hint(nodes: Iterable[ir.Node]) -> str:
    """Returns a clause naming the first gated FFN among `nodes`, or "" when there is none."""
    for node in nodes:
        gate = _gate_product(node)
        if gate is not None:
            return (f" (its FFN is gated: {node_label(gate)} multiplies an activated projection "
                    "of the input by another projection of it before the down projection, as "
                    "SwiGLU/GeGLU do; planer reads act(x·W1)·W2 FFNs only and cannot rewrite "
                    "gated ones yet)")
    return ""


def _gate_product(node: ir.Node) -> ir.Node | None:
    """Returns the Mul joining two projections of one input before `node`, a constant MatMul."""
    if node.op_type != "MatMul" or const_array(node.inputs[1]) is None \
            or node.inputs[0] is None:
        return None
    product = node.inputs[0].producer()
    if product is None or product.op_type != "Mul" or len(product.inputs) != 2:
        return None
    gate, up = (_projection(v) for v in product.inputs)
    # Two different projections of one input (an ungated GELU's x·Φ(x) reaches one MatMul).
    if gate is None or up is None or gate is up or gate.inputs[0] is not up.inputs[0]:
        return None
    return product


def _projection(value: ir.Value | None, depth: int = 8) -> ir.Node | None:
    """Follows elementwise ops back from `value` to the constant-weight MatMul it comes from."""
    for _ in range(depth):
        node = value.producer() if value is not None else None
        if node is None:
            return None
        if node.op_type == "MatMul" and const_array(node.inputs[1]) is not None:
            return node
        if node.op_type not in _ELEMENTWISE:
            return None
        data = [v for v in node.inputs if v is not None and const_array(v) is None]
        roots = {id(_projection(v, depth - 1)) for v in data}
        if not data or len(roots) != 1:
            return None
        value = data[0]
    return None
