"""Replays the residual-stream ops between blocks in torch, with ONNX's semantics.

Dimensions: B batch, S sequence, D model width.

    pre-LN:   x_BSD ─ LayerNormalization(γ, β) ─ block
    RMSNorm:  x_BSD ─ Cast ─ Pow(2) ─ ReduceMean(-1) ─ Add(ε) ─ Sqrt ─ Div(1, ·) | Reciprocal
              ─ Mul(x) ─ Cast ─ Mul(γ) ─ block              (Llama, SmolLM2 as exported)
    residual: Add / Sum;  plumbing: Identity, Reshape;  LM head: MatMul(W_DV)

Each op is one torch call reading its operands in the node's input order (constants from
the mirror's `WeightStore`, the rest from the values computed so far), so a decomposed
norm is replayed as the graph spells it, not as a fused approximation of it. `fn_for`
raises for an op or attribute it does not replay; `structure.STREAM_OPS` names the op
types (LayerNormalization is `mirror._LayerNorm`, a module holding its scale and bias).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx_ir as ir
import torch

from planer.compiler.errors import UnsupportedModelError

StreamFn = Callable[..., torch.Tensor]

_DTYPES = {ir.DataType.FLOAT: torch.float32, ir.DataType.DOUBLE: torch.float64,
           ir.DataType.FLOAT16: torch.float16, ir.DataType.BFLOAT16: torch.bfloat16,
           ir.DataType.INT64: torch.int64, ir.DataType.INT32: torch.int32,
           ir.DataType.BOOL: torch.bool}


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # ONNX integer Div truncates


def _sum(*xs: torch.Tensor) -> torch.Tensor:
    total = xs[0]
    for x in xs[1:]:
        total = total + x
    return total


def _reshape(allowzero: bool) -> StreamFn:
    """Reshapes as ONNX does: a 0 copies the input's dim (a literal 0 with allowzero)."""

    def fn(x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        dims = [int(d) for d in shape.reshape(-1).tolist()]
        return x.reshape([x.shape[i] if d == 0 and not allowzero else d
                          for i, d in enumerate(dims)])

    return fn


_PLAIN: dict[str, StreamFn] = {
    "Add": lambda a, b: a + b,
    "Sum": _sum,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "Div": _div,
    "Pow": lambda a, b: torch.pow(a, b).to(a.dtype),  # ONNX Pow keeps the base's type
    "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal,
    "Neg": torch.neg,
    "MatMul": torch.matmul,
    "Identity": lambda x: x,
}


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _cast(node: ir.Node) -> StreamFn:
    to = ir.DataType(_attr(node, "to", 0))
    if to not in _DTYPES:
        raise UnsupportedModelError(f"{node.name}: a Cast to {to.name} is not mirrored.")
    dtype = _DTYPES[to]
    return lambda x: x.to(dtype)


def _reduce_mean(node: ir.Node) -> StreamFn:
    """ReduceMean with its axes as an attribute (opset < 18) or as its second input."""
    keep = bool(_attr(node, "keepdims", 1))
    noop_if_empty = bool(_attr(node, "noop_with_empty_axes", 0))
    listed = _attr(node, "axes", None)

    def fn(x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
        dims = list(listed) if listed is not None else \
            [] if axes is None else [int(a) for a in axes.reshape(-1).tolist()]
        if not dims:
            return x if noop_if_empty else x.mean().reshape([1] * x.ndim if keep else [])
        return x.mean(dim=dims, keepdim=keep)

    return fn


_MADE: dict[str, Callable[[ir.Node], StreamFn]] = {
    "Cast": _cast,
    "ReduceMean": _reduce_mean,
    "Reshape": lambda node: _reshape(bool(_attr(node, "allowzero", 0))),
}


def fn_for(node: ir.Node) -> StreamFn:
    """Returns the torch function replaying `node` on its (non-empty) inputs in order.

    Raises:
        UnsupportedModelError: the op, its domain or an attribute is not replayed.
    """
    if node.domain not in ("", "ai.onnx") or len(node.outputs) != 1 \
            or node.op_type not in _PLAIN and node.op_type not in _MADE:
        raise UnsupportedModelError(f"{node.op_type} ({node.name}) is not mirrored.")
    if any(v is None for v in node.inputs):
        raise UnsupportedModelError(f"{node.name}: an omitted optional input is not mirrored.")
    if node.op_type in _MADE:
        return _MADE[node.op_type](node)
    return _PLAIN[node.op_type]
