"""Rewrites the spellings exporters produce into one form the block finder matches.

    Constant nodes          ─▶ initializers (the finder reads weights one way)
    Identity(w)             ─▶ w
    Gemm(x, W, b, transB)   ─▶ MatMul(x, W_KN) ─ Add(b)
    Sum(a, b)               ─▶ Add(a, b)         (planer's own ort_kernels spellings,
    BiasGelu(h, b)          ─▶ Add(h, b) ─ erf-GELU    so a compiled model reads back)
    com.microsoft Gelu(x)   ─▶ x·(1 + erf(x/√2))·0.5
    Reshape(x,[-1,K]) ─ MatMul ─ Reshape(·,[..,N])  ─▶ MatMul(x, W_KN)   (GPT-2 Conv1D)
    decomposed LayerNorm    ─▶ LayerNormalization (opset >= 17)
    ReduceMean ─ Sub ─ Pow ─ ReduceMean ─ Add(eps) ─ Sqrt ─ Div ─ Mul(γ) ─ Add(β)

The Gemm, kernel and LayerNorm rewrites are onnxscript rewrite rules (declared
patterns, operand orders commuted by the rewriter) run through
`compiler.rewrite_rules`, which gives their nodes planer's names and provenance; the
Conv1D fold stays a loop (see FoldFlattenedLinearPass).

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
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult
from onnx_ir.passes.common import (
    IdentityEliminationPass,
    LiftConstantsToInitializersPass,
    RemoveUnusedNodesPass,
    ShapeInferencePass,
)
from onnxscript.rewriter import pattern as rw

from planer.compiler.irutil import const_array, other_input, replace_uses, scalar
from planer.compiler.loading import default_opset
from planer.compiler.names import PROVENANCE_PASS, PassName
from planer.compiler.rewrite_rules import Builder, PlanerRule, apply_rules, scalar_near

logger = logging.getLogger(__name__)


def canonicalize(model: ir.Model) -> ir.Model:
    """Runs every canonicalization on `model` in place and returns it."""
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    IdentityEliminationPass()(model)
    apply_rules(model, [GemmToMatMul()])
    apply_rules(model, [ExpandSum(), ExpandBiasGelu(), ExpandGelu()])
    _infer_shapes(model)
    FoldFlattenedLinearPass()(model)
    if default_opset(model) >= 17:  # LayerNormalization's first opset
        apply_rules(model, [FuseLayerNorm(axes_as_attribute=False),
                            FuseLayerNorm(axes_as_attribute=True)])
    RemoveUnusedNodesPass()(model)
    return model


def _infer_shapes(model: ir.Model) -> None:
    """Annotates ranks and static dims where ONNX shape inference can tell them."""
    try:
        ShapeInferencePass()(model)
    except Exception as exc:  # inference is an aid here, never a requirement
        logger.info("shape inference skipped: %s", exc)


# ------------------------------------------------------------ rewrite rules


class GemmToMatMul(PlanerRule):
    """Gemm(x, W, C) with a constant W ─▶ MatMul(x, α·W_KN) [─ Add(β·C)].

    onnxscript's gemm_to_matmul_add only takes Reshape ─ Gemm ─ Reshape with α = β = 1
    and reuses W as it is (wrong under transB), so planer declares its own.
    """

    requires = frozenset({"Gemm"})

    def __init__(self) -> None:
        super().__init__()
        self._count = 0

    def pattern(self, op: Any, x: Any, w: Any) -> Any:
        # C is optional: the node may have a third input, read from the node itself.
        return op.Gemm(x, w, _allow_other_inputs=True)

    def check(self, context: Any, w: ir.Value, **_: Any) -> bool:
        attrs, bias = _attrs(self.root), _gemm_bias(self.root)
        if const_array(w) is None or attrs.get("transA", 0):
            return False
        return bias is None or attrs.get("beta", 1.0) == 1.0 or const_array(bias) is not None

    def rewrite(self, op: Any, x: ir.Value, w: ir.Value, **_: Any) -> ir.Value:
        gemm, attrs = self.root, _attrs(self.root)
        weight = const_array(w)
        assert weight is not None
        alpha = np.float32(attrs.get("alpha", 1.0))
        w_kn = (weight.T if attrs.get("transB", 0) else weight) * alpha
        b = self.builder(op, gemm.name or f"gemm{self._count}",
                         {PROVENANCE_PASS: PassName.CANONICALIZE})
        self._count += 1
        out = b.op("MatMul", [x, b.const("w_KN", w_kn.astype(weight.dtype))], "MatMul")
        bias, beta = _gemm_bias(gemm), float(attrs.get("beta", 1.0))
        if bias is None:
            return out
        bias_array = const_array(bias)
        if beta != 1.0 and bias_array is not None:  # check() made sure it is constant
            bias = b.const("bias", bias_array * np.float32(beta))
        return b.op("Add", [out, bias], "Add")


def _attrs(node: ir.Node) -> dict[str, Any]:
    return {k: a.value for k, a in node.attributes.items()}


def _gemm_bias(gemm: ir.Node) -> ir.Value | None:
    return gemm.inputs[2] if len(gemm.inputs) > 2 else None


class _ExpandKernel(PlanerRule):
    """Base of the rules that spell passes.ort_kernels' nodes back in standard ONNX.

    The new nodes keep the provenance of the node they expand (ort_kernels), so `planer
    diff` knows them for planer's spelling rather than the exporter's. Experts of an MoE
    block (ffn_to_moe) keep their kernels: the finder skips them.
    """

    commute = False

    def check(self, context: Any, **_: Any) -> bool:
        return self.root.metadata_props.get(PROVENANCE_PASS) != PassName.FFN_TO_MOE

    def _builder(self, op: Any) -> Builder:
        return self.builder(op, self.root.name or "gelu", self.root.metadata_props)


class ExpandSum(_ExpandKernel):
    """Sum(a, b) ─▶ Add(a, b)."""

    requires = frozenset({"Sum"})

    def pattern(self, op: Any, a: Any, b: Any) -> Any:
        return op.Sum(a, b)

    def rewrite(self, op: Any, a: ir.Value, b: ir.Value, **_: Any) -> ir.Value:
        return self._builder(op).op("Add", [a, b], "Add")


class ExpandBiasGelu(_ExpandKernel):
    """com.microsoft BiasGelu(h, b) ─▶ Add(h, b) ─ x·(1 + erf(x/√2))·0.5."""

    requires = frozenset({"BiasGelu"})

    def pattern(self, op: Any, h: Any, b: Any) -> Any:
        return op.BiasGelu(h, b, _domain="com.microsoft")

    def rewrite(self, op: Any, h: ir.Value, b: ir.Value, **_: Any) -> ir.Value:
        builder = self._builder(op)
        return _erf_gelu(builder, builder.op("Add", [h, b], "Add"))


class ExpandGelu(_ExpandKernel):
    """com.microsoft Gelu(x) ─▶ x·(1 + erf(x/√2))·0.5."""

    requires = frozenset({"Gelu"})

    def pattern(self, op: Any, x: Any) -> Any:
        return op.Gelu(x, _domain="com.microsoft")

    def rewrite(self, op: Any, x: ir.Value, **_: Any) -> ir.Value:
        return _erf_gelu(self._builder(op), x)


def _erf_gelu(b: Builder, x: ir.Value) -> ir.Value:
    """Emits x·(1 + erf(x/√2))·0.5, the spelling ORT's own GELU fusion matches."""
    consts = {name: b.const(name, np.array(value, np.float32))
              for name, value in (("sqrt2", np.sqrt(2.0)), ("one", 1.0), ("half", 0.5))}
    erf = b.op("Erf", [b.op("Div", [x, consts["sqrt2"]], "Div")], "Erf")
    plus = b.op("Add", [erf, consts["one"]], "Add1")
    return b.op("Mul", [b.op("Mul", [x, plus], "Mul"), consts["half"]], "Mul_half")


class FuseLayerNorm(PlanerRule):
    """Decomposed LayerNorm over the last axis ─▶ LayerNormalization (opset >= 17).

    onnxscript's own LayerNormFusion reads ReduceMean's axes as an input only (opset
    18+); exporters at opset 14-17 write them as an attribute, so the rule is
    declared once per spelling (only opset 17 of those has LayerNormalization to fuse
    into). It also wants keepdims written out and adds stash_type; this one takes
    keepdims' default and writes the node as before, with β folded in.
    """

    requires = frozenset({"ReduceMean", "Sqrt"})

    def __init__(self, axes_as_attribute: bool):
        super().__init__()
        self.axes_as_attribute = axes_as_attribute

    def pattern(self, op: Any, x: Any, gamma: Any, beta: Any, epsilon: Any) -> Any:
        deviation = op.Sub(x, self._mean(op, x))
        square = rw.OrValue([op.Pow(deviation, scalar_near(2.0, rtol=0.0)),
                             op.Mul(deviation, deviation)])
        std = op.Sqrt(op.Add(self._mean(op, square), epsilon))
        normed = rw.OrValue([op.Div(deviation, std), op.Mul(deviation, op.Reciprocal(std))])
        return op.Add(op.Mul(normed, gamma), beta)

    def _mean(self, op: Any, value: Any) -> Any:
        if self.axes_as_attribute:
            return op.ReduceMean(value, axes=[-1], _check=_keeps_dims)
        return op.ReduceMean(value, [-1], _check=_keeps_dims)

    def check(self, context: Any, gamma: ir.Value, beta: ir.Value, epsilon: ir.Value,
              **_: Any) -> bool:
        return scalar(epsilon) is not None and const_array(gamma) is not None \
            and const_array(beta) is not None

    def rewrite(self, op: Any, x: ir.Value, gamma: ir.Value, beta: ir.Value,
                epsilon: ir.Value, **_: Any) -> ir.Value:
        b = self.builder(op, self.root.outputs[0].name or "norm",
                         {PROVENANCE_PASS: PassName.CANONICALIZE})
        return b.op("LayerNormalization", [x, gamma, beta], "LayerNorm",
                    {"axis": -1, "epsilon": scalar(epsilon)})


def _keeps_dims(_context: Any, node: ir.Node) -> bool:
    return node.attributes.get_int("keepdims", 1) == 1


# ------------------------------------------------------------ GPT-2 Conv1D fold


class FoldFlattenedLinearPass(InPlacePass):
    """Rewrites Reshape(x, [-1, K]) ─ MatMul(W_KN) [─ Add] ─ Reshape(·, [..., N]) as MatMul on x.

    GPT-2's Conv1D exports flatten tokens to 2-D around every projection. MatMul
    broadcasts over leading dims, so applying it to x directly is the same arithmetic;
    the fold needs x's last dim to be K (from shape inference) and the second Reshape
    to end in N, restoring the leading dims.

    Not a rewrite rule: it rewires the existing MatMul in place, so the node keeps its
    name, its exporter metadata and its output name, and the flattening Reshape stays
    for whatever else reads it. A rule would rebuild MatMul and Add (two patterns, with
    and without the Add) and match only where nothing else reads the flattened tensor.
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


def _only(value: ir.Value, op_type: str) -> ir.Node | None:
    consumers = list(value.consumers())
    if len(consumers) == 1 and consumers[0].op_type == op_type:
        return consumers[0]
    return None
