"""A classification head after the layers, found in the graph and mirrored frozen in torch.

Dimensions: B batch, S sequence, D model width, C classes.

    stream end h_BSD ─ token pooling: Gather(axis 1) | Slice(axis 1) [─ Squeeze]
                     ─ chain of MatMul/Gemm, Add, Tanh, Relu, Reshape... ─ logits_BC
                       (the last op a Gemm, or a MatMul and its bias Add)

A model ends in a classification head when its main output has rank 2 and is produced
by a Gemm or MatMul (+ bias Add) reached from the last hidden state through one chain of
the ops above (BERT's pooler and classifier, for instance). The stream the mirror
trains then ends at h_BSD, and `HeadMirror` replays the head on top of it with its
weights frozen (they are not part of what planer rewrote), so the KL on the logits
reaches the layers. A head that is not such a chain is not mirrored (`find_head` returns
None, and the stream ends where `structure.read_stream` ends it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from planer.compiler.irutil import const_array

HEAD_OPS = {"Gather", "Slice", "Squeeze", "MatMul", "Gemm", "Add", "Sub", "Mul", "Div",
            "Tanh", "Relu", "Identity", "Reshape", "Flatten"}
_POOLING = {"Gather", "Slice"}
_MAX_NODES = 32


@dataclasses.dataclass
class Head:
    """The nodes from the last hidden state to the logits, in graph order."""

    hidden: ir.Value
    logits: ir.Value
    nodes: list[ir.Node]

    def describe(self) -> str:
        return " ─ ".join(n.op_type for n in self.nodes)


def find_head(model: ir.Model, output: ir.Value) -> Head | None:
    """Returns the classification head that computes `output`, or None if it has none."""
    if output.shape is not None and len(output.shape) != 2:
        return None
    last = output.producer()
    if last is None or not _is_linear_end(last):
        return None
    chain: list[ir.Node] = []
    node: ir.Node | None = last
    while node is not None and len(chain) < _MAX_NODES:
        if node.op_type not in HEAD_OPS or node.domain not in ("", "ai.onnx"):
            return None
        data = [v for v in node.inputs if v is not None and const_array(v) is None]
        if len(data) != 1:
            return None
        chain.append(node)
        if node.op_type in _POOLING and _axis(node) == 1:
            return Head(data[0], output, chain[::-1])
        node = data[0].producer()
    return None


def _is_linear_end(node: ir.Node) -> bool:
    if node.op_type in ("Gemm", "MatMul"):
        return True
    if node.op_type != "Add":
        return False
    producers = [v.producer() for v in node.inputs if v is not None and const_array(v) is None]
    return len(producers) == 1 and producers[0] is not None and \
        producers[0].op_type == "MatMul"


def _axis(node: ir.Node) -> int | None:
    """Returns the axis a Gather or a one-axis Slice selects tokens on (None if unknown)."""
    if node.op_type == "Gather":
        attr = node.attributes.get("axis")
        return int(attr.value) if attr is not None else 0
    axes = const_array(node.inputs[3]) if len(node.inputs) > 3 else None
    if axes is None or axes.size != 1:
        return None
    return int(axes.reshape(-1)[0])


class HeadMirror(nn.Module):
    """Replays a `Head` in torch on the stream's end; its constants are frozen buffers."""

    def __init__(self, head: Head):
        super().__init__()
        self.hidden = str(head.hidden.name)
        self.logits = str(head.logits.name)
        self.described = head.describe()
        self.program: list[tuple[str, list[str], dict[str, object], str]] = []
        self.consts: dict[str, torch.Tensor] = {}
        for node in head.nodes:
            names = []
            for value in node.inputs:
                name = str(value.name) if value is not None else ""
                array = const_array(value) if value is not None else None
                if array is not None and name not in self.consts:
                    self.consts[name] = torch.from_numpy(np.array(array))
                names.append(name)
            attrs = {k: a.value for k, a in node.attributes.items()}
            self.program.append((node.op_type, names, attrs, str(node.outputs[0].name)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Returns the logits [B, C] from the last hidden state [B, S, D]."""
        env: dict[str, torch.Tensor] = {**self.consts, self.hidden: hidden}
        for op, names, attrs, out in self.program:
            args = [env[n] if n else None for n in names]
            env[out] = _run(op, args, attrs)
        return env[self.logits]


def _run(op: str, args: list[torch.Tensor | None], attrs: dict[str, object]) -> torch.Tensor:
    """Computes one ONNX op of the head in torch (the ops `HEAD_OPS` names)."""
    x = args[0]
    assert x is not None
    if op == "Gather":
        index = args[1]
        assert index is not None
        axis = int(attrs.get("axis", 0))  # type: ignore[call-overload]
        flat = index.reshape(-1).long() % x.shape[axis]
        got = x.index_select(axis, flat)
        return got.reshape(*x.shape[:axis], *index.shape, *x.shape[axis + 1:])
    if op == "Slice":
        return _slice(x, args[1:])
    if op == "Squeeze":
        axes = args[1] if len(args) > 1 else None
        return x.squeeze() if axes is None else x.squeeze(tuple(int(a) for a in axes.tolist()))
    if op == "Gemm":
        return _gemm(x, args[1], args[2] if len(args) > 2 else None, attrs)
    if op in ("MatMul", "Add", "Sub", "Mul", "Div"):
        other = args[1]
        assert other is not None
        binary: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
            "MatMul": torch.matmul, "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul,
            "Div": torch.div}
        return binary[op](x, other.to(x.dtype))
    if op == "Reshape":
        shape = args[1]
        assert shape is not None
        dims = [int(d) for d in shape.tolist()]
        return x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(dims)])
    if op == "Flatten":
        axis = int(attrs.get("axis", 1))  # type: ignore[call-overload]
        return x.reshape(int(np.prod(x.shape[:axis])), -1)
    unary: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "Tanh": torch.tanh, "Relu": torch.relu, "Identity": lambda t: t}
    return unary[op](x)


def _slice(x: torch.Tensor, args: list[torch.Tensor | None]) -> torch.Tensor:
    starts, ends = args[0], args[1]
    assert starts is not None and ends is not None
    axes = args[2] if len(args) > 2 and args[2] is not None else torch.arange(len(starts))
    steps = args[3] if len(args) > 3 and args[3] is not None else torch.ones(len(starts))
    index: list[slice] = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts.tolist(), ends.tolist(), axes.tolist(), steps.tolist(),
                           strict=True):
        dim = x.shape[int(a)]
        index[int(a)] = slice(*slice(int(s), min(int(e), dim), int(st)).indices(dim))
    return x[tuple(index)]


def _gemm(a: torch.Tensor, b: torch.Tensor | None, c: torch.Tensor | None,
          attrs: dict[str, object]) -> torch.Tensor:
    assert b is not None
    if attrs.get("transA"):
        a = a.T
    if attrs.get("transB"):
        b = b.T
    y = float(attrs.get("alpha", 1.0)) * (a @ b)  # type: ignore[arg-type]
    if c is not None:
        y = y + float(attrs.get("beta", 1.0)) * c  # type: ignore[arg-type]
    return y


def cut_head(model: ir.Model) -> Head | None:
    """Ends `model`'s graph at its classification head's hidden state; returns the head.

    Leaves `model` alone (and returns None) when an output carries the hidden states
    [B, S, D] (that is the output the stream ends at) or no output ends in a head.
    """
    outputs = list(model.graph.outputs)
    if any(v.shape is not None and len(v.shape) == 3 for v in outputs):
        return None
    for value in outputs:
        head = find_head(model, value)
        if head is not None:
            model.graph.outputs.clear()
            model.graph.outputs.append(head.hidden)
            return head
    return None
