"""Expands ONNX Runtime's fused contrib operators into the standard ONNX the finder reads.

ORT's transformer optimizer (and optimum, onnx-community exports) fuses a BERT layer
into a few com.microsoft kernels. planer reads, plans and rewrites the unfused form, so
it spells them back out before canonicalization:

    SkipLayerNormalization(h, r, γ, β, b) ─▶ Add(h, b) ─ Add(·, r) ─ LayerNormalization(γ, β)
        output 3 (the sum) becomes the second Add: pre-LN models carry it as the residual
    SkipSimplifiedLayerNormalization      ─▶ Add(h, b) ─ Add(·, r) ─ x/√(mean(x²)+ε)·γ
    SimplifiedLayerNormalization(x, γ)    ─▶ x/√(mean(x²)+ε)·γ
    EmbedLayerNormalization               ─▶ Gather(word) + Gather(position) [+ Gather(segment)]
                                             ─ LayerNormalization; mask_index = ReduceSum(mask)
    FastGelu(x, b)                        ─▶ Add(x, b) ─ 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
    QuickGelu(x)                          ─▶ x·Sigmoid(α·x)
    FusedMatMul(A, B)                     ─▶ [Transpose] ─ MatMul ─ [Mul(α)]
    Attention, MultiHeadAttention         ─▶ compiler.contrib_attention (three projections,
                                             Reshape/Transpose, scores, mask, Softmax, ·V)
    BiasGelu, Gelu                        ─▶ canonicalize's ExpandBiasGelu/ExpandGelu rules (they
                                             already spell planer's own ort_kernels output back)
    LayerNormalization below opset 17     ─▶ ReduceMean/Sub/…/Add (ORT writes it in the
                                             default domain, where the checker rejects it)
    Reshape(ctx_BSHd, [-1, K]) ─ MatMul   ─▶ Reshape[0,0,K] ─ Reshape[-1,K] ─ MatMul (ORT
                                             merged GPT-2's two reshapes; canonicalize's
                                             flatten fold needs the [B, S, K] one back)

Why unfuse instead of rewriting the fused kernels natively (slicing the packed QKV
weight, a new num_heads): every pass, the finder, the activation capture and the diff
already read the unfused form; ORT fuses it again when it loads the emitted model
(SkipLayerNormalization, BiasGelu) where passes.ort_kernels lets it; and the fused
kernels bought nothing on this CPU. all-MiniLM-L6-v2, planer's neutral compile of each
fused form vs that form as given (`python benchmarks/bench_contrib.py --rounds 200`,
2026-12-02, 2-core Intel Xeon shared with other jobs (load ~11, so absolute ms are
inflated; interleaved ratios hold), ORT 1.32 CPU, batch 1, 128 tokens, 1 thread):

    fused form as given                          planer neutral   plain export
    ORT optimizer output (SkipLayerNorm, BiasGelu)    0.916          0.920
    packed-QKV Attention kernels                      0.987          1.009
    MultiHeadAttention kernels                        0.999          1.040

So re-fusing Attention at emission would gain nothing measurable here, and keeping
ORT's SkipLayerNormalization would lose 8%; benchmarks/results/contrib-minilm.json.

Every expansion is the kernel's formula in standard ops, exact up to float rounding
(tests compare against ORT running the fused graph, to 1e-4). Fused ops with parts
planer cannot rewrite (past key/value state, rotary embedding, packed layouts, unequal
Q/K/V widths) are refused here with a sentence naming the node, before anything is
calibrated or fitted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from planer.compiler.contrib_attention import expand_attention, expand_multihead_attention
from planer.compiler.contrib_emit import (
    MS,
    Emitter,
    attr,
    layer_norm,
    rank_of,
    refuse,
    rms_norm,
    used,
)
from planer.compiler.irutil import const_array
from planer.compiler.loading import default_opset
from planer.compiler.names import PROVENANCE_PASS, PassName

logger = logging.getLogger(__name__)

BEFORE_FUSION = "compile the model as exported, before ORT's transformer optimizer fused it"

# Fused kernels with no standard spelling planer can rewrite per head or per channel.
UNEXPANDABLE = {
    "GroupQueryAttention": "shares each K/V head between several query heads",
    "PackedAttention": "runs on tokens with the padding removed",
    "PackedMultiHeadAttention": "runs on tokens with the padding removed",
    "DecoderAttention": "carries decoder key/value state",
    "DecoderMaskedSelfAttention": "carries decoder key/value state",
    "DecoderMaskedMultiHeadAttention": "carries decoder key/value state",
    "SparseAttention": "computes block-sparse attention",
    "LongformerAttention": "computes sliding-window attention",
    "QOrderedAttention": "is quantized attention",
    "RotaryEmbedding": "applies rotary position embeddings",
    "GemmaRotaryEmbedding": "applies rotary position embeddings",
    "RelativePositionBias": "adds a per-head relative-position bias",
    "GatedRelativePositionBias": "adds a per-head relative-position bias",
    "RemovePadding": "removes padding tokens inside the graph",
    "MoE": "is a mixture-of-experts layer",
    "QMoE": "is a quantized mixture-of-experts layer",
    "PagedAttention": "reads a paged key/value cache",
}

Expansion = Callable[[ir.Graph, ir.Node, int], None]


def expand_contrib_ops(model: ir.Model) -> int:
    """Rewrites every fused ORT contrib op in `model` as standard ONNX; returns how many.

    Raises:
        UnsupportedModelError: a fused op holds something planer cannot rewrite; the
            sentence names its op type and node.
    """
    opset = default_opset(model)
    graph = model.graph
    # planer's own MoE nodes (com.microsoft.MoE among them) are left for the finder, which
    # says the model was already split into experts by planer.
    foreign = [n for n in graph
               if n.metadata_props.get(PROVENANCE_PASS) != PassName.FFN_TO_MOE]
    for node in foreign:
        _refuse_unexpandable(node, opset)
    count = 0
    for node in foreign:
        expand = _expansion(node, opset)
        if expand is None:
            continue
        expand(graph, node, opset)
        count += 1
    count += _split_merged_flattens(graph)
    if count:
        logger.info("expanded %d fused ORT operators", count)
    return count


def _split_merged_flattens(graph: ir.Graph) -> int:
    """Restores [B, S, K] before a flattened projection whose input ORT's optimizer merged.

    GPT-2's Conv1D flattens tokens around each projection. ORT merges the attention's
    Reshape(ctx_BSHd, [B, S, K]) into the flatten, leaving Reshape(ctx_BSHd, [-1, K]),
    which canonicalize's flatten fold cannot undo (its input is not [.., K]). Putting
    the [0, 0, K] Reshape back in front changes nothing numerically and lets it fold.
    """
    count = 0
    for node in list(graph):
        target = const_array(node.inputs[1]) if node.op_type == "Reshape" else None
        if target is None or target.shape != (2,) or int(target[0]) != -1:
            continue
        x, width = node.inputs[0], int(target[1])
        dims = list(x.shape) if x is not None and x.shape is not None else []
        if len(dims) != 4 or not all(isinstance(d, int) for d in dims[2:]) \
                or dims[2] * dims[3] != width or not _feeds_projection(node.outputs[0], width):
            continue
        e = Emitter(graph, node)
        merged = e.op("Reshape", [x, e.const("shape_BSK", [0, 0, width], np.int64)],
                      "unmerge/Reshape")
        merged.shape = ir.Shape([dims[0], dims[1], width])
        merged.type = x.type  # type: ignore[union-attr]
        node.replace_input_with(0, merged)
        count += 1
    return count


def _feeds_projection(value: ir.Value, width: int) -> bool:
    readers = list(value.consumers())
    if len(readers) != 1 or readers[0].op_type not in ("MatMul", "Gemm"):
        return False
    weight = const_array(readers[0].inputs[1])
    if weight is None or weight.ndim != 2:
        return False
    transposed = readers[0].op_type == "Gemm" and attr(readers[0], "transB", 0)
    return int(weight.shape[1 if transposed else 0]) == width


def _refuse_unexpandable(node: ir.Node, opset: int) -> None:
    if node.domain == MS and node.op_type in UNEXPANDABLE:
        refuse(node, UNEXPANDABLE[node.op_type], BEFORE_FUSION)
    if node.domain in ("", "ai.onnx") and node.op_type in ("Attention", "RotaryEmbedding") \
            and opset >= 23:
        refuse(node, "is the fused opset-23 attention, which planer does not expand yet",
               "export the model at opset 18 to 22, where attention is spelled out")


def _expansion(node: ir.Node, opset: int) -> Expansion | None:
    if node.domain == MS:
        return _MS_EXPANSIONS.get(node.op_type)
    if node.domain in ("", "ai.onnx"):
        if node.op_type == "SimplifiedLayerNormalization":
            return _expand_simplified_layernorm
        if node.op_type == "LayerNormalization" and opset < 17:
            return _expand_old_layernorm
    return None


# ---------------------------------------------------------------- layer norms


def _emitter(graph: ir.Graph, node: ir.Node) -> Emitter:
    e = Emitter(graph, node)
    for value in node.inputs:
        array = const_array(value)
        if array is not None and array.dtype.kind == "f":
            e.dtype = array.dtype
            break
    return e


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def _output(node: ir.Node, index: int) -> ir.Value | None:
    return node.outputs[index] if index < len(node.outputs) else None


def _skip_sum(e: Emitter, node: ir.Node, bias_index: int) -> ir.Value:
    """Emits input (+ bias) + skip, the bias Add first.

    The projection before it then reads as MatMul + bias again, then the residual Add.
    """
    x, skip = node.inputs[0], node.inputs[1]
    bias = _input(node, bias_index)
    if bias is not None:
        x = e.op("Add", [x, bias], "bias/Add")
    return e.op("Add", [x, skip], "residual/Add")


def _refuse_statistics(node: ir.Node) -> None:
    if used(_output(node, 1)) or used(_output(node, 2)):
        refuse(node, "has its mean or inverse-deviation output read by another node",
               "planer reads only the normalized output and the sum")


def _require_last_axis(node: ir.Node) -> None:
    axis = int(attr(node, "axis", -1))
    rank = rank_of(node.inputs[0])
    if axis != -1 and (rank is None or axis != rank - 1):
        refuse(node, f"normalizes over axis {axis}, not the last", BEFORE_FUSION)


def _expand_skip_layernorm(graph: ir.Graph, node: ir.Node, opset: int) -> None:
    _refuse_statistics(node)
    e = _emitter(graph, node)
    total = _skip_sum(e, node, 4)
    eps = float(attr(node, "epsilon", 1e-12))
    e.replace(0, layer_norm(e, total, node.inputs[2], _input(node, 3), eps, opset))
    if (out := _output(node, 3)) is not None and used(out):
        e.replace(3, total)
    e.finish()


def _expand_skip_simplified_layernorm(graph: ir.Graph, node: ir.Node, opset: int) -> None:
    _refuse_statistics(node)
    e = _emitter(graph, node)
    total = _skip_sum(e, node, 3)
    eps = float(attr(node, "epsilon", 1e-12))
    e.replace(0, rms_norm(e, total, node.inputs[2], eps, opset))
    if (out := _output(node, 3)) is not None and used(out):
        e.replace(3, total)
    e.finish()


def _expand_simplified_layernorm(graph: ir.Graph, node: ir.Node, opset: int) -> None:
    _refuse_statistics(node)
    _require_last_axis(node)
    e = _emitter(graph, node)
    eps = float(attr(node, "epsilon", 1e-5))
    e.replace(0, rms_norm(e, node.inputs[0], _input(node, 1), eps, opset))  # type: ignore[arg-type]
    e.finish()


def _expand_old_layernorm(graph: ir.Graph, node: ir.Node, opset: int) -> None:
    _refuse_statistics(node)
    _require_last_axis(node)
    e = _emitter(graph, node)
    eps = float(attr(node, "epsilon", 1e-5))
    y = layer_norm(e, node.inputs[0], _input(node, 1), _input(node, 2), eps,  # type: ignore[arg-type]
                   opset)
    e.replace(0, y)
    e.finish()


def _expand_embed_layernorm(graph: ir.Graph, node: ir.Node, opset: int) -> None:
    """Gathers word, position (0..S-1 unless given) and segment rows, sums, normalizes."""
    ids, segments = node.inputs[0], _input(node, 1)
    word, position, segment = node.inputs[2], node.inputs[3], _input(node, 4)
    mask, position_ids = _input(node, 7), _input(node, 8)
    e = _emitter(graph, node)
    total = e.op("Gather", [word, ids], "word/Gather", {"axis": 0})
    if position_ids is None:
        # The first S rows of the table. Gather(table, Range(0, S)) is the same, but ORT
        # 1.32's Gather-to-Slice fusion turns it into a Slice that fails at run time.
        length = e.op("Shape", [ids], "position/Shape", {"start": 1, "end": 2})
        zero = e.const("position/zero", [0], np.int64)
        rows = e.op("Slice", [position, zero, length, zero], "position/Slice")
    else:
        rows = e.op("Gather", [position, position_ids], "position/Gather", {"axis": 0})
    total = e.op("Add", [total, rows], "position/Add")
    if segment is not None and segments is not None:
        rows = e.op("Gather", [segment, segments], "segment/Gather", {"axis": 0})
        total = e.op("Add", [total, rows], "segment/Add")
    eps = float(attr(node, "epsilon", 1e-12))
    e.replace(0, layer_norm(e, total, node.inputs[5], node.inputs[6], eps, opset))
    if used(_output(node, 1)):
        if mask is None:
            refuse(node, "has its mask_index output read but no mask input",
                   "give the model an attention_mask input")
        # ORT's mask_index is the count of real tokens per row (right padding).
        count = e.op("ReduceSum", [mask, e.const("mask/axes", [1], np.int64)],
                     "mask/ReduceSum", {"keepdims": 0})
        count.shape, count.type = ir.Shape([None]), ir.TensorType(ir.DataType.INT32)
        e.replace(1, e.op("Cast", [count], "mask/Cast", {"to": ir.DataType.INT32}))
    if used(_output(node, 2)):
        e.replace(2, total)
    e.finish()


# ---------------------------------------------------------------- activations, MatMul


def _expand_fast_gelu(graph: ir.Graph, node: ir.Node, opset: int) -> None:
    """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), the tanh-GELU the finder classifies."""
    e = _emitter(graph, node)
    x = node.inputs[0]
    if (bias := _input(node, 1)) is not None:
        x = e.op("Add", [x, bias], "bias/Add")
    cube = e.op("Mul", [e.op("Mul", [x, x], "square"), x], "cube")
    inner = e.op("Add", [x, e.op("Mul", [cube, e.const("c", 0.044715)], "Mul_c")], "Add_x")
    inner = e.op("Mul", [inner, e.const("k", math.sqrt(2.0 / math.pi))], "Mul_k")
    plus = e.op("Add", [e.op("Tanh", [inner], "Tanh"), e.const("one", 1.0)], "Add_one")
    half = e.op("Mul", [x, e.const("half", 0.5)], "Mul_half")
    e.replace(0, e.op("Mul", [half, plus], "Mul"))
    e.finish()


def _expand_quick_gelu(graph: ir.Graph, node: ir.Node, opset: int) -> None:
    e = _emitter(graph, node)
    x = node.inputs[0]
    scaled = e.op("Mul", [x, e.const("alpha", float(attr(node, "alpha", 1.702)))], "Mul_alpha")
    e.replace(0, e.op("Mul", [x, e.op("Sigmoid", [scaled], "Sigmoid")], "Mul"))
    e.finish()


def _expand_fused_matmul(graph: ir.Graph, node: ir.Node, opset: int) -> None:
    """Spells α·op(A)·op(B), op transposing the last two axes where transA/transB say."""
    if attr(node, "transBatchA", 0) or attr(node, "transBatchB", 0):
        refuse(node, "transposes batch axes into the product", BEFORE_FUSION)
    e = _emitter(graph, node)
    operands = []
    for index, flag in ((0, "transA"), (1, "transB")):
        value = node.inputs[index]
        if attr(node, flag, 0):
            rank = rank_of(value)
            if rank is None or rank < 2:
                refuse(node, f"transposes an operand ({flag}) of unknown rank", BEFORE_FUSION)
            perm = [*range(rank - 2), rank - 1, rank - 2]
            value = e.op("Transpose", [value], f"{flag}/Transpose", {"perm": perm})
        operands.append(value)
    y = e.op("MatMul", operands, "MatMul")
    alpha = float(attr(node, "alpha", 1.0))
    if alpha != 1.0:
        y = e.op("Mul", [y, e.const("alpha", alpha)], "Mul_alpha")
    e.replace(0, y)
    e.finish()


_MS_EXPANSIONS: dict[str, Expansion] = {
    "SkipLayerNormalization": _expand_skip_layernorm,
    "SkipSimplifiedLayerNormalization": _expand_skip_simplified_layernorm,
    "SimplifiedLayerNormalization": _expand_simplified_layernorm,
    "EmbedLayerNormalization": _expand_embed_layernorm,
    "FastGelu": _expand_fast_gelu,
    "QuickGelu": _expand_quick_gelu,
    "FusedMatMul": _expand_fused_matmul,
    "Attention": expand_attention,
    "MultiHeadAttention": expand_multihead_attention,
}
