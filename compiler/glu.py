"""Reads a GLU whose gate and up projections are halves of one fused weight (ModernBERT).

Dimensions: B batch, S sequence, D model width, F FFN width, K channels kept.

    x_BSD ─ MatMul(Wi_D2F) [─ Add(bi_2F)] ─ Split/Slice on the last axis ─┬─ [0, F) ─ act ─┐
                                                                         └─ [F, 2F) ──────┴─ Mul
          ─ MatMul(Wo_FD) ─ out_BSD

The finder reads each half as a Linear over its own columns of Wi (`fused_part`), so
the FFN is compiler.gated_ffn's act(x·W_gate)·(x·W_up)·W_down with W_gate and W_up
sharing one MatMul. Channel j is then Wi's column j of each half and Wo's row j.
Channel pruning keeps the MatMul fused: `fused_columns` gives the kept columns of the
whole Wi (both halves, in Wi's order) and `reslice_parts` re-emits the split as two
constant Slices [0, K) and [K, 2K), whatever spelling the exporter used (dynamo's
Split with num_outputs, TorchScript's Slices bounded by Shape arithmetic at run time).

Requires: the split is on the last axis and its bounds are constants or static dims.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from planer.compiler.irutil import NodeBuilder, const_array, remove_dead_producers, replace_uses
from planer.compiler.rotary import folded
from planer.compiler.spec import FfnSpec, Linear

AsLinear = Callable[[ir.Node], "Linear | None"]


def fused_part(value: ir.Value | None, as_linear: AsLinear) -> Linear | None:
    """Reads `value` as a column range of a constant projection split on its last axis."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type not in ("Split", "Slice") or not node.inputs:
        return None
    source = node.inputs[0]
    producer = source.producer() if source is not None else None
    linear = as_linear(producer) if producer is not None else None
    if linear is None or source is None or value is None:
        return None
    columns = _part_columns(node, value, source, linear.out_features)
    if columns is None:
        return None
    linear.columns = columns
    return linear


def _last_axis(axis: int, source: ir.Value) -> bool:
    rank = len(source.shape) if source.shape is not None else None
    return axis == -1 or axis == (rank - 1 if rank is not None else 2)


def _part_columns(node: ir.Node, value: ir.Value, source: ir.Value, width: int) -> slice | None:
    """Returns the columns of `source` (`width` wide) that `value`, an output of `node`, holds."""
    if node.op_type == "Split":
        axis = node.attributes.get("axis")
        if not _last_axis(int(axis.value) if axis is not None else 0, source):
            return None
        sizes = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if sizes is None and (attr := node.attributes.get("split")) is not None:
            sizes = np.asarray(attr.value)
        count = len(node.outputs)
        if sizes is None:  # equal parts, the last one smaller (opset 18's num_outputs)
            size = -(-width // count)
            sizes = np.array([min(size, width - i * size) for i in range(count)])
        index = list(node.outputs).index(value)
        start = int(np.sum(sizes[:index]))
        stop = start + int(sizes[index])
    else:
        starts, ends = folded(node.inputs[1]), folded(node.inputs[2])
        axes = folded(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] else None
        steps = const_array(node.inputs[4]) if len(node.inputs) > 4 else None
        if starts is None or ends is None or starts.size != 1 \
                or (axes is None and source.shape is not None and len(source.shape) != 1) \
                or (axes is not None and not _last_axis(int(axes.reshape(-1)[0]), source)) \
                or (steps is not None and int(steps.reshape(-1)[0]) != 1):
            return None
        start, stop = (int(a.reshape(-1)[0]) for a in (starts, ends))
        start, stop = (min(width, i + width if i < 0 else i) for i in (start, stop))
    return slice(start, stop) if 0 <= start < stop <= width else None


def output_of(linear: Linear) -> ir.Value:
    """Returns the value a Linear's MatMul (and bias Add) computes."""
    out = linear.matmul.outputs[0]
    if linear.bias is not None:
        add = next(u for u in out.consumers() if u.op_type == "Add" and linear.bias in u.inputs)
        out = add.outputs[0]
    return out


def part_value(linear: Linear) -> ir.Value:
    """Returns the value holding exactly `linear`'s columns of its fused projection."""
    source = output_of(linear)
    for node in source.consumers():
        for out in node.outputs:
            if node.op_type in ("Split", "Slice") and node.inputs[0] is source \
                    and _part_columns(node, out, source, _width(linear)) == linear.columns:
                return out
    raise ValueError(f"no split of {source.name} holds columns {linear.columns}")


def _width(linear: Linear) -> int:
    weight = const_array(linear.weight)
    assert weight is not None  # the finder only reads constant weights
    return int(weight.shape[1])


def is_fused(ffn: FfnSpec) -> bool:
    """Tells whether a gated FFN's gate and up projections share one fused MatMul."""
    return ffn.gate is not None and ffn.gate.matmul is ffn.w1.matmul


def fused_columns(ffn: FfnSpec, keep: np.ndarray) -> np.ndarray:
    """Returns the fused weight's columns that channels `keep` hold, part after part."""
    parts = sorted((p for p in (ffn.gate, ffn.w1) if p is not None), key=lambda p: p.columns.start)
    return np.concatenate([p.columns.start + keep for p in parts])


def reslice_parts(graph: ir.Graph, ffn: FfnSpec, kept: int, pass_name: str) -> None:
    """Re-emits the split of a fused FFN projection, now `kept` columns per part."""
    parts = sorted(((p, role) for p, role in ((ffn.gate, "gate"), (ffn.w1, "w1"))
                    if p is not None), key=lambda pr: pr[0].columns.start)
    olds = [part_value(p) for p, _ in parts]
    source = output_of(parts[0][0])
    anchor = olds[0].producer()
    assert anchor is not None  # part_value returns a Split/Slice output
    b = NodeBuilder(graph, anchor, pass_name=pass_name, block=ffn.block)
    axis = b.const("fused/axis", np.array([-1], np.int64))
    for i, ((_, role), old) in enumerate(zip(parts, olds, strict=True)):
        start = b.const(f"{role}/start", np.array([i * kept], np.int64))
        stop = b.const(f"{role}/stop", np.array([(i + 1) * kept], np.int64))
        replace_uses(old, b.op("Slice", [source, start, stop, axis], f"{role}/Slice"))
    for old in olds:  # after every new Slice: the anchor is one of the old splitters
        remove_dead_producers(old)
