"""Reads rotary position embeddings on Q/K/V and writes them back for the kept heads.

Dimensions: B batch, H heads, S sequence, d head size, h = d/2.

Read (the finder, walking back from Q·Kᵀ or softmax·V):

    x_BHSd ─┬──────────── Mul(cos) ──┐
            └─ rotate ─── Mul(sin) ──┴─ Add ─ y_BHSd

    rotate "half"        (Llama, GPT-NeoX, ModernBERT): Concat(-x[.., h:], x[.., :h])
                         from two Slices (or a Split) of x's last axis
    rotate "interleaved" (RoFormer, GPT-J): each pair (x₂ᵢ, x₂ᵢ₊₁) → (-x₂ᵢ₊₁, x₂ᵢ):
                         Reshape(Concat(Unsqueeze(-x[.., 1::2]), Unsqueeze(x[.., 0::2])))

Written (head pruning), on the kept heads, with constant shapes that carry no head count
(an exporter's reshape may spell the head count as a constant; none is reused):

    half          Concat(Neg(Slice(x, h:d)), Slice(x, 0:h))
    interleaved   Reshape(x, [0,0,0,h,2]) ─ Concat(Neg(pair[1]), pair[0]) ─ Reshape([0,0,0,d])
    y = x·cos + rotate(x)·sin      (cos/sin gathered to the kept heads when they hold one
                                    row per head on axis -3; broadcast ones are read as is)

Partial rotary (GPT-NeoX, Phi): Concat(rotary(x[.., :r]), x[.., r:]) is read and written
the same way, with the first r dims rotated and the rest passed through.

The rotation mixes dimensions inside one head only, so keeping whole heads keeps every
rotary pair intact and the kept heads compute exactly what they computed before. A
rotation on [B, S, H, d] right before the Transpose that moves the heads to axis 1, with
cos/sin transposed to match (ORT's optimizer writes K so on ModernBERT), is the same
rotation on [B, H, S, d] with cos/sin as they were (`heads_first`). Any other rotation
applied before the heads are split onto axis 1, one over dims that are not a
leading run of each head, or cos/sin computed from the hidden states is not taken (the
finder says which node).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from planer.compiler.irutil import NodeBuilder, const_array
from planer.compiler.spec import Rotary

LAST_AXES = (-1, 3)  # the last axis of a [B, H, S, d] operand
STACKED_AXES = (-1, 4)  # the new last axis after Unsqueeze(-1) of a [B, H, S, d/2] half
_WHOLE = 1 << 62  # Slice ends at or past this run to the end of the axis


def match_rotary(add: ir.Node) -> tuple[ir.Value, Rotary] | None:
    """Reads `add` as x·cos + rotate(x)·sin; returns x and the rotary, else None."""
    if add.op_type != "Add" or len(add.inputs) != 2:
        return None
    for plain_side, turned_side in (add.inputs, add.inputs[::-1]):
        turned = turned_side.producer() if turned_side is not None else None
        if turned is None or turned.op_type != "Mul" or plain_side is None:
            continue
        for x, cos, plain in _plain_terms(plain_side):
            for rotated, sin in _operand_pairs(turned):
                found = _rotation(rotated, x)
                if found is not None:
                    style, width, nodes = found
                    return x, Rotary(style=style, cos=cos, sin=sin, width=width,
                                     nodes=[add, plain[0], turned, *plain[1:], *nodes])
    return None


def match_partial_rotary(concat: ir.Node) -> tuple[ir.Value, Rotary] | None:
    """Reads `concat` as Concat(rotary(x[.., :r]), x[.., r:]); returns x and the rotary."""
    if concat.op_type != "Concat" or _axis(concat) not in LAST_AXES or len(concat.inputs) != 2:
        return None
    head, tail = concat.inputs
    add = head.producer() if head is not None else None
    found = match_rotary(add) if add is not None else None
    if found is None or tail is None:
        return None
    part, rotary = found
    lead, rest = part.producer(), tail.producer()
    if lead is None or rest is None or lead.inputs[0] is None \
            or rest.inputs[0] is not lead.inputs[0]:
        return None
    first = _slice_of_last_axis(lead, part, [], LAST_AXES)
    second = _slice_of_last_axis(rest, tail, [], LAST_AXES)
    if first is None or second is None or (first.start, first.step, second.step) != (0, 1, 1) \
            or second.start != first.end or second.end < _WHOLE:
        return None
    rotary.partial = first.end
    rotary.nodes += [concat, lead, rest]
    return lead.inputs[0], rotary


def _operand_pairs(mul: ir.Node) -> list[tuple[ir.Value, ir.Value]]:
    a, b = (mul.inputs[0], mul.inputs[1]) if len(mul.inputs) == 2 else (None, None)
    if a is None or b is None:
        return []
    return [(a, b), (b, a)]


def _plain_terms(value: ir.Value) -> list[tuple[ir.Value, ir.Value, list[ir.Node]]]:
    """Reads the x·cos operand as (x, cos, [its Mul, other nodes]), every way it can be.

    Besides Mul(x, cos), ORT's transformer optimizer writes Transpose(Mul(x_pre, cos_t), P)
    with x = Transpose(x_pre, P) and cos_t = Transpose(cos, Q), Q undoing P: it moved the
    head Transpose past the Mul.
    """
    node = value.producer()
    if node is not None and node.op_type == "Mul":
        return [(x, cos, [node]) for x, cos in _operand_pairs(node)]
    perm = perm_of(node) if node is not None and node.op_type == "Transpose" else None
    inner = node.inputs[0].producer() if node is not None and node.inputs[0] else None
    if node is None or perm is None or inner is None or inner.op_type != "Mul":
        return []
    found = []
    for pre, moved in _operand_pairs(inner):
        back = moved.producer()
        undo = perm_of(back) if back is not None and back.op_type == "Transpose" else None
        cos = back.inputs[0] if back is not None else None
        if back is None or cos is None or undo is None or len(undo) != len(perm) \
                or any(undo[perm[i]] != i for i in range(len(perm))):
            continue
        found += [(use.outputs[0], cos, [inner, node, back]) for use in pre.consumers()
                  if use.op_type == "Transpose" and perm_of(use) == perm]
    return found


HEADS_FIRST = ([0, 2, 1, 3], [0, 2, 3, 1])  # [B, S, H, d] to [B, H, S, d] or to Kᵀ


def heads_first(rotary: Rotary, transpose: ir.Node) -> Rotary | None:
    """Reads a rotary applied on [B, S, H, d] before `transpose` moves the heads to axis 1.

    ORT's optimizer moves K's head Transpose past the whole rotation and transposes cos and
    sin to [B, S, 1, d] to match. Each head still rotates its own pairs on the last axis,
    so this is the rotary on [B, H, S, d] with the cos/sin as they were before their
    Transposes; returns it so, or None when the rotary is not in that form.
    """
    if transpose.op_type != "Transpose" or perm_of(transpose) not in HEADS_FIRST:
        return None
    terms = [term.producer() for term in (rotary.cos, rotary.sin)]
    if any(t is None or t.op_type != "Transpose" or perm_of(t) != [0, 2, 1, 3]
           or t.inputs[0] is None for t in terms):
        return None
    cos, sin = (t.inputs[0] for t in terms if t is not None)
    assert cos is not None and sin is not None
    return dataclasses.replace(rotary, cos=cos, sin=sin)


def perm_of(node: ir.Node | None) -> list[int] | None:
    """Returns a Transpose's perm attribute as ints (None when it has none)."""
    attr = node.attributes.get("perm") if node is not None else None
    return None if attr is None else [int(i) for i in attr.value]


def _rotation(rotated: ir.Value, x: ir.Value) -> tuple[str, int | None, list[ir.Node]] | None:
    """Returns (style, dims rotated or None for the whole axis, nodes) if `rotated` turns x."""
    node = rotated.producer()
    if node is None:
        return None
    if node.op_type == "Concat" and _axis(node) in LAST_AXES and len(node.inputs) == 2:
        first, second = (_branch(v, x) for v in node.inputs)
        if first is None or second is None or first.unsqueezed or second.unsqueezed:
            return None
        if first.negated and not second.negated and first.step == second.step == 1 \
                and second.start == 0 and first.start == second.end > 0 \
                and first.end >= 2 * first.start:
            return "half", 2 * first.start, [node, *first.nodes, *second.nodes]
        return None
    stack = node.inputs[0].producer() if node.op_type == "Reshape" and node.inputs[0] else None
    if stack is None or stack.op_type != "Concat" or _axis(stack) not in STACKED_AXES \
            or len(stack.inputs) != 2:
        return None
    odd, even = (_branch(v, x) for v in stack.inputs)
    if odd is None or even is None or not odd.negated or even.negated:
        return None
    nodes = [node, stack, *odd.nodes, *even.nodes]
    if odd.unsqueezed and even.unsqueezed and odd.step == even.step == 2 \
            and (odd.start, even.start) == (1, 0):
        end = min(odd.end, even.end)
        return "interleaved", None if end >= _WHOLE else end, nodes
    if odd.paired and even.paired and (odd.start, odd.end, even.start, even.end) == (1, 2, 0, 1):
        return "interleaved", None, nodes  # planer's own spelling (emit_rotary)
    return None


class _Branch:
    """One operand of rotate(x): a strided slice of x's last axis, maybe negated/unsqueezed."""

    def __init__(self, start: int, end: int, step: int) -> None:
        self.start, self.end, self.step = start, end, step
        self.negated = False
        self.unsqueezed = False
        self.paired = False  # sliced from x reshaped to [.., d/2, 2] pairs
        self.nodes: list[ir.Node] = []


def _branch(value: ir.Value | None, x: ir.Value) -> _Branch | None:
    """Walks Neg/Unsqueeze back to a Slice or Split of `x`'s last axis."""
    negated, unsqueezed, nodes = False, False, []
    node = value.producer() if value is not None else None
    while node is not None and node.op_type in ("Neg", "Unsqueeze"):
        if node.op_type == "Unsqueeze":
            axes = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
            if axes is None or axes.size != 1 or int(axes.reshape(-1)[0]) not in STACKED_AXES:
                return None
            unsqueezed = True
        else:
            negated = not negated
        nodes.append(node)
        source = node.inputs[0]
        node = source.producer() if source is not None else None
    if node is None or not node.inputs:
        return None
    pairs = _pairs_reshape(node.inputs[0], x)
    if _uncast(node.inputs[0]) is not _uncast(x) and pairs is None:
        return None
    found = _slice_of_last_axis(node, value, nodes, LAST_AXES if pairs is None else STACKED_AXES)
    if found is None:
        return None
    found.negated, found.unsqueezed, found.paired = negated, unsqueezed, pairs is not None
    found.nodes = [*nodes, node, *([pairs] if pairs is not None else [])]
    return found


def _uncast(value: ir.Value | None) -> ir.Value | None:
    """Steps back over float32-to-float32 Casts (TorchScript's q.float() in a float model)."""
    node = value.producer() if value is not None else None
    while node is not None and node.op_type == "Cast" and node.attributes.get("to") is not None \
            and node.attributes["to"].value == ir.DataType.FLOAT and node.inputs[0] is not None \
            and node.inputs[0].dtype == ir.DataType.FLOAT:
        value = node.inputs[0]
        node = value.producer()
    return value


def _pairs_reshape(value: ir.Value | None, x: ir.Value) -> ir.Node | None:
    """Returns the Reshape of x into [.., d/2, 2] pairs that `value` is, if it is one."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Reshape" or node.inputs[0] is not x:
        return None
    shape = const_array(node.inputs[1])
    return node if shape is not None and shape.size == 5 and int(shape[-1]) == 2 else None


def _slice_of_last_axis(node: ir.Node, value: ir.Value | None, walked: list[ir.Node],
                        last: tuple[int, int]) -> _Branch | None:
    """Reads a Slice or Split of its input's last axis (`last`: how it may be spelled)."""
    if node.op_type == "Slice":
        parts = [folded(node.inputs[i]) if len(node.inputs) > i and node.inputs[i]
                 else None for i in range(1, 5)]
        starts, ends, axes, steps = parts
        if starts is None or ends is None or axes is None or axes.size != 1 \
                or int(axes.reshape(-1)[0]) not in last or starts.size != 1:
            return None
        step = 1 if steps is None else int(steps.reshape(-1)[0])
        return _Branch(int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0]), step)
    if node.op_type == "Split":
        axis = node.attributes.get("axis")
        sizes = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] else None
        if axis is None or axis.value not in last or sizes is None:
            return None
        output = walked[-1].inputs[0] if walked else value
        index = next((i for i, out in enumerate(node.outputs) if out is output), None)
        if index is None:
            return None
        start = int(np.sum(sizes[:index]))
        return _Branch(start, start + int(sizes[index]), 1)
    return None


_ARITHMETIC = {"Div": np.floor_divide, "Mul": np.multiply, "Add": np.add, "Sub": np.subtract}


def folded(value: ir.Value | None, depth: int = 8) -> np.ndarray | None:
    """Returns `value` as a constant when it is one or is computed from static dims.

    TorchScript spells rotate-half's split point x.shape[-1] // 2 as Shape ─ Gather ─ Div
    ─ Cast ─ Unsqueeze at run time; with x's last dim known, that is a constant.
    """
    array = const_array(value)
    node = value.producer() if value is not None else None
    if array is not None or node is None or depth == 0:
        return array
    if node.op_type == "Gather" and (shape := _dims(node.inputs[0], depth - 1)) is not None:
        index = folded(node.inputs[1], depth - 1)
        if index is None or any(shape[int(i)] is None for i in index.reshape(-1)):
            return None
        return np.array([shape[int(i)] for i in index.reshape(-1)], np.int64).reshape(index.shape)
    inputs = [a for v in node.inputs if (a := folded(v, depth - 1)) is not None]
    if len(inputs) != len(node.inputs):
        return None
    if node.op_type in _ARITHMETIC and len(inputs) == 2:
        return _ARITHMETIC[node.op_type](inputs[0], inputs[1])
    if node.op_type == "Cast":
        return inputs[0]  # integer shape arithmetic: the values are what matters here
    if node.op_type == "Unsqueeze" and len(inputs) == 2:
        return inputs[0].reshape(-1) if inputs[0].ndim == 0 else None
    return None


def _dims(value: ir.Value | None, depth: int = 4) -> list[int | None] | None:
    """Returns a shape vector as known dims (None for an unknown one), if `value` is one.

    A shape vector is Shape(v) (its start/end attributes applied) or a Gather of one by
    constant indices: ORT's optimizer writes Gather(Shape(x), perm) for Shape(Transpose(x)).
    """
    node = value.producer() if value is not None else None
    if node is None or depth == 0 or node.inputs[0] is None:
        return None
    if node.op_type == "Gather":
        inner = _dims(node.inputs[0], depth - 1)
        index = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        axis = node.attributes.get("axis")
        if inner is None or index is None or index.ndim != 1 or (axis and axis.value != 0):
            return None
        return [inner[int(i)] for i in index]
    if node.op_type != "Shape" or set(node.attributes) - {"start", "end"}:
        return None
    shape = node.inputs[0].shape
    if shape is None:
        return None
    start, end = (node.attributes.get(k) for k in ("start", "end"))
    dims = [d if isinstance(d, int) else None for d in shape]
    return dims[start.value if start else 0:end.value if end else None]


def _axis(node: ir.Node) -> int | None:
    attr = node.attributes.get("axis")
    return None if attr is None else int(attr.value)


def rotary_problem(rotary: Rotary, role: str, x: ir.Value, head_size: int) -> str | None:
    """Says why head pruning could not replay `rotary` on `role` (q/k/v), or None.

    `x` is the attention input: angles computed from its values are not positions.
    """
    cos_mul = rotary.nodes[1]
    where = f"{cos_mul.op_type} node {cos_mul.name!r}"
    span = head_size if rotary.partial is None else rotary.partial
    if rotary.width is not None and rotary.width != span or span > head_size:
        return (f"{where} rotates {rotary.width} of the {head_size} dims of each "
                f"{role.upper()} head, and they do not pass the rest through unrotated")
    if span % 2:
        return f"{where} rotates pairs of an odd number of dims ({span})"
    if any(_computed_from(term, x) for term in (rotary.cos, rotary.sin)):
        return f"{where} rotates {role.upper()} by angles computed from the hidden states"
    return None


def head_rows(value: ir.Value, heads: int, x: ir.Value) -> bool | None:
    """Tells whether cos/sin `value` holds one row per head on axis -3.

    Returns True for one row per head, False when it broadcasts over the heads, and None
    when neither its shape nor its inputs tell. Without a static shape, a term built from
    no constant with an axis of `heads` and no shape of a tensor computed from the
    attention input `x` (the finder already refuses angles computed from x's values)
    cannot hold a head axis of its own.
    """
    shape = value.shape
    if shape is not None and len(shape) < 3:
        return False
    dim = shape[len(shape) - 3] if shape is not None else None
    if isinstance(dim, int):
        return False if dim == 1 else True if dim == heads else None
    return None if _may_carry_heads(value, heads, x) else False


def _may_carry_heads(value: ir.Value, heads: int, x: ir.Value, budget: int = 200) -> bool:
    stack, seen = [value], set()
    while stack and budget > 0:
        item = stack.pop()
        if id(item) in seen or item is x:
            continue
        seen.add(id(item))
        budget -= 1
        array = const_array(item)
        if array is not None:
            if array.size > 1 and heads in array.shape:
                return True
            continue
        node = item.producer()
        if node is None:
            continue
        if node.op_type == "Shape":
            if node.inputs[0] is not None and node.inputs[0] is not x \
                    and _computed_from(node.inputs[0], x):
                return True
            continue
        stack.extend(i for i in node.inputs if i is not None)
    return budget <= 0


def _computed_from(value: ir.Value, x: ir.Value, budget: int = 200) -> bool:
    """Tells whether `value`'s elements are computed from x's (a Shape reads only dims)."""
    stack, seen = [value], set()
    while stack and budget > 0:
        item = stack.pop()
        if item is x:
            return True
        if id(item) in seen:
            continue
        seen.add(id(item))
        budget -= 1
        node = item.producer()
        if node is not None and node.op_type not in ("Shape", "Size"):
            stack.extend(i for i in node.inputs if i is not None)
    return budget <= 0


def emit_rotary(b: NodeBuilder, x: ir.Value, rotary: Rotary, name: str, *,
                heads: tuple[int, ...], all_heads: int, head_size: int,
                source: ir.Value) -> ir.Value:
    """Emits x·cos + rotate(x)·sin on the kept `heads` of x_BHSd; returns the result.

    `source` is the attention's input in the graph read (see head_rows).
    """
    d = head_size if rotary.partial is None else rotary.partial
    h = d // 2
    made: dict[str, ir.Value] = {}

    def i64(label: str, values: list[int]) -> ir.Value:
        # One initializer per name: registering a name again would orphan the first one.
        if label not in made:
            made[label] = b.const(f"{name}/rotary/{label}", np.array(values, np.int64))
        return made[label]

    last = i64("last_axis", [-1])
    whole = x
    if rotary.partial is not None:
        x = b.op("Slice", [whole, i64("zero", [0]), i64("size", [d]), last],
                 f"{name}/rotary/rotated_dims")
    if rotary.style == "half":
        low = b.op("Slice", [x, i64("zero", [0]), i64("half", [h]), last], f"{name}/rotary/low")
        high = b.op("Slice", [x, i64("half", [h]), i64("size", [d]), last],
                    f"{name}/rotary/high")
        negated = b.op("Neg", [high], f"{name}/rotary/Neg")
        turned = b.op("Concat", [negated, low], f"{name}/rotary/Concat", {"axis": -1})
    else:
        pairs = b.op("Reshape", [x, i64("shape_BHSh2", [0, 0, 0, h, 2])],
                     f"{name}/rotary/pairs")
        even = b.op("Slice", [pairs, i64("zero", [0]), i64("one", [1]), last],
                    f"{name}/rotary/even")
        odd = b.op("Slice", [pairs, i64("one", [1]), i64("two", [2]), last],
                   f"{name}/rotary/odd")
        negated = b.op("Neg", [odd], f"{name}/rotary/Neg")
        turned = b.op("Concat", [negated, even], f"{name}/rotary/Concat", {"axis": -1})
        turned = b.op("Reshape", [turned, i64("shape_BHSd", [0, 0, 0, d])],
                      f"{name}/rotary/merge")
    cos = _kept_rows(b, rotary.cos, heads, all_heads, source, f"{name}/rotary/cos")
    sin = _kept_rows(b, rotary.sin, heads, all_heads, source, f"{name}/rotary/sin")
    plain = b.op("Mul", [x, cos], f"{name}/rotary/Mul_cos")
    rotated = b.op("Mul", [turned, sin], f"{name}/rotary/Mul_sin")
    y = b.op("Add", [plain, rotated], f"{name}/rotary/Add")
    if rotary.partial is None:
        return y
    # Partial rotary: the dims past `partial` pass through unrotated.
    # The end is open (as exporters write x[..., r:]), so the finder reads this back.
    kept = b.op("Slice", [whole, i64("size", [d]), i64("end", [np.iinfo(np.int64).max]), last],
                f"{name}/rotary/passed_dims")
    return b.op("Concat", [y, kept], f"{name}/rotary/join", {"axis": -1})


def _kept_rows(b: NodeBuilder, value: ir.Value, heads: tuple[int, ...], all_heads: int,
               x: ir.Value, name: str) -> ir.Value:
    """Gathers a per-head cos/sin to the kept heads; a broadcast one is read as is."""
    if len(heads) == all_heads or not head_rows(value, all_heads, x):
        return value
    kept = b.const(f"{name}/heads", np.array(heads, np.int64))
    return b.op("Gather", [value, kept], f"{name}/Gather", {"axis": -3})
