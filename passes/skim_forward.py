"""Forwarding maps: what a skimmed token's output row holds, one affine map per skim point.

Dimensions: B batch, S sequence, K slots, N rows, D model width.

    skimmed at point i:  y_row = x_i                (identity: Transkimmer's plain forwarding)
                         y_row = x_i · W_i + b_i    (linear: fitted, then trained by recovery)
                         y_row = x_i · W_i + c · V_i + b_i   (context: c [B, D] is the mean
                                 of the kept tokens' final rows in the row's sequence)

A skimmed token's row is read by whatever reads every position (mean pooling in sentence
embedders). Its state where it left (x_i, the input of layer i) follows another
distribution than the last layer's output; W_i, b_i carry it to the output space. They are
fitted by ridge regression from x_i to the dense model's final rows (`skim_fit.fit_forward`)
and cost N·D² multiply-adds per point where a layer costs about 12·N·D².

The context term carries what a skimmed token's final row shares with its sentence: the
last layers mix every row toward a sentence-level state, which x_i, taken before them,
lacks, and whose error does not average out under mean pooling. The kept tokens hold that
state at the output; their mean costs one reduction and c · V_i one [B, D]·[D, D] product
per point. `skim_fit.fit_context` fits W_i, V_i and b_i together on the rows the point's
predictor skims; the compile keeps it over the linear map only where the skimmed model's
held-out pooled cosine is higher (on all-MiniLM-L6-v2 with SST-2 text it is not: README).

Weights are initializers named under the point's block, `layer<i>/skim/forward/w` [D, D],
`layer<i>/skim/forward/b` [D] and, with a context term, `layer<i>/skim/forward/v` [D, D],
so recovery finds them with the point's constants and writes trained ones back by name;
the MatMuls and Adds (and the kept rows' mean) belong to the write-back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from planer.compiler.irutil import NodeBuilder, add_initializer
from planer.compiler.names import BlockId

FORWARDS = ("identity", "linear")
WEIGHT, BIAS, CONTEXT = "forward/w", "forward/b", "forward/v"


@dataclasses.dataclass(frozen=True)
class ForwardMap:
    """y = x · w + c · v + b for the rows a skim point lets go (no v: y = x · w + b)."""

    w: np.ndarray  # [D, D]
    b: np.ndarray  # [D]
    v: np.ndarray | None = None  # [D, D], weight of c, the kept tokens' mean final row

    def __post_init__(self) -> None:
        d = self.b.shape[0]
        if self.w.shape != (d, d) or self.b.shape != (d,) \
                or (self.v is not None and self.v.shape != (d, d)):
            raise ValueError(f"a forwarding map needs w [D, D], b [D] and v [D, D] or none, not "
                             f"{self.w.shape}, {self.b.shape} and "
                             f"{None if self.v is None else self.v.shape}")

    @staticmethod
    def identity(width: int) -> ForwardMap:
        return ForwardMap(np.eye(width, dtype=np.float32), np.zeros(width, np.float32))

    def apply(self, x: np.ndarray, context: np.ndarray | None = None) -> np.ndarray:
        """Maps rows of `x` [..., D] in numpy (the graph computes the same).

        `context` (c, broadcastable to `x`) is the kept tokens' mean final row of each
        row's sequence; a map with a context term needs it.
        """
        y = x @ self.w + self.b
        if self.v is None:
            return y
        if context is None:
            raise ValueError("this forwarding map reads the kept tokens' mean final row; "
                             "pass context")
        return y + context @ self.v


def weight_names(layer: int) -> tuple[str, str]:
    """Returns the initializer names of point `layer`'s map: (w, b)."""
    block = BlockId(layer, "skim")
    return f"{block}/{WEIGHT}", f"{block}/{BIAS}"


def context_name(layer: int) -> str:
    """Returns the initializer name of point `layer`'s context weight v."""
    return f"{BlockId(layer, 'skim')}/{CONTEXT}"


def _weight(b: NodeBuilder, name: str, array: np.ndarray) -> ir.Value:
    if name in b.graph.initializers:
        return b.graph.initializers[name]
    return add_initializer(b.graph, name, array.astype(np.float32))


def emit_forward(b: NodeBuilder, rows: ir.Value, layer: int, fmap: ForwardMap | None,
                 name: str, *, context: ir.Value | None = None) -> ir.Value:
    """Returns rows [..., D] mapped by point `layer`'s map; `rows` itself without one.

    `context` is c · v for these rows (`emit_context_term`, broadcastable to `rows`); a
    map with a context term needs it.
    """
    if fmap is None:
        return rows
    w_name, b_name = weight_names(layer)
    y = b.op("MatMul", [rows, _weight(b, w_name, fmap.w)], f"{name}/forward/MatMul")
    y = b.op("Add", [y, _weight(b, b_name, fmap.b)], f"{name}/forward/Add")
    if fmap.v is None:
        return y
    if context is None:
        raise ValueError(f"layer {layer}'s forwarding map has a context term; pass its c · v")
    return b.op("Add", [y, context], f"{name}/forward/AddContext")


def has_context(maps: Mapping[int, ForwardMap]) -> bool:
    """Whether any of the maps reads the kept tokens' mean final row."""
    return any(m.v is not None for m in maps.values())


def emit_context(b: NodeBuilder, rows: ir.Value, active: ir.Value) -> ir.Value:
    """Returns c [B, D]: the mean of `rows` [B, K, D] over the slots `active` [B, K] marks 1.

    Every sequence keeps at least its first token, so the count is never 0.
    """
    axis1 = b.const("const/axis_1", np.array([1], dtype=np.int64))
    axis2 = b.const("const/axis_2", np.array([2], dtype=np.int64))
    weights = b.op("Unsqueeze", [active, axis2], "context/active_BK1")
    total = b.op("ReduceSum", [b.op("Mul", [rows, weights], "context/kept_BKD"), axis1],
                 "context/sum_BD", {"keepdims": 0})
    count = b.op("ReduceSum", [weights, axis1], "context/count_B1", {"keepdims": 0})
    return b.op("Div", [total, count], "context/mean_BD")


def emit_context_term(b: NodeBuilder, context: ir.Value | None, layer: int,
                      fmap: ForwardMap | None, name: str) -> ir.Value | None:
    """Returns c · v [B, D] for point `layer`, or None where its map has no context term."""
    if fmap is None or fmap.v is None:
        return None
    assert context is not None, "emit_context first: the map reads the kept rows' mean"
    return b.op("MatMul", [context, _weight(b, context_name(layer), fmap.v)],
                f"{name}/forward/context_BD")
