"""Forwarding maps: what a skimmed token's output row holds, one affine map per skim point.

Dimensions: B batch, S sequence, K slots, N rows, D model width.

    skimmed at point i:  y_row = x_i                (identity: Transkimmer's plain forwarding)
                         y_row = x_i · W_i + b_i    (linear: fitted, then trained by recovery)

A skimmed token's row is read by whatever reads every position (mean pooling in sentence
embedders). Its state where it left (x_i, the input of layer i) follows another
distribution than the last layer's output; W_i, b_i carry it to the output space. They are
fitted by ridge regression from x_i to the dense model's final rows (`skim_fit.fit_forward`)
and cost N·D² multiply-adds per point where a layer costs about 12·N·D².

Weights are initializers named under the point's block, `layer<i>/skim/forward/w` [D, D]
and `layer<i>/skim/forward/b` [D], so recovery finds them with the point's constants and
writes trained ones back by name; the MatMul and Add belong to the write-back.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from planer.compiler.irutil import NodeBuilder, add_initializer
from planer.compiler.names import BlockId

FORWARDS = ("identity", "linear")
WEIGHT, BIAS = "forward/w", "forward/b"


@dataclasses.dataclass(frozen=True)
class ForwardMap:
    """y = x · w + b for the rows a skim point lets go."""

    w: np.ndarray  # [D, D]
    b: np.ndarray  # [D]

    def __post_init__(self) -> None:
        d = self.b.shape[0]
        if self.w.shape != (d, d) or self.b.shape != (d,):
            raise ValueError(f"a forwarding map needs w [D, D] and b [D], not "
                             f"{self.w.shape} and {self.b.shape}")

    @staticmethod
    def identity(width: int) -> ForwardMap:
        return ForwardMap(np.eye(width, dtype=np.float32), np.zeros(width, np.float32))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Maps rows of `x` [..., D] in numpy (the graph computes the same)."""
        return x @ self.w + self.b


def weight_names(layer: int) -> tuple[str, str]:
    """Returns the initializer names of point `layer`'s map: (w, b)."""
    block = BlockId(layer, "skim")
    return f"{block}/{WEIGHT}", f"{block}/{BIAS}"


def emit_forward(b: NodeBuilder, rows: ir.Value, layer: int, fmap: ForwardMap | None,
                 name: str) -> ir.Value:
    """Returns rows [..., D] mapped by point `layer`'s map; `rows` itself without one."""
    if fmap is None:
        return rows
    w_name, b_name = weight_names(layer)
    w, bias = (b.graph.initializers[n] if n in b.graph.initializers
               else add_initializer(b.graph, n, a.astype(np.float32))
               for n, a in ((w_name, fmap.w), (b_name, fmap.b)))
    y = b.op("MatMul", [rows, w], f"{name}/forward/MatMul")
    return b.op("Add", [y, bias], f"{name}/forward/Add")
