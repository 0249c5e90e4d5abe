"""Reads Q, K and V packed in one projection and unpacked on a group axis (ModernBERT).

Dimensions: B batch, S sequence, D model width, H heads, d head size.

    x_BSD ─ MatMul(Wqkv_D3I) [─ Add(b_3I)] ─ Reshape[B, S, 3, H, d]
          ─ Slice/Split on axis -3 (group g) ─ Squeeze(-3) ─ Transpose ─ q/k/v_BHSd

Group g of the packed reshape is columns g·I..(g+1)·I of Wqkv (I = H·d): the group
axis is the outer one, so the last three axes [3, H, d] are Wqkv's columns in order.
The finder (compiler.blocks) therefore reads each of Q, K and V as a Linear over its
own third of Wqkv's columns, exactly as it reads GPT-2's last-axis split, and head
pruning keeps head h of group g as columns g·I + h·d..g·I + (h+1)·d of it. TorchScript
unbinds with Split (sizes [1, 1, 1]), dynamo with one Slice [g, g+1) per group.

A split of a [.., H, 3, d] layout (the group inside the heads) is not read: its Slice
or Split is on another axis and the finder names it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from planer.compiler.irutil import const_array

GROUP_AXES = (-3, 2)  # the group axis of a [B, S, groups, H, d] operand


def packed_group(node: ir.Node, value: ir.Value) -> tuple[int, int] | None:
    """Reads `node` (producing `value`) as one group of a packed [B, S, n, H, d] reshape.

    Returns (group index, group count), or None when `node` is not such a Slice or Split.
    """
    source = node.inputs[0] if node.inputs else None
    count = _group_count(source)
    if count is None:
        return None
    if node.op_type == "Slice":
        starts, ends = (const_array(node.inputs[i]) if len(node.inputs) > i else None
                        for i in (1, 2))
        axes = const_array(node.inputs[3]) if len(node.inputs) > 3 else None
        steps = const_array(node.inputs[4]) if len(node.inputs) > 4 else None
        if starts is None or ends is None or axes is None or axes.size != 1 \
                or int(axes.reshape(-1)[0]) not in GROUP_AXES \
                or (steps is not None and int(steps.reshape(-1)[0]) != 1):
            return None
        start = int(starts.reshape(-1)[0])
        if int(ends.reshape(-1)[0]) != start + 1 or not 0 <= start < count:
            return None
        return start, count
    if node.op_type == "Split":
        axis = node.attributes.get("axis")
        if axis is None or axis.value not in GROUP_AXES or len(node.outputs) != count:
            return None
        sizes = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if sizes is not None and not np.array_equal(sizes.reshape(-1), np.ones(count)):
            return None
        return list(node.outputs).index(value), count
    return None


def _group_count(value: ir.Value | None) -> int | None:
    """Returns n when `value` is a Reshape to [B, S, n, H, d] with n a constant, else None."""
    reshape = value.producer() if value is not None else None
    if reshape is None or reshape.op_type != "Reshape":
        return None
    shape = reshape_entries(reshape.inputs[1])
    if shape is None or shape.size != 5 or shape[2] <= 1:
        return None
    return int(shape[2])


def reshape_entries(value: ir.Value | None) -> np.ndarray | None:
    """Returns a Reshape target with run-time entries as 0 (a Concat of parts), else None."""
    array = const_array(value)
    if array is not None:
        return array.reshape(-1)
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "Concat":
        return None
    parts: list[int] = []
    for item in producer.inputs:
        part = const_array(item)
        parts.extend(part.reshape(-1).tolist() if part is not None else [0])
    return np.asarray(parts)


def group_columns(group: tuple[int, int], width: int) -> slice | None:
    """Returns the columns of a packed projection `width` wide that group (g, n) holds."""
    index, count = group
    if width % count:
        return None
    size = width // count
    return slice(index * size, (index + 1) * size)


def is_packed(linear_out: ir.Value) -> bool:
    """Tells whether a projection's output is unpacked through a [B, S, n, H, d] reshape."""
    return any(c.op_type == "Reshape" and _group_count(c.outputs[0]) is not None
               for c in linear_out.consumers())
