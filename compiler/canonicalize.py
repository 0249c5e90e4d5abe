"""Rewrites the spellings exporters produce into one form the block finder matches.

    Constant nodes          ─▶ initializers (the finder reads weights one way)
    Identity(w)             ─▶ w
    Gemm(x, W, b, transB)   ─▶ MatMul(x, W_KN) ─ Add(b)
    Reshape(x,[-1,K]) ─ MatMul ─ Reshape(·,[..,N])  ─▶ MatMul(x, W_KN)   (GPT-2 Conv1D)
    decomposed LayerNorm    ─▶ LayerNormalization (opset >= 17)
    ReduceMean ─ Sub ─ Pow ─ ReduceMean ─ Add(eps) ─ Sqrt ─ Div ─ Mul(γ) ─ Add(β)
    Sum(a, b)               ─▶ Add(a, b)         (planer's own ort_kernels spellings,
    BiasGelu(h, b)          ─▶ Add(h, b) ─ erf-GELU    so a compiled model reads back)
    com.microsoft Gelu(x)   ─▶ x·(1 + erf(x/√2))·0.5

GELU (erf or tanh, fused or decomposed) and other activations are left as they are:
the FFN finder treats whatever elementwise region lies between the two FFN MatMuls
as the activation, and channel pruning only slices the weights around it. Shape/
Gather/Concat reshape chains inside attention are not folded here; the attention
rewrite replaces the whole region with constant per-layer shapes.

Every rewrite here is exact (same arithmetic in one op; the GELU expansion up to float
rounding), so the canonical model reproduces the original outputs; tests pin this down
per exporter.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult
from onnx_ir.passes.common import (
    IdentityEliminationPass,
    LiftConstantsToInitializersPass,
    RemoveUnusedNodesPass,
    ShapeInferencePass,
)

from planer.compiler.irutil import add_initializer, const_array, other_input, replace_uses, scalar
from planer.compiler.loading import default_opset

logger = logging.getLogger(__name__)

PASS_NAME = "canonicalize"


class GemmToMatMulPass(InPlacePass):
    """Rewrites Gemm with a constant weight as MatMul + Add on a [K, N] weight."""

    def call(self, model: ir.Model) -> PassResult:
        count = 0
        for node in list(model.graph):
            if node.op_type != "Gemm" or node.domain != "":
                continue
            weight = const_array(node.inputs[1])
            attrs = {k: a.value for k, a in node.attributes.items()}
            if weight is None or attrs.get("transA", 0):
                continue
            alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
            w_kn = (weight.T if attrs.get("transB", 0) else weight) * np.float32(alpha)
            name = node.name or f"gemm{count}"
            w_value = add_initializer(model.graph, f"{name}/w_KN", w_kn.astype(weight.dtype))
            matmul = ir.node("MatMul", [node.inputs[0], w_value], name=f"{name}/MatMul")
            matmul.metadata_props["planer.pass"] = PASS_NAME
            model.graph.insert_before(node, matmul)
            out = matmul.outputs[0]
            out.name = f"{name}/MatMul_out"
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                bias = node.inputs[2]
                if beta != 1.0:
                    b = const_array(bias)
                    if b is None:
                        model.graph.remove(matmul, safe=True)
                        continue
                    bias = add_initializer(model.graph, f"{name}/bias", b * np.float32(beta))
                add = ir.node("Add", [out, bias], name=f"{name}/Add")
                add.metadata_props["planer.pass"] = PASS_NAME
                model.graph.insert_before(node, add)
                out = add.outputs[0]
            replace_uses(node.outputs[0], out)
            model.graph.remove(node, safe=True)
            count += 1
        return PassResult(model, modified=count > 0)


class FoldFlattenedLinearPass(InPlacePass):
    """Rewrites Reshape(x, [-1, K]) ─ MatMul(W_KN) [─ Add] ─ Reshape(·, [..., N]) as MatMul on x.

    GPT-2's Conv1D exports flatten tokens to 2-D around every projection. MatMul
    broadcasts over leading dims, so applying it to x directly is the same arithmetic;
    the fold needs x's last dim to be K (from shape inference) and the second Reshape
    to end in N, restoring the leading dims.
    """

    def call(self, model: ir.Model) -> PassResult:
        count = 0
        for node in list(model.graph):
            if node.op_type != "MatMul" or node.graph is None:
                continue
            weight = const_array(node.inputs[1])
            flatten = node.inputs[0].producer() if node.inputs[0] is not None else None
            if weight is None or weight.ndim != 2 or flatten is None \
                    or flatten.op_type != "Reshape":
                continue
            target = _shape_entries(flatten.inputs[1])
            x = flatten.inputs[0]
            if target is None or len(target) != 2 or target[0] != -1 \
                    or target[1] not in (None, weight.shape[0]) \
                    or not _last_dim_is(x, weight.shape[0]):
                continue
            tail = node.outputs[0]
            add = _only(tail, "Add")
            if add is not None and const_array(other_input(add, tail)) is not None:
                tail = add.outputs[0]
            unflatten = _only(tail, "Reshape")
            if unflatten is None or not _ends_with(unflatten.inputs[1], weight.shape[1]):
                continue
            node.replace_input_with(0, x)
            for value in (node.outputs[0], tail):
                value.shape = None
            replace_uses(unflatten.outputs[0], tail)
            count += 1
        if count:
            RemoveUnusedNodesPass()(model)
        return PassResult(model, modified=count > 0)


def _shape_entries(value: ir.Value | None) -> list[int | None] | None:
    """Reads a shape tensor's entries, None where computed at run time (one per [1] part)."""
    array = const_array(value)
    if array is not None:
        return [int(v) for v in array.reshape(-1)]
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "Concat":
        return None
    entries: list[int | None] = []
    for part in producer.inputs:
        known = const_array(part)
        if known is not None:
            entries.extend(int(v) for v in known.reshape(-1))
        elif part is not None and part.shape is not None and part.shape.dims == (1,):
            entries.append(None)
        else:
            return None
    return entries


def _last_dim_is(value: ir.Value | None, size: int) -> bool:
    shape = value.shape if value is not None else None
    if shape is None or len(shape) < 2:
        return False
    last = shape[len(shape) - 1]
    return isinstance(last, int) and last == size


def _ends_with(value: ir.Value | None, size: int) -> bool:
    array = const_array(value)
    if array is not None:
        return int(array.reshape(-1)[-1]) == size
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "Concat":
        return False
    last = const_array(producer.inputs[-1])
    return last is not None and int(last.reshape(-1)[-1]) == size


class ExpandOrtKernelsPass(InPlacePass):
    """Spells passes.ort_kernels' Sum / BiasGelu / Gelu back in the standard ONNX ops.

    Experts of an MoE block (ffn_to_moe) keep their kernels: the finder skips them.
    """

    def call(self, model: ir.Model) -> PassResult:
        count = 0
        for node in list(model.graph):
            if node.metadata_props.get("planer.pass") == "ffn_to_moe":
                continue
            if node.op_type == "Sum" and node.domain == "" and len(node.inputs) == 2:
                out = _add_node(model.graph, node, list(node.inputs), f"{node.name}/Add",
                                provenance=node.metadata_props)
            elif node.domain == "com.microsoft" and node.op_type in ("BiasGelu", "Gelu"):
                x = node.inputs[0]
                if node.op_type == "BiasGelu":
                    x = _add_node(model.graph, node, list(node.inputs), f"{node.name}/Add",
                                  provenance=node.metadata_props)
                out = _erf_gelu(model.graph, node, x)  # type: ignore[arg-type]
            else:
                continue
            out.shape, out.type = node.outputs[0].shape, node.outputs[0].type
            replace_uses(node.outputs[0], out)
            model.graph.remove(node, safe=True)
            count += 1
        return PassResult(model, modified=count > 0)


def _add_node(graph: ir.Graph, anchor: ir.Node, inputs: list, name: str,
              op_type: str = "Add", provenance: Mapping[str, str] | None = None) -> ir.Value:
    # Re-spelled nodes keep the provenance of the node they expand (ort_kernels), so
    # `planer diff` knows them for planer's spelling rather than the exporter's.
    meta = dict(provenance) if provenance else {"planer.pass": PASS_NAME}
    node = ir.node(op_type, inputs, name=name, metadata_props=meta)
    node.outputs[0].name = f"{name}_out"
    graph.insert_before(anchor, node)
    return node.outputs[0]


def _erf_gelu(graph: ir.Graph, anchor: ir.Node, x: ir.Value) -> ir.Value:
    """Emits x·(1 + erf(x/√2))·0.5, the spelling ORT's own GELU fusion matches."""
    base = anchor.name or "gelu"
    consts = {name: add_initializer(graph, f"{base}/{name}", np.array(value, np.float32))
              for name, value in (("sqrt2", np.sqrt(2.0)), ("one", 1.0), ("half", 0.5))}
    meta = anchor.metadata_props
    scaled = _add_node(graph, anchor, [x, consts["sqrt2"]], f"{base}/Div", "Div", meta)
    erf = _add_node(graph, anchor, [scaled], f"{base}/Erf", "Erf", meta)
    plus = _add_node(graph, anchor, [erf, consts["one"]], f"{base}/Add1", "Add", meta)
    times = _add_node(graph, anchor, [x, plus], f"{base}/Mul", "Mul", meta)
    return _add_node(graph, anchor, [times, consts["half"]], f"{base}/Mul_half", "Mul", meta)


class FuseLayerNormPass(InPlacePass):
    """Rewrites the decomposed LayerNorm chain as one LayerNormalization node (opset >= 17)."""

    def call(self, model: ir.Model) -> PassResult:
        if default_opset(model) < 17:
            return PassResult(model, modified=False)
        count = 0
        for node in list(model.graph):
            if node.op_type != "ReduceMean" or node.graph is None:
                continue
            match = match_decomposed_layernorm(node)
            if match is None:
                continue
            x, gamma, beta, eps, out = match
            name = f"{out.name}/LayerNorm"
            fused = ir.node(
                "LayerNormalization",
                [x, gamma, beta],
                attributes={"axis": -1, "epsilon": eps},
                name=name,
                metadata_props={"planer.pass": PASS_NAME},
            )
            model.graph.insert_before(out.producer(), fused)  # type: ignore[arg-type]
            replace_uses(out, fused.outputs[0])
            count += 1
        if count:
            RemoveUnusedNodesPass()(model)
        return PassResult(model, modified=count > 0)


def match_decomposed_layernorm(
    mean_node: ir.Node,
) -> tuple[ir.Value, ir.Value, ir.Value, float, ir.Value] | None:
    """Matches LayerNorm spelled out from `mean_node` = ReduceMean(x) over the last axis.

    Returns (x, gamma, beta, epsilon, output) or None.
    """
    x = mean_node.inputs[0]
    mean = mean_node.outputs[0]
    sub = next((u for u in mean.consumers() if u.op_type == "Sub" and u.inputs[0] is x), None)
    if sub is None or x is None or not _reduces_last_axis(mean_node):
        return None
    d = sub.outputs[0]
    sq = next((u for u in d.consumers() if _is_square(u, d)), None)
    div = next((u for u in d.consumers() if u.op_type == "Div" and u.inputs[0] is d), None)
    if sq is None or div is None:
        return None
    var_node = _only(sq.outputs[0], "ReduceMean")
    add_eps = _only(var_node.outputs[0], "Add") if var_node else None
    eps = scalar(other_input(add_eps, var_node.outputs[0])) if add_eps and var_node else None
    sqrt = _only(add_eps.outputs[0], "Sqrt") if add_eps else None
    if eps is None or sqrt is None or div.inputs[1] is not sqrt.outputs[0]:
        return None
    mul = _only(div.outputs[0], "Mul")
    gamma = other_input(mul, div.outputs[0]) if mul else None
    add = _only(mul.outputs[0], "Add") if mul else None
    beta = other_input(add, mul.outputs[0]) if add and mul else None
    if add is None or gamma is None or beta is None or const_array(gamma) is None \
            or const_array(beta) is None:
        return None
    return x, gamma, beta, eps, add.outputs[0]


def _reduces_last_axis(node: ir.Node) -> bool:
    axes_attr = node.attributes.get("axes")
    axes = list(axes_attr.value) if axes_attr is not None else None
    if axes is None and len(node.inputs) > 1:
        array = const_array(node.inputs[1])
        axes = None if array is None else array.reshape(-1).tolist()
    return axes == [-1]


def _is_square(node: ir.Node, d: ir.Value) -> bool:
    if node.op_type == "Pow":
        return node.inputs[0] is d and scalar(node.inputs[1]) == 2.0
    return node.op_type == "Mul" and node.inputs[0] is d and node.inputs[1] is d


def _only(value: ir.Value, op_type: str) -> ir.Node | None:
    consumers = list(value.consumers())
    if len(consumers) == 1 and consumers[0].op_type == op_type:
        return consumers[0]
    return None



def canonicalize(model: ir.Model) -> ir.Model:
    """Runs every canonicalization on `model` in place and returns it."""
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    IdentityEliminationPass()(model)
    GemmToMatMulPass()(model)
    ExpandOrtKernelsPass()(model)
    _infer_shapes(model)
    FoldFlattenedLinearPass()(model)
    FuseLayerNormPass()(model)
    RemoveUnusedNodesPass()(model)
    return model


def _infer_shapes(model: ir.Model) -> None:
    """Annotates ranks and static dims where ONNX shape inference can tell them."""
    try:
        ShapeInferencePass()(model)
    except Exception as exc:  # inference is an aid here, never a requirement
        logger.info("shape inference skipped: %s", exc)
