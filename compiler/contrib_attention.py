"""Expands com.microsoft Attention and MultiHeadAttention into the attention planer reads.

Dimensions: B batch, S sequence (keys too: self-attention), D model width, H heads,
d head size (D = H·d).

Attention (packed weight W_D3D, bias b_3D, Q then K then V columns):
    x_BSD ─ MatMul(W[:, 0:D])  ─ Add(b[0:D])  ─ Reshape[0,0,H,d] ─ Transpose(0,2,1,3) ─┐
    x_BSD ─ MatMul(W[:, D:2D]) ─ Add(b[D:2D]) ─ Reshape[0,0,H,d] ─ Transpose(0,2,3,1) ─ MatMul
    ─ Mul(scale) ─ Add(mask) [─ Add(causal)] [─ Add(attention_bias)] ─ Softmax ─ MatMul(v_BHSd)
    ─ Transpose(0,2,1,3) ─ Reshape[0,0,D] ─ (the O projection, outside the fused node)
MultiHeadAttention takes Q, K and V already projected (bias b_3D inside):
    query ─ Add(b[0:D]) ─ Reshape[0,0,H,d] ─ … the same from there

Splitting the packed weight into three MatMuls only regroups the columns of one
product, so the finder sees three projections, as in an exported BERT. The mask follows
ORT's rule for each mask layout (masked keys get mask_filter_value, default -10000):
    [B, S] or [B, S, S] raw 0/1        ─▶ Where(mask > 0, 0, mask_filter_value)
    [B] real-token counts (right pad)  ─▶ Where(Range(S) < count, 0, mask_filter_value)
and unidirectional adds mask_filter_value above the diagonal (Trilu).

Refused, naming the node: past/present key-value state, rotary embedding, unequal
Q/K/V widths, packed Q/K/V tensors (MultiHeadAttention with a 5-D query), weights that
are computed rather than stored, and mask layouts other than the three above.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from planer.compiler.contrib_emit import Emitter, attr, rank_of, refuse, used
from planer.compiler.irutil import const_array

BEFORE_FUSION = "compile the model as exported, before ORT's transformer optimizer fused it"
NO_CACHE = "planer reads models without a key/value cache: export without past state"


def expand_attention(graph: ir.Graph, node: ir.Node, opset: int) -> None:
    """Spells out com.microsoft.Attention (packed Q/K/V weight) as three projections."""
    _refuse_state(node, past=(4, 6), present=(1,))
    if attr(node, "do_rotary", 0):
        refuse(node, "applies rotary embeddings inside the kernel", BEFORE_FUSION)
    weight = const_array(node.inputs[1])
    if weight is None or weight.ndim != 2:
        refuse(node, "reads computed (not stored) Q/K/V weights",
               "planer slices stored weights; pass the model with float initializers")
    sizes = list(attr(node, "qkv_hidden_sizes", []) or [weight.shape[1] // 3] * 3)
    if len(set(sizes)) != 1 or sum(sizes) != weight.shape[1]:
        refuse(node, f"has Q/K/V widths {sizes}",
               "planer reads attention whose Q, K and V are equally wide")
    bias = const_array(_input(node, 2))
    if _input(node, 2) is not None and bias is None:
        refuse(node, "adds a computed (not stored) Q/K/V bias", BEFORE_FUSION)
    e = Emitter(graph, node)
    e.dtype = weight.dtype
    x = node.inputs[0]
    width = sizes[0]
    projected = []
    for i, name in enumerate(("q", "k", "v")):
        cols = slice(i * width, (i + 1) * width)
        y = e.op("MatMul", [x, e.const(f"{name}/weight", weight[:, cols])], f"{name}/MatMul")
        if bias is not None:
            y = e.op("Add", [y, e.const(f"{name}/bias", bias[cols])], f"{name}/Add")
        projected.append(y)
    _emit_core(e, node, x, projected, width, mask=_input(node, 3),  # type: ignore[arg-type]
               extra=_input(node, 5))


def expand_multihead_attention(graph: ir.Graph, node: ir.Node, opset: int) -> None:
    """Spells out com.microsoft.MultiHeadAttention on separate [B, S, D] Q, K and V."""
    _refuse_state(node, past=(6, 7, 8, 9), present=(1, 2))
    if len(node.outputs) > 3 and used(node.outputs[3]):
        refuse(node, "has its attention-scores output read by another node",
               "planer reads only the attention output")
    query, key, value = node.inputs[0], _input(node, 1), _input(node, 2)
    if key is None or value is None or rank_of(query) not in (3, None):
        refuse(node, "takes Q/K/V packed into one tensor",
               "planer reads Q, K and V as separate [batch, sequence, width] tensors")
    if rank_of(key) not in (3, None) or rank_of(value) not in (3, None):
        refuse(node, "takes K/V already split into heads ([batch, heads, sequence, size])",
               "planer reads Q, K and V as separate [batch, sequence, width] tensors")
    bias = const_array(_input(node, 3))
    if _input(node, 3) is not None and bias is None:
        refuse(node, "adds a computed (not stored) Q/K/V bias", BEFORE_FUSION)
    e = Emitter(graph, node)
    if bias is not None:
        e.dtype = bias.dtype
    width = _width(node, (query, key, value), bias)
    projected = []
    for i, (name, item) in enumerate((("q", query), ("k", key), ("v", value))):
        if bias is not None:
            item = e.op("Add", [item, e.const(f"{name}/bias", bias[i * width:(i + 1) * width])],
                        f"{name}/Add")
        projected.append(item)
    _emit_core(e, node, query, projected, width, mask=_input(node, 4),  # type: ignore[arg-type]
               extra=_input(node, 5))


def _emit_core(e: Emitter, node: ir.Node, x: ir.Value, qkv: list[ir.Value], width: int, *,
               mask: ir.Value | None, extra: ir.Value | None) -> None:
    """Emits heads split, scores, mask terms, Softmax and the merged context."""
    heads = int(attr(node, "num_heads", 0))
    if heads <= 0 or width % heads:
        refuse(node, f"has num_heads {heads}, which does not divide its width {width}",
               BEFORE_FUSION)
    d = width // heads
    scale = float(attr(node, "scale", 0.0)) or 1.0 / math.sqrt(d)
    split = e.const("shape_BSHd", [0, 0, heads, d], np.int64)
    parts = []
    for value, name, perm in zip(qkv, "qkv", ([0, 2, 1, 3], [0, 2, 3, 1], [0, 2, 1, 3]),
                                 strict=True):
        reshaped = e.op("Reshape", [value, split], f"{name}/Reshape")
        parts.append(e.op("Transpose", [reshaped], f"{name}/Transpose", {"perm": perm}))
    scores = e.op("MatMul", [parts[0], parts[1]], "scores/MatMul")
    scores = e.op("Mul", [scores, e.const("scale", scale)], "scores/Mul")
    fill = float(attr(node, "mask_filter_value", -10000.0))
    if mask is not None:
        scores = e.op("Add", [scores, _mask_bias(e, node, x, mask, fill)], "scores/mask/Add")
    if attr(node, "unidirectional", 0):
        scores = e.op("Add", [scores, _causal_bias(e, x, fill)], "scores/causal/Add")
    if extra is not None:
        scores = e.op("Add", [scores, extra], "scores/attention_bias/Add")
    probs = e.op("Softmax", [scores], "Softmax", {"axis": -1})
    context = e.op("MatMul", [probs, parts[2]], "context/MatMul")
    context = e.op("Transpose", [context], "context/Transpose", {"perm": [0, 2, 1, 3]})
    merge = e.const("shape_BSD", [0, 0, width], np.int64)
    e.replace(0, e.op("Reshape", [context, merge], "context/Reshape"))
    e.finish()


def _mask_bias(e: Emitter, node: ir.Node, x: ir.Value, mask: ir.Value, fill: float) -> ir.Value:
    """Returns the additive [B, 1, 1|S, S] mask term ORT derives from `mask`."""
    rank = rank_of(mask)
    zero, filled = e.const("mask/zero", 0.0), e.const("mask/fill", fill)
    if rank in (2, 3):
        real = e.op("Cast", [mask], "mask/Cast", {"to": ir.DataType.FLOAT})
        keep = e.op("Greater", [real, e.const("mask/threshold", np.array(0.0, np.float32),
                                             np.float32)], "mask/Greater")
        axes = [1, 2] if rank == 2 else [1]
    elif rank == 1:
        positions = e.op("Range", [e.const("mask/start", np.array(0, np.int64)),
                                   _length(e, x), e.const("mask/step", np.array(1, np.int64))],
                         "mask/Range")
        count = e.op("Cast", [mask], "mask/Cast", {"to": ir.DataType.INT64})
        count = e.op("Unsqueeze", [count, e.const("mask/count_axes", [1], np.int64)],
                     "mask/count/Unsqueeze")
        keep = e.op("Less", [positions, count], "mask/Less")
        axes = [1, 2]
    else:
        refuse(node, f"takes a mask of rank {rank}",
               "planer reads [batch, sequence] masks, [batch, query, key] masks or per-row "
               "token counts")
    bias = e.op("Where", [keep, zero, filled], "mask/Where")
    return e.op("Unsqueeze", [bias, e.const("mask/axes", axes, np.int64)], "mask/Unsqueeze")


def _causal_bias(e: Emitter, x: ir.Value, fill: float) -> ir.Value:
    """Returns mask_filter_value above the diagonal of an [S, S] matrix, 0 elsewhere."""
    length = e.op("Shape", [x], "causal/Shape", {"start": 1, "end": 2})
    square = e.op("Concat", [length, length], "causal/Concat", {"axis": 0})
    ones = e.op("ConstantOfShape", [square], "causal/ones",
                {"value": ir.tensor(np.array([1.0], dtype=e.dtype))})
    upper = e.op("Trilu", [ones, e.const("causal/k", np.array(1, np.int64))], "causal/Trilu",
                 {"upper": 1})
    return e.op("Mul", [upper, e.const("causal/fill", fill)], "causal/Mul")


def _length(e: Emitter, x: ir.Value) -> ir.Value:
    length = e.op("Shape", [x], "mask/Shape", {"start": 1, "end": 2})
    return e.op("Squeeze", [length, e.const("mask/length_axes", [0], np.int64)], "mask/Squeeze")


def _width(node: ir.Node, values: tuple[ir.Value | None, ...], bias: np.ndarray | None) -> int:
    """Returns the common Q/K/V width, from the bias or the values' last dimension."""
    if bias is not None and bias.size % 3 == 0:
        return bias.size // 3
    dims = set()
    for value in values:
        shape = value.shape if value is not None else None
        last = shape[len(shape) - 1] if shape is not None and len(shape) else None
        dims.add(last if isinstance(last, int) else None)
    if len(dims) != 1 or None in dims:
        refuse(node, "has Q/K/V of unknown or unequal widths",
               "planer reads attention whose Q, K and V are equally wide")
    return int(dims.pop())  # type: ignore[arg-type]


def _refuse_state(node: ir.Node, *, past: tuple[int, ...], present: tuple[int, ...]) -> None:
    if any(_input(node, i) is not None for i in past):
        refuse(node, "reads past key/value state", NO_CACHE)
    if any(used(node.outputs[i]) for i in present if i < len(node.outputs)):
        refuse(node, "writes present key/value state", NO_CACHE)


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None
