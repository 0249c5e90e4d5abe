"""Reads gated feed-forward blocks (SwiGLU, GeGLU); names them where planer cannot rewrite them.

Llama-style decoders (SmolLM, Llama, Mistral, Qwen) multiply two projections of the
same input before the down projection:

    x ─ MatMul(W_gate) ─ act ─┐
    x ─ MatMul(W_up) ─────────┴─ Mul ─ MatMul(W_down) ─ out

`read_gated_ffn` reads this as an FfnSpec with `gate` = W_gate, `w1` = W_up and
`w2` = W_down (ModernBERT's GLU holds W_gate and W_up as halves of one fused Wi, split
after the MatMul: compiler.glu reads each half as a Linear over its columns): channel j
is act(x·g_j)·(x·u_j), so channel pruning keeps a channel's gate column, up column and
down row together, and the down projection's input is the activation importance and
the refit read, as for act(x·W1)·W2 FFNs.

Head and channel pruning, their fitting and the latency profile (gated variants)
handle gated FFNs, and recovery's mirror runs them (recovery.mirror.FfnMirror). What
rebuilds or models the FFN as act(x·W1)·W2 does not yet: FFN→MoE, INT8 of the FFN
block (and INT8's cost model), multiplexing. `require_gated_support` refuses those
before any calibration or fitting, naming the gating Mul; a gate the finder cannot read
(no activation on it: a bilinear GLU) is named by `gated_ffn_hint` in the finder's
"no feed-forward block" refusal.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable

import onnx_ir as ir

from planer.compiler.contrib_emit import node_label
from planer.compiler.errors import UnsupportedModelError
from planer.compiler.glu import fused_part
from planer.compiler.irutil import const_array
from planer.compiler.plan import Plan
from planer.compiler.spec import FfnSpec, Linear, ModelSpec

# The finder's readers (compiler.blocks), passed in so this module does not import it.
Region = Callable[[ir.Value | None], "tuple[list[ir.Node], ir.Value] | None"]
AsLinear = Callable[[ir.Node], "Linear | None"]
Classify = Callable[[list[ir.Node]], str]

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


def read_gated_ffn(down: Linear, region: Region, as_linear: AsLinear,
                   classify: Classify) -> FfnSpec | None:
    """Reads the gated FFN ending in the projection `down`, or returns None.

    `region` returns the elementwise nodes producing a value and the one tensor they
    start from; `as_linear` reads a node as MatMul(x, W) [+ b]; `classify` names an
    activation region. The returned spec's `block` is empty and its `out` is the down
    MatMul's output (the finder adds the bias Add).
    """
    product = down.input.producer()
    if product is None or product.op_type != "Mul" or len(product.inputs) != 2:
        return None
    for gate_side in (0, 1):
        up_value = product.inputs[1 - gate_side]
        up_node = up_value.producer() if up_value is not None else None
        up = (as_linear(up_node) if up_node is not None else None) \
            or fused_part(up_value, as_linear)
        found = region(product.inputs[gate_side])
        if up is None or found is None:
            continue
        act_nodes, root = found
        root_node = root.producer()
        gate = (as_linear(root_node) if root_node is not None else None) \
            or fused_part(root, as_linear)
        # One MatMul on both sides is a GLU only as two disjoint halves of a fused weight
        # (an ungated GELU's x·Φ(x) reaches one projection twice).
        if gate is None or (gate.matmul is up.matmul and _overlap(gate.columns, up.columns)) \
                or gate.input is not up.input \
                or not gate.out_features == up.out_features == down.in_features \
                or gate.in_features != down.out_features:
            continue
        return FfnSpec(block="", x=up.input, out=down.matmul.outputs[0], w1=up, w2=down,
                       activation=classify(act_nodes), nodes=[*act_nodes, product], gate=gate)
    return None


def _overlap(a: slice, b: slice) -> bool:
    return a.start < b.stop and b.start < a.stop


def gated_ffn_problem(spec: ModelSpec, what: str) -> str | None:
    """Returns the sentence refusing `what` (a pass) on the model's first gated FFN, or None.

    Args:
        spec: the model as read.
        what: what cannot handle gated FFNs yet, e.g. "FFN→MoE".
    """
    for layer in spec.layers:
        ffn = layer.ffn
        if ffn.gate is not None:
            product = ffn.nodes[-1]
            return (f"layer {layer.index}'s FFN is gated ({node_label(product)} multiplies "
                    f"{ffn.activation}(x·W_gate) by x·W_up before the down projection, as "
                    f"SwiGLU/GeGLU do); {what} reads act(x·W1)·W2 FFNs only and cannot "
                    "rewrite gated ones yet")
    return None


def require_gated_support(spec: ModelSpec, plan: Plan | None = None, *, mux: int = 1,
                          passes: Collection[str] = ()) -> None:
    """Refuses, before any fitting, what cannot rewrite the model's gated FFNs yet.

    Head and channel pruning (and recovery's mirror) handle gated FFNs; FFN→MoE, INT8 of
    an FFN block (its cost model and quantizer read W1 and W2 only) and multiplexing
    (which rebuilds act(x·W1)·W2) do not.

    Args:
        spec: the model as read.
        plan: the plan to compile, if known.
        mux: instances multiplexed per row (--mux).
        passes: the variant kinds a latency search may use (--passes).

    Raises:
        UnsupportedModelError: the sentence names the gated FFN and what refused it.
    """
    gated = {layer.index for layer in spec.layers if layer.ffn.gated}
    if not gated:
        return
    wanted = []
    if "moe" in passes:
        wanted.append("FFN→MoE (--passes moe)")
    if max(mux, plan.mux if plan is not None else 1) > 1:
        wanted.append("multiplexing (--mux)")
    for i, layer in enumerate(plan.layers if plan is not None else ()):
        if i in gated and layer.moe is not None:
            wanted.append(f"FFN→MoE (plan layer {i} sets moe)")
        if i in gated and layer.int8 is not None and layer.int8.blocks in ("ffn", "both"):
            wanted.append(f"INT8 of the FFN block (plan layer {i})")
    if wanted:
        raise UnsupportedModelError(f"{gated_ffn_problem(spec, wanted[0])}.")
