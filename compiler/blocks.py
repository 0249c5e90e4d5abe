"""Finds the Transformer layers of a canonical graph and describes them as a ModelSpec.

Attention is anchored on Softmax: walking back from it gives the score chain (scale,
mask) and the Q·Kᵀ MatMul; walking back from each side through reshape plumbing
(Reshape, Transpose, scalar Mul/Div, Split/Slice of a fused projection, or of a packed
[B, S, 3, H, d] one: compiler.packed_qkv) gives the Q, K and V projections; walking
forward from Softmax·V gives the output projection.
The FFN is a constant-weight MatMul whose input is an elementwise region (the
activation) rooted at another constant-weight MatMul (+ bias) of matching width, or
the gating Mul of a SwiGLU/GeGLU FFN (compiler.gated_ffn).
Layers pair each attention with the first FFN after it.

Because the finder walks one canonical form, exporter differences (dynamo vs
TorchScript, transformers 4.x vs 5.x masks, -1 vs constant reshape shapes) only change
the plumbing it walks through, never what it returns.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from planer.compiler.contrib_emit import node_label
from planer.compiler.errors import UnsupportedModelError
from planer.compiler.gated_ffn import gated_ffn_hint, read_gated_ffn
from planer.compiler.irutil import const_array, other_input, scalar
from planer.compiler.names import PROVENANCE_BLOCK, PROVENANCE_PASS, BlockId, PassName
from planer.compiler.packed_qkv import group_columns, is_packed, packed_group, reshape_entries
from planer.compiler.rotary import (
    heads_first,
    match_partial_rotary,
    match_rotary,
    perm_of,
    rotary_problem,
)
from planer.compiler.spec import (
    AttentionSpec,
    FfnSpec,
    LayerSpec,
    Linear,
    ModelSpec,
    Rotary,
    ScoreOp,
)

logger = logging.getLogger(__name__)

PLUMBING = {"Reshape", "Transpose", "Identity", "Squeeze", "Unsqueeze", "Cast", "Dropout"}
SCORE_OPS = {"Add", "Sub", "Mul", "Div", "Where", "Cast"}
ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Erf", "Tanh", "Pow", "Sigmoid", "Relu", "Gelu", "FastGelu",
    "Softplus", "Clip", "Max", "Min", "Neg", "Exp", "Sqrt", "HardSigmoid", "HardSwish",
    "LeakyRelu", "Elu", "Selu", "Cast", "Identity", "QuickGelu", "BiasGelu",
}


def find_blocks(model: ir.Model) -> ModelSpec:
    """Describes every layer of a canonical model.

    Raises:
        UnsupportedModelError: no Transformer layers were found, or they use a form
            planer cannot rewrite (shared layer weights, relative-position attention).
    """
    graph = model.graph
    order = {node: i for i, node in enumerate(graph)}
    attentions, skipped = [], []
    for node in graph:
        if node.op_type != "Softmax":
            continue
        try:
            attentions.append(_find_attention(node))
        except _NoMatch as why:
            skipped.append(f"Softmax node {node.name!r}: {why}")
    relative = next((found for n in graph if n.op_type == "Softmax"
                     and (found := _relative_scores_node(n)) is not None), None)
    if not attentions and relative is not None:
        raise UnsupportedModelError(
            f"attention scores add a term computed from the hidden states at "
            f"{_describe(relative)} (DeBERTa-style relative-position attention), which "
            "planer cannot rewrite per head."
        )
    if not attentions:
        detail = f"; at {skipped[0]}" if skipped else _fused_hint(graph)
        raise UnsupportedModelError(
            "no Transformer layers were found: the graph has "
            f"{sum(1 for n in graph if n.op_type == 'Softmax')} Softmax nodes but no "
            f"self-attention with constant Q/K/V/O projections around them{detail}."
        )
    for reason in skipped:
        logger.info("Softmax not taken as attention: %s", reason)
    attentions.sort(key=lambda a: _position(order, a.out))
    ffns = sorted(_find_ffns(graph), key=lambda f: _position(order, f.out))
    layers = _pair_layers(attentions, ffns, order)
    for layer in layers:
        _reject_hidden_dependent_scores(layer.attention)
    hidden = layers[0].attention.q.in_features
    used = {id(lin.matmul) for layer in layers for lin in layer.projections()}
    return ModelSpec(
        layers=layers,
        hidden=hidden,
        vocab_size=_vocab_size(graph, hidden),
        inputs=[v.name for v in graph.inputs if v.name and v.name not in graph.initializers],
        outputs=[v.name for v in graph.outputs if v.name],
        total_params=_total_params(graph),
        other_matmul_macs_per_token=_other_macs(graph, used),
        kind="decoder" if _is_fused_qkv(layers[0].attention) else "encoder",
        shared_weights=_shares_weights(layers),
    )


def find_unpaired_blocks(graph: ir.Graph) -> list[AttentionSpec | FfnSpec]:
    """Returns every attention and FFN block of `graph`, unpaired, attention first.

    `find_blocks` pairs each attention with the next FFN, so it refuses (or mispairs) a
    compiled graph whose plan dropped a sub-block; readers that order blocks themselves
    (recovery's residual stream) take them one by one here. Softmax nodes that are not
    attention are skipped.
    """
    found: list[AttentionSpec | FfnSpec] = []
    for node in graph:
        if node.op_type != "Softmax":
            continue
        try:
            found.append(_find_attention(node))
        except _NoMatch:
            continue
    found.extend(_find_ffns(graph))
    return found


class _NoMatch(Exception):
    """Internal: this candidate is not the block we look for (the message says why)."""


def _describe(node: ir.Node) -> str:
    return f"{node.op_type} node {node.name!r}"


def _rotary_hint(node: ir.Node) -> str:
    """Names rotary position embeddings when `node` combines a Neg-rotated copy of Q or K."""
    stack, seen = [node], 0
    while stack and seen < 80:
        current = stack.pop(0)
        seen += 1
        if current.op_type in ("Neg", "Sin", "Cos"):
            return (" (rotary position embeddings rotate Q/K pairs there in a form planer "
                    "does not read: it reads x·cos + rotate(x)·sin on (batch, heads, seq, "
                    "head size), rotate being rotate-half or interleaved pairs)")
        stack.extend(p for i in current.inputs if i is not None
                     and (p := i.producer()) is not None and p.op_type != "MatMul")
    return ""


def _fused_hint(graph: ir.Graph) -> str:
    """Names a node from another operator set that may hold the attention, if any."""
    fused = next((n for n in graph if n.domain not in ("", "ai.onnx")), None)
    if fused is None:
        return ""
    return f" (it holds {node_label(fused)}, which planer does not read)"


def _position(order: dict[ir.Node, int], value: ir.Value) -> int:
    """Returns where `value`'s producer sits in the graph (-1 for a graph input)."""
    producer = value.producer()
    return order[producer] if producer is not None else -1


# ---------------------------------------------------------------- attention


def _find_attention(softmax: ir.Node) -> AttentionSpec:
    axis = softmax.attributes.get("axis")
    if axis is not None and axis.value not in (-1, 3):
        raise _NoMatch("softmax is not over the last axis")
    score_ops: list[ScoreOp] = []
    value = softmax.inputs[0]
    scale = 1.0
    nodes: list[ir.Node] = [softmax]
    while True:
        producer = value.producer() if value is not None else None
        if producer is None:
            raise _NoMatch("softmax input has no producer")
        if producer.op_type == "MatMul" and all(const_array(i) is None for i in producer.inputs):
            qk = producer
            break
        if producer.op_type not in SCORE_OPS:
            raise _NoMatch(f"unexpected {_describe(producer)} between Q·Kᵀ and Softmax")
        idx = _data_index(producer, value_chain_input=True)
        s = _scale_of(producer, idx)
        if s is not None:
            scale *= s
        elif producer.op_type != "Cast":
            score_ops.insert(0, ScoreOp(
                producer.op_type, list(producer.inputs), idx,
                {k: a.value for k, a in producer.attributes.items()},
            ))
        nodes.append(producer)
        value = producer.inputs[idx]
    rotary: dict[str, Rotary] = {}
    q, q_scale, q_shapes = _trace_projection(qk.inputs[0], nodes, rotary, "q")
    k, k_scale, k_shapes = _trace_projection(qk.inputs[1], nodes, rotary, "k")
    scale *= q_scale * k_scale
    probs, nan_guard = _skip_softmax_epilogue(softmax.outputs[0], nodes)
    ctx_mm = next((u for u in probs.consumers() if u.op_type == "MatMul" and u.inputs[0] is probs),
                  None)
    if ctx_mm is None:
        raise _NoMatch("softmax output does not multiply V")
    v, v_scale, v_shapes = _trace_projection(ctx_mm.inputs[1], nodes, rotary, "v")
    if v_scale != 1.0:
        raise _NoMatch("V is scaled")
    o, guarded_ctx = _trace_output_projection(ctx_mm, nodes)
    nan_guard = nan_guard or guarded_ctx
    x = q.matmul.inputs[0]
    if x is None or k.matmul.inputs[0] is not x or v.matmul.inputs[0] is not x:
        raise _NoMatch("Q, K and V read different inputs (cross-attention)")
    inner = q.out_features
    if k.out_features != inner or v.out_features != inner or o.in_features != inner:
        raise _NoMatch("Q/K/V/O widths disagree (grouped-query attention is not supported)")
    head_size = _head_size(q_shapes + k_shapes + v_shapes, inner)
    for role, found in rotary.items():
        problem = rotary_problem(found, role, x, head_size)
        if problem is not None:
            raise _NoMatch(problem)
    out = _linear_output(o)
    after = [c for c in out.consumers() if c.op_type != "Shape"]
    if len(after) == 1 and after[0].op_type == "Reshape":
        # A 2-D (flattened-token) output projection is restored to [B, S, D] right after;
        # the block ends there, so the rewrite can emit [B, S, D] directly.
        nodes.append(after[0])
        out = after[0].outputs[0]
    return AttentionSpec(
        block="", x=x, out=out, q=q, k=k, v=v, o=o,
        heads=inner // head_size, head_size=head_size, scale=scale,
        score_ops=score_ops, nan_guard=nan_guard, nodes=nodes, rotary=rotary,
    )


def _data_index(node: ir.Node, *, value_chain_input: bool) -> int:
    """Returns the input position of the non-constant operand that carries the scores."""
    candidates = [1, 2] if node.op_type == "Where" else list(range(len(node.inputs)))
    data = [i for i in candidates if (item := node.inputs[i]) is not None
            and const_array(item) is None and _is_score_like(item)]
    if len(data) != 1:
        raise _NoMatch(f"cannot tell the scores operand of {node.op_type}")
    return data[0]


def _is_score_like(value: ir.Value) -> bool:
    """Tells whether `value` descends from a non-constant MatMul through score ops (bounded)."""
    for _ in range(8):
        producer = value.producer()
        if producer is None:
            return False
        if producer.op_type == "MatMul" and all(const_array(i) is None for i in producer.inputs):
            return True
        if producer.op_type not in SCORE_OPS:
            return False
        inputs = [i for i in producer.inputs if i is not None and const_array(i) is None]
        if producer.op_type == "Where":
            inputs = [i for i in producer.inputs[1:] if i is not None and const_array(i) is None]
        if len(inputs) != 1:
            return any(_is_score_like(i) for i in inputs[:2]) if len(inputs) == 2 else False
        value = inputs[0]
    return False


def _relative_scores_node(softmax: ir.Node) -> ir.Node | None:
    """Returns the Add of two products of activations in the scores (c2p/p2c terms), if any."""
    stack, steps = [softmax.inputs[0]], 0
    while stack and steps < 24:
        value = stack.pop()
        producer = value.producer() if value is not None else None
        steps += 1
        if producer is None or producer.op_type not in SCORE_OPS:
            continue
        data = [i for i in producer.inputs if i is not None and const_array(i) is None]
        if producer.op_type == "Add" and len(data) == 2 \
                and all(_reaches_activation_matmul(i) for i in data):
            return producer
        stack.extend(data)
    return None


def _reaches_activation_matmul(value: ir.Value, budget: int = 200) -> bool:
    """Tells whether `value` is computed from a product of two activations (not a mask)."""
    stack, seen = [value], set()
    while stack and budget > 0:
        item = stack.pop()
        producer = item.producer()
        if producer is None or id(producer) in seen or producer.op_type in ("Shape", "Size"):
            continue
        seen.add(id(producer))
        budget -= 1
        if producer.op_type == "MatMul" and all(const_array(i) is None for i in producer.inputs):
            return True
        stack.extend(i for i in producer.inputs if i is not None)
    return False


def _scale_of(node: ir.Node, data_index: int) -> float | None:
    if node.op_type not in ("Mul", "Div") or len(node.inputs) != 2:
        return None
    s = scalar(node.inputs[1 - data_index])
    if s is None or s == 0.0:
        return None
    if node.op_type == "Div":
        return 1.0 / s if data_index == 0 else None
    return s


def _trace_projection(
    value: ir.Value | None, nodes: list[ir.Node], rotary: dict[str, Rotary], role: str
) -> tuple[Linear, float, list[np.ndarray | None]]:
    """Walks back from a Q/K/V operand to its projection; returns it with any scale met.

    A rotary embedding met on the way is recorded in `rotary[role]`.
    """
    scale = 1.0
    shapes: list[np.ndarray | None] = []
    columns: slice | None = None
    group: tuple[int, int] | None = None  # (g, n): group g of a packed [B, S, n, H, d] QKV
    relays: list[ir.Node] = []  # Reshapes and head Transposes between here and the operand
    while True:
        producer = value.producer() if value is not None else None
        if producer is None:
            raise _NoMatch("projection operand has no producer")
        op = producer.op_type
        if op in PLUMBING:
            if op == "Reshape":
                shape = reshape_entries(producer.inputs[1])
                if group is not None and shape is not None and shape.size == 5:
                    shape = np.delete(shape, 2)  # [B, S, n, H, d] holds [B, S, H, d] per group
                shapes.append(shape)
            if op == "Reshape" or (op == "Transpose" and perm_of(producer) != [0, 1, 3, 2]):
                relays.append(producer)
            nodes.append(producer)
            value = producer.inputs[0]
            continue
        if op == "Add" and role not in rotary and (found := match_rotary(producer)):
            if relays:
                turned = heads_first(found[1], relays[0]) if len(relays) == 1 else None
                if turned is None:
                    raise _NoMatch(f"{_describe(producer)} applies rotary position embeddings "
                                   "outside the (batch, heads, seq, head size) layout")
                found = found[0], turned
            value, rotary[role] = found
            nodes.extend(rotary[role].nodes)
            continue
        if op == "Concat" and role not in rotary and (found := match_partial_rotary(producer)):
            if relays:
                raise _NoMatch(f"{_describe(producer)} applies rotary position embeddings "
                               "outside the (batch, heads, seq, head size) layout")
            value, rotary[role] = found
            nodes.extend(rotary[role].nodes)
            continue
        if op in ("Mul", "Div"):
            s = _scale_of(producer, 0)
            if s is None:
                raise _NoMatch(f"{_describe(producer)} multiplies a projection by a non-scalar"
                               f"{_rotary_hint(producer)}")
            scale *= s
            nodes.append(producer)
            value = producer.inputs[0]
            continue
        if op in ("Split", "Slice") and columns is None and group is None \
                and value is not None and (found_group := packed_group(producer, value)):
            group = found_group
            nodes.append(producer)
            value = producer.inputs[0]
            continue
        if op == "Split" and columns is None and value is not None:
            columns = _split_columns(producer, value)
            nodes.append(producer)
            value = producer.inputs[0]
            continue
        if op == "Slice" and columns is None:
            columns = _slice_columns(producer)
            nodes.append(producer)
            value = producer.inputs[0]
            continue
        linear = _as_linear(producer, columns)
        if linear is None:
            raise _NoMatch(f"{_describe(producer)} sits where a Q/K/V projection was expected"
                           f"{_rotary_hint(producer)}")
        if group is not None:
            packed = group_columns(group, linear.out_features)
            if packed is None:
                raise _NoMatch(f"{_describe(producer)} is {linear.out_features} wide, which "
                               f"its {group[1]} packed Q/K/V groups do not divide")
            linear.columns = packed
        return linear, scale, shapes


def _as_linear(node: ir.Node, columns: slice | None) -> Linear | None:
    """Reads `node` as the end of MatMul(x, W) [+ b] with W constant, else None."""
    bias = None
    if node.op_type == "Add":
        for i in (0, 1):
            operand = node.inputs[i]
            producer = operand.producer() if operand is not None else None
            if (producer is not None and producer.op_type == "MatMul"
                    and const_array(node.inputs[1 - i]) is not None):
                bias, node = node.inputs[1 - i], producer
                break
        else:
            return None
    if node.op_type != "MatMul" or node.inputs[1] is None:
        return None
    weight = node.inputs[1]
    array = const_array(weight)
    if array is None or array.ndim != 2 or weight.const_value is None:
        return None
    if bias is not None:
        b = const_array(bias)
        if b is None or b.size != array.shape[1] or bias.const_value is None:
            return None
    return Linear(weight=weight, bias=bias, matmul=node,
                  columns=columns if columns is not None else slice(0, array.shape[1]))


def _linear_output(lin: Linear) -> ir.Value:
    out = lin.matmul.outputs[0]
    if lin.bias is not None:
        add = next(u for u in out.consumers() if u.op_type == "Add" and lin.bias in u.inputs)
        out = add.outputs[0]
    return out


def _split_columns(split: ir.Node, value: ir.Value) -> slice:
    index = list(split.outputs).index(value)
    axis = split.attributes.get("axis")
    if axis is not None and axis.value not in (-1, 2):
        raise _NoMatch(f"{_describe(split)} splits a fused projection on an unexpected axis")
    sizes = const_array(split.inputs[1]) if len(split.inputs) > 1 else None
    if sizes is None:
        attr = split.attributes.get("split")
        sizes = np.asarray(attr.value) if attr is not None else None
    if sizes is None:
        source = split.inputs[0]
        producer = source.producer() if source is not None else None
        weight = _as_linear(producer, None) if producer is not None else None
        if weight is None:
            raise _NoMatch("split of a non-projection")
        width = weight.out_features // len(split.outputs)
        sizes = np.full(len(split.outputs), width)
    start = int(np.sum(sizes[:index]))
    return slice(start, start + int(sizes[index]))


def _slice_columns(node: ir.Node) -> slice:
    starts, ends = const_array(node.inputs[1]), const_array(node.inputs[2])
    axes = const_array(node.inputs[3]) if len(node.inputs) > 3 else None
    if starts is None or ends is None or (axes is not None and axes.reshape(-1)[0] not in (-1, 2)):
        raise _NoMatch(f"{_describe(node)} slices a projection on an unexpected axis")
    return slice(int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0]))


def _head_size(shapes: Iterable[np.ndarray | None], inner: int) -> int:
    for shape in shapes:
        if shape is None or shape.size != 4:
            continue
        heads, size = int(shape[2]), int(shape[3])
        if size > 0 and inner % size == 0:
            return size
        if heads > 0 and inner % heads == 0:
            return inner // heads
    raise _NoMatch("the head count cannot be read from the reshape shapes")


def _skip_softmax_epilogue(value: ir.Value, nodes: list[ir.Node]) -> tuple[ir.Value, bool]:
    """Steps over Softmax's NaN guard (Where(IsNaN(p), 0, p)), Dropout and Cast."""
    nan_guard = False
    for _ in range(4):
        consumers = list(value.consumers())
        guarded = _skip_nan_guard(value, nodes)
        if guarded is not value:
            value, nan_guard = guarded, True
            continue
        if len(consumers) == 1 and consumers[0].op_type in ("Dropout", "Cast", "Identity"):
            nodes.append(consumers[0])
            value = consumers[0].outputs[0]
            continue
        break
    return value, nan_guard


def _skip_nan_guard(value: ir.Value, nodes: list[ir.Node]) -> ir.Value:
    """Returns Where(IsNaN(value), 0, value)'s output (recording both nodes), else value."""
    isnan = next((c for c in value.consumers() if c.op_type == "IsNaN"), None)
    if isnan is None:
        return value
    where = next((c for c in isnan.outputs[0].consumers() if c.op_type == "Where"
                  and c.inputs[2] is value), None)
    if where is None:
        return value
    nodes.extend([isnan, where])
    return where.outputs[0]


def _trace_output_projection(ctx_mm: ir.Node, nodes: list[ir.Node]) -> tuple[Linear, bool]:
    """Returns the O projection after the context, and whether a NaN guard sits there.

    planer's own attention puts the exporter's NaN guard after the context MatMul
    (passes.head_pruning), where it runs on fewer elements.
    """
    nodes.append(ctx_mm)
    value = _skip_nan_guard(ctx_mm.outputs[0], nodes)
    guarded = value is not ctx_mm.outputs[0]
    for _ in range(8):
        # Exporters read dims off the context with Shape; those readers die with the region.
        consumers = [c for c in value.consumers() if c.op_type != "Shape"]
        if len(consumers) != 1:
            raise _NoMatch("attention context has several readers")
        node = consumers[0]
        if node.op_type in PLUMBING:
            nodes.append(node)
            value = node.outputs[0]
            continue
        if node.op_type == "MatMul" and node.inputs[0] is value:
            out = node.outputs[0]
            add = next((u for u in out.consumers() if u.op_type == "Add"
                        and const_array(other_input(u, out)) is not None), None)
            linear = _as_linear(add if add is not None else node, None)
            if linear is None:
                break
            nodes.append(node)
            if add is not None:
                nodes.append(add)
            return linear, guarded
        break
    raise _NoMatch("no constant output projection after the attention context")


# ---------------------------------------------------------------- FFN


def _find_ffns(graph: ir.Graph) -> list[FfnSpec]:
    found = []
    for node in graph:
        if node.op_type != "MatMul" or const_array(node.inputs[1]) is None:
            continue
        if node.metadata_props.get(PROVENANCE_PASS) == PassName.FFN_TO_MOE:
            continue  # an expert's MLP is a slice of its layer's FFN, not an FFN of its own
        w2 = _as_linear(node, None)
        ffn = _read_ffn(w2) if w2 is not None else None
        if ffn is None:
            continue
        out = _linear_output(ffn.w2)
        if ffn.w2.bias is None:
            bias_add = next((u for u in out.consumers() if u.op_type == "Add"
                             and const_array(other_input(u, out)) is not None), None)
            if bias_add is not None:
                w2 = ffn.w2
                ffn.w2 = Linear(w2.weight, other_input(bias_add, out), w2.matmul, w2.columns)
                out = bias_add.outputs[0]
        ffn.out = out
        found.append(ffn)
    return found


def _read_ffn(w2: Linear) -> FfnSpec | None:
    """Reads act(x·W1)·W2, or a gated FFN (compiler.gated_ffn), ending in `w2`."""
    region = _activation_region(w2.matmul.inputs[0])
    if region is None:
        return read_gated_ffn(w2, _activation_region, lambda n: _as_linear(n, None),
                              _classify_activation)
    act_nodes, root = region
    root_node = root.producer()
    w1 = _as_linear(root_node, None) if root_node is not None else None
    if w1 is None or w1.out_features != w2.in_features or w1.in_features != w2.out_features:
        return None
    x = w1.matmul.inputs[0]
    if x is None:
        return None
    return FfnSpec(block="", x=x, out=_linear_output(w2), w1=w1, w2=w2,
                   activation=_classify_activation(act_nodes), nodes=act_nodes)


def _activation_region(value: ir.Value | None) -> tuple[list[ir.Node], ir.Value] | None:
    """Returns the elementwise nodes producing `value` and the one tensor they start from."""
    start = value.producer() if value is not None else None
    if start is None:
        return None
    region: list[ir.Node] = []
    roots: set[ir.Value] = set()
    stack = [start]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type not in ELEMENTWISE or len(region) > 24:
            return None
        region.append(node)
        for item in node.inputs:
            if item is None:
                continue
            constant = const_array(item)
            if constant is not None:
                if constant.size != 1:
                    return None  # per-channel constants would need slicing too
                continue
            producer = item.producer()
            if producer is not None and producer.op_type in ELEMENTWISE \
                    and not _is_linear_end(producer):
                stack.append(producer)
            else:
                roots.add(item)
    if len(roots) != 1:
        return None
    return region, roots.pop()


def _is_linear_end(node: ir.Node) -> bool:
    return node.op_type == "Add" and _as_linear(node, None) is not None


def _classify_activation(nodes: list[ir.Node]) -> str:
    ops = {n.op_type for n in nodes}
    for n in nodes:
        if n.op_type == "Gelu":
            approx = n.attributes.get("approximate")
            return "gelu_tanh" if approx is not None and approx.value == "tanh" else "gelu"
    if "FastGelu" in ops or "Tanh" in ops:
        return "gelu_tanh"
    if "Erf" in ops or "BiasGelu" in ops:
        return "gelu"
    if "Relu" in ops:
        return "relu"
    if "Sigmoid" in ops:
        return "silu"
    return "+".join(sorted(ops))


# ---------------------------------------------------------------- layers


def _pair_layers(
    attentions: list[AttentionSpec], ffns: list[FfnSpec], order: dict[ir.Node, int]
) -> list[LayerSpec]:
    layers = []
    for i, attn in enumerate(attentions):
        start = _position(order, attn.out)
        stop = order[attentions[i + 1].q.matmul] if i + 1 < len(attentions) else None
        ffn = next((f for f in ffns if order[f.w1.matmul] > start
                    and (stop is None or order[f.w1.matmul] < stop)), None)
        if ffn is None:
            if any(n.metadata_props.get(PROVENANCE_PASS) == PassName.FFN_TO_MOE
                   and BlockId.try_parse(n.metadata_props.get(PROVENANCE_BLOCK))
                   == BlockId(i, "ffn") for n in order):
                raise UnsupportedModelError(
                    f"layer {i}'s FFN was already split into experts by planer (ffn_to_moe); "
                    "reading MoE layers back is not supported yet, so inspect or compile the "
                    "model it came from."
                )
            after = (n for n, k in order.items() if k > start and (stop is None or k < stop))
            raise UnsupportedModelError(
                f"attention block {i} has no feed-forward block after it"
                f"{gated_ffn_hint(after)}; planer needs attention + FFN layers."
            )
        attn.block = str(BlockId(i, "attn"))
        ffn.block = str(BlockId(i, "ffn"))
        layers.append(LayerSpec(index=i, attention=attn, ffn=ffn, norm=_norm_style(attn)))
    return layers


def _norm_style(attn: AttentionSpec) -> str:
    for use in attn.out.consumers():
        if use.op_type != "Add":
            continue
        residual = other_input(use, attn.out)
        if residual is attn.x:
            # A pre-norm layer whose attention norm is Identity (ModernBERT's layer 0) also
            # adds its input back, but its sum goes on unnormalised as the next residual.
            sum_readers = {c.op_type for c in use.outputs[0].consumers()}
            return "pre" if sum_readers - {"LayerNormalization"} else "post"
        if residual is not None and _derives_from(attn.x, residual):
            return "pre"  # a norm (LayerNormalization, or RMSNorm's Pow ... Mul) between
    return "post"


def _derives_from(value: ir.Value, source: ir.Value, depth: int = 8) -> bool:
    """Tells whether `value` is computed from `source` within `depth` nodes."""
    frontier, seen = [value], {id(value)}
    for _ in range(depth):
        producers = [v.producer() for v in frontier]
        frontier = [i for p in producers if p is not None for i in p.inputs
                    if i is not None and id(i) not in seen]
        seen.update(id(v) for v in frontier)
        if any(v is source for v in frontier):
            return True
    return False


def _shares_weights(layers: list[LayerSpec]) -> bool:
    """Tells whether layers share projection weights (ALBERT).

    Passes never edit initializers in place, so a rewritten layer gets its own copy.
    """
    seen: set[int] = set()
    for layer in layers:
        mine = {id(lin.weight) for lin in layer.projections()}
        if mine & seen:
            return True
        seen |= mine
    return False


def _reject_hidden_dependent_scores(attn: AttentionSpec) -> None:
    for op in attn.score_ops:
        for i, item in enumerate(op.inputs):
            if i != op.scores_index and item is not None and _depends_on(item, attn.x, 40):
                source = item.producer()
                where = f" ({_describe(source)})" if source is not None else ""
                raise UnsupportedModelError(
                    f"attention scores add a term computed from the hidden states{where} "
                    "(DeBERTa-style relative-position attention), which planer cannot "
                    "rewrite per head."
                )


def _depends_on(value: ir.Value, target: ir.Value, budget: int) -> bool:
    stack, seen = [value], set()
    while stack and budget > 0:
        item = stack.pop()
        if item is target:
            return True
        if id(item) in seen:
            continue
        seen.add(id(item))
        budget -= 1
        producer = item.producer()
        # A Shape reads only dims, so a mask sized from the hidden states stays value-independent.
        if producer is not None and producer.op_type not in ("Shape", "Size"):
            stack.extend(i for i in producer.inputs if i is not None)
    return False


def _is_fused_qkv(attn: AttentionSpec) -> bool:
    """Tells GPT-2's fused c_attn (a decoder here) from ModernBERT's packed encoder QKV."""
    return attn.q.weight is attn.k.weight and not is_packed(_linear_output(attn.q))


def _vocab_size(graph: ir.Graph, hidden: int) -> int | None:
    for node in graph:
        if node.op_type == "Gather":
            table = const_array(node.inputs[0])
            if table is not None and table.ndim == 2 and table.shape[1] == hidden:
                return int(table.shape[0])
    return None


def _total_params(graph: ir.Graph) -> int:
    total = 0
    for value in graph.initializers.values():
        if value.const_value is not None and value.const_value.dtype.is_floating_point():
            total += int(np.prod(value.const_value.shape.numpy()))
    return total


def _other_macs(graph: ir.Graph, used: set[int]) -> int:
    total = 0
    for node in graph:
        if node.op_type == "MatMul" and id(node) not in used:
            weight = const_array(node.inputs[1])
            if weight is not None and weight.ndim == 2:
                total += int(weight.shape[0] * weight.shape[1])
    return total
