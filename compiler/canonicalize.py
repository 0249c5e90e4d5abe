"""Rewrites the spellings exporters produce into one form the block finder matches.

    Constant nodes          ─▶ initializers (the finder reads weights one way)
    Gemm(x, W, b, transB)   ─▶ MatMul(x, W_KN) ─ Add(b)
    decomposed LayerNorm    ─▶ LayerNormalization (opset >= 17)
    ReduceMean ─ Sub ─ Pow ─ ReduceMean ─ Add(eps) ─ Sqrt ─ Div ─ Mul(γ) ─ Add(β)

GELU (erf or tanh, fused or decomposed) and other activations are left as they are:
the FFN finder treats whatever elementwise region lies between the two FFN MatMuls
as the activation, and channel pruning only slices the weights around it. Shape/
Gather/Concat reshape chains inside attention are not folded here; the attention
rewrite replaces the whole region with constant per-layer shapes.

Every rewrite here is exact (same arithmetic in one op), so the canonical model
reproduces the original outputs; tests pin this down per exporter.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult
from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass

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
            model.graph.insert_before(out.producer(), fused)
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
    if gamma is None or beta is None or const_array(gamma) is None or const_array(beta) is None:
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
    GemmToMatMulPass()(model)
    FuseLayerNormPass()(model)
    RemoveUnusedNodesPass()(model)
    return model
