"""Rewrites FFN blocks to keep a subset of their hidden channels by slicing weights.

Dimensions: B batch, S sequence, D model width, F FFN width, K channels kept.

Before:  x_BSD ─ MatMul(w1_DF) ─ Add(b1_F) ─ act ─ MatMul(w2_FD) ─ Add(b2_D) ─ y_BSD
After:   x_BSD ─ MatMul(w1_DK) ─ Add(b1_K) ─ act ─ MatMul(w2_KD) ─ Add(b2_D) ─ y_BSD

The FFN is a sum over channels of act(x·w1[:, j] + b1[j])·w2[j, :], so keeping every
channel is exact and dropping one removes exactly its term. A gated FFN (SwiGLU:
act(x·g_j)·(x·u_j)·w2[j, :]) is sliced the same way, its gate columns with W1's:

    x_BSD ─ MatMul(gate_DK) ─ act ─┐
    x_BSD ─ MatMul(w1_DK) ─────────┴─ Mul ─ MatMul(w2_KD) ─ y_BSD

ModernBERT's GLU computes gate and up in one fused MatMul (Wi = [W_gate | W_up]) split
after it; a kept channel keeps its column in both halves, Wi stays one MatMul and its
split is re-emitted as two constant Slices (compiler.glu). The activation region is
elementwise with scalar constants (the finder checks), so it needs no change. A layer
kept at 0 channels contributes only b2, which its residual Adds take directly.
Reconstruction may supply a refitted w2/b2 for the kept channels.

Requires: FFN weights are initializers not shared with other layers.
Preserves: graph inputs/outputs, node order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from planer.compiler.errors import PreconditionError
from planer.compiler.glu import fused_columns, is_fused, reslice_parts
from planer.compiler.irutil import add_initializer, bypass_with_constant, const_array
from planer.compiler.names import PassName
from planer.compiler.spec import FfnSpec, Linear, ModelSpec

PASS_NAME = PassName.CHANNEL_PRUNING


@dataclasses.dataclass(frozen=True)
class ChannelPruningConfig:
    """Which FFN channels each layer keeps, and optionally refitted second projections.

    Attributes:
        keep: layer index -> sorted indices of the channels kept (layers not listed
            are left untouched).
        output: layer index -> (w2_KD, b2_D) replacing the kept W2 rows and b2.
    """

    keep: Mapping[int, tuple[int, ...]]
    output: Mapping[int, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)


def apply_channel_pruning(model: ir.Model, spec: ModelSpec, config: ChannelPruningConfig) -> int:
    """Slices the listed layers' FFN weights to their kept channels; returns how many changed."""
    changed = 0
    graph = model.graph
    for layer in spec.layers:
        if layer.index not in config.keep:
            continue
        ffn = layer.ffn
        keep = np.asarray(sorted(config.keep[layer.index]), dtype=np.int64)
        if keep.size and (keep[0] < 0 or keep[-1] >= ffn.width or len(set(keep)) != keep.size):
            raise PreconditionError(f"{ffn.block}: channel indices do not fit width {ffn.width}.")
        output = config.output.get(layer.index)
        if keep.size == ffn.width and output is None:
            continue
        w2, b2 = output if output is not None else (ffn.w2.w()[keep, :], ffn.w2.b())
        if keep.size == 0:
            bias = b2 if b2 is not None else np.zeros(ffn.w2.out_features, ffn.w2.w().dtype)
            bypass_with_constant(graph, ffn.out, bias, ffn.block)
        elif is_fused(ffn):
            # ModernBERT's GLU: gate and up are halves of one Wi; keep it one MatMul.
            wi, bi = const_array(ffn.w1.weight), const_array(ffn.w1.bias)
            assert wi is not None  # the finder only reads constant weights
            columns = fused_columns(ffn, keep)
            reslice_parts(graph, ffn, int(keep.size), PASS_NAME)  # finds the split by Wi's bias
            _set_linear(graph, ffn.w1, f"{ffn.block}/wi", wi[:, columns],
                        None if bi is None else bi.reshape(-1)[columns])
            _set_linear(graph, ffn.w2, f"{ffn.block}/w2", w2, b2)
            _forget_widths(ffn)
        else:
            for lin, role in ((ffn.w1, "w1"), (ffn.gate, "gate")):
                if lin is not None:  # a gated FFN's channel keeps its gate column too
                    b1 = lin.b()
                    _set_linear(graph, lin, f"{ffn.block}/{role}", lin.w()[:, keep],
                                None if b1 is None else b1[keep])
            _set_linear(graph, ffn.w2, f"{ffn.block}/w2", w2, b2)
            _forget_widths(ffn)
        changed += 1
    return changed


def _forget_widths(ffn: FfnSpec) -> None:
    """Drops exported shape annotations that still say F on the now narrower values."""
    nodes = [*ffn.nodes]
    for lin in (ffn.w1, ffn.gate):
        if lin is not None:
            nodes.append(lin.matmul)
            nodes.extend(u for u in lin.matmul.outputs[0].consumers() if u.op_type == "Add")
    for node in nodes:
        for value in node.outputs:
            if not value.is_graph_output():
                value.shape = None


def _set_linear(
    graph: ir.Graph, lin: Linear, name: str, weight: np.ndarray, bias: np.ndarray | None
) -> None:
    """Points the projection's MatMul (and bias Add) at new initializers."""
    new_w = add_initializer(graph, f"{name}/weight", weight)
    lin.matmul.replace_input_with(1, new_w)
    if lin.bias is None:
        return
    if bias is None:
        raise PreconditionError(f"{name}: a refit dropped the bias of a biased projection.")
    new_b = add_initializer(graph, f"{name}/bias", bias)
    product = lin.matmul.outputs[0]
    for node in list(lin.bias.consumers()):
        # Only this projection's own Add: layers may share one bias initializer (ALBERT;
        # zero biases an exporter merged), and each layer is sliced to its own width.
        if product not in node.inputs:
            continue
        for i, item in enumerate(node.inputs):
            if item is lin.bias:
                node.replace_input_with(i, new_b)
