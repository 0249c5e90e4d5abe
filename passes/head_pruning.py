"""Rewrites every self-attention block with its kept heads and constant per-layer shapes.

Dimensions: B batch, S sequence, D model width, H heads kept, d head size.

Before:  x_BSD ─ Q/K/V projections ─ exporter plumbing (Shape/Concat reshapes, -1 dims,
         split scales) ─ scores ─ mask ─ Softmax ─ ·V ─ plumbing ─ O projection ─ out_BSD
After:   x_BSD ─ MatMul(wq_DI) ─ Add ─ Reshape[0,0,H,d] ─ Transpose ──┐
         x_BSD ─ MatMul(wk_DI) ─ Add ─ Reshape[0,0,H,d] ─ Transpose ─ MatMul ─ Mul(scale)
         ─ original mask steps ─ Softmax ─ MatMul(v_BHSd) ─ [NaN guard] ─ Transpose ─ Reshape[0,0,I]
         ─ MatMul(wo_ID) ─ Add ─ out_BSD                       (I = H·d)

Keeping head h keeps Q/K/V columns and O rows h·d..(h+1)·d; the per-head attention is
independent, so with all heads kept the rewrite reproduces the original block. A score
term with its own value per head ([.., H, S, S] on axis -3: MPNet's relative-position
bias, compiler.support.per_head_operands) is gathered to the kept heads before its step.
Rotary position embeddings on Q/K/V are replayed on the kept heads [B, H, S, d] before the
scores (compiler.rotary: each head rotates its own pairs, so whole heads keep them). Reshape
shapes are constants with the layer's own head count (never -1): ORT's transformer
optimizer reads the head count from them, and a -1 makes it fall back to one global
count, silently wrong for pruned layers. A layer kept at 0 heads contributes only the
O bias, so its readers (residual Adds) take that bias directly.

Requires: projections are initializers; the block's output is read by Adds when a layer
drops to 0 heads.  Preserves: graph inputs/outputs, the mask computation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from planer.compiler.errors import PreconditionError
from planer.compiler.irutil import (
    NodeBuilder,
    bypass_with_constant,
    remove_dead_producers,
    replace_uses,
)
from planer.compiler.names import PassName
from planer.compiler.rotary import emit_rotary
from planer.compiler.spec import AttentionSpec, ModelSpec
from planer.compiler.support import per_head_operands

PASS_NAME = PassName.HEAD_PRUNING


@dataclasses.dataclass(frozen=True)
class HeadPruningConfig:
    """Which heads each layer keeps, and optionally refitted output projections.

    Attributes:
        keep: layer index -> sorted indices of the heads kept. Layers not listed are
            left untouched.
        output: layer index -> (wo_ID, bo_D) replacing the kept O rows and bias
            (least-squares reconstruction writes these).
    """

    keep: Mapping[int, tuple[int, ...]]
    output: Mapping[int, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)


def apply_head_pruning(model: ir.Model, spec: ModelSpec, config: HeadPruningConfig) -> int:
    """Rewrites the listed layers' attention to their kept heads; returns how many changed."""
    changed = 0
    for layer in spec.layers:
        if layer.index not in config.keep:
            continue
        heads = tuple(sorted(config.keep[layer.index]))
        attn = layer.attention
        if any(not 0 <= h < attn.heads for h in heads) or len(set(heads)) != len(heads):
            raise PreconditionError(f"{attn.block}: head indices {heads} do not fit {attn.heads}.")
        output = config.output.get(layer.index)
        if heads:
            _emit_attention(model.graph, attn, heads, output)
        else:
            bias = output[1] if output is not None else _o_bias(attn)
            bypass_with_constant(model.graph, attn.out, bias, attn.block)
        changed += 1
    return changed


def head_columns(heads: tuple[int, ...], head_size: int) -> np.ndarray:
    """Returns the projection columns (or O rows) belonging to `heads`, in order."""
    return np.concatenate([np.arange(h * head_size, (h + 1) * head_size) for h in heads])


def _o_bias(attn: AttentionSpec) -> np.ndarray:
    bias = attn.o.b()
    if bias is None:
        return np.zeros(attn.o.out_features, dtype=attn.o.w().dtype)
    return bias


def _emit_attention(
    graph: ir.Graph,
    attn: AttentionSpec,
    heads: tuple[int, ...],
    output: tuple[np.ndarray, np.ndarray] | None,
) -> None:
    cols = head_columns(heads, attn.head_size)
    n, d = len(heads), attn.head_size
    dtype = attn.q.w().dtype
    b = NodeBuilder(graph, attn.out_node, pass_name=PASS_NAME, block=attn.block)
    split_shape = b.const("shape_BSHd", np.array([0, 0, n, d], dtype=np.int64))
    merge_shape = b.const("shape_BSI", np.array([0, 0, n * d], dtype=np.int64))

    def project(name: str, w: np.ndarray, bias: np.ndarray | None, perm: list[int]) -> ir.Value:
        y = b.op("MatMul", [attn.x, b.const(f"{name}/weight", w)], f"{name}/MatMul")
        if bias is not None:
            y = b.op("Add", [y, b.const(f"{name}/bias", bias)], f"{name}/Add")
        y = b.op("Reshape", [y, split_shape], f"{name}/Reshape")
        rotary = attn.rotary.get(name)
        if rotary is None:
            return b.op("Transpose", [y], f"{name}/Transpose", {"perm": perm})
        # Rotary embeddings act on [B, H, S, d] inside each head: rotate there, then lay
        # K out as Kᵀ.
        y = b.op("Transpose", [y], f"{name}/Transpose", {"perm": [0, 2, 1, 3]})
        y = emit_rotary(b, y, rotary, name, heads=heads, all_heads=attn.heads, head_size=d,
                        source=attn.x)
        if perm == [0, 2, 1, 3]:
            return y
        return b.op("Transpose", [y], f"{name}/rotary/Transpose", {"perm": [0, 1, 3, 2]})

    def sliced(lin_b: np.ndarray | None) -> np.ndarray | None:
        return None if lin_b is None else lin_b[cols]

    q = project("q", attn.q.w()[:, cols], sliced(attn.q.b()), [0, 2, 1, 3])
    k = project("k", attn.k.w()[:, cols], sliced(attn.k.b()), [0, 2, 3, 1])
    v = project("v", attn.v.w()[:, cols], sliced(attn.v.b()), [0, 2, 1, 3])
    scores = b.op("MatMul", [q, k], "scores/MatMul")
    scores = b.op("Mul", [scores, b.const("scale", np.array(attn.scale, dtype=dtype))],
                  "scores/Mul")
    per_head = set(per_head_operands(attn)) if n < attn.heads else set()
    for i, step in enumerate(attn.score_ops):
        inputs = list(step.inputs)
        inputs[step.scores_index] = scores
        for j, term in enumerate(inputs):
            if (i, j) in per_head:
                # A per-head score term (relative-position bias) keeps the kept heads' rows.
                kept = b.const(f"scores/{step.op_type}_{i}/heads", np.array(heads, np.int64))
                inputs[j] = b.op("Gather", [term, kept], f"scores/{step.op_type}_{i}/Gather",
                                 {"axis": -3})
        scores = b.op(step.op_type, inputs, f"scores/{step.op_type}_{i}", step.attributes)
    probs = b.op("Softmax", [scores], "Softmax", {"axis": -1})
    ctx = b.op("MatMul", [probs, v], "context/MatMul")
    if attn.nan_guard:
        # The exporter zeroes NaN probabilities (rows whose keys are all masked). A NaN
        # row of probs gives a NaN row of probs·V and a finite one a finite one, so the
        # guard moves after the MatMul: same result on S/d times fewer elements.
        isnan = b.op("IsNaN", [ctx], "nan_guard/IsNaN")
        zero = b.const("nan_guard/zero", np.array(0.0, dtype=dtype))
        ctx = b.op("Where", [isnan, zero, ctx], "nan_guard/Where")
    ctx = b.op("Transpose", [ctx], "context/Transpose", {"perm": [0, 2, 1, 3]})
    ctx = b.op("Reshape", [ctx, merge_shape], "context/Reshape")
    if output is None:
        wo, bo = attn.o.w()[cols, :], attn.o.b()
    else:
        wo, bo = output
    out = b.op("MatMul", [ctx, b.const("o/weight", wo)], "o/MatMul")
    if bo is not None:
        out = b.op("Add", [out, b.const("o/bias", bo)], "o/Add")
    replace_uses(attn.out, out)
    remove_dead_producers(attn.out)
