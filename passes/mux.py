"""Multiplexes N instances through one backbone pass (DataMUX / PruMUX), trained later.

Dimensions: B batch, S sequence, D model width, N instances per group, G = ceil(B/N)
groups, R = G·N padded rows, H demux hidden width, P instance-embedding width.

Before:  embeddings ─ x_BSD ─ layers ─ h_BSD ─ last_hidden_state
         mask plumbing ─ m_B.. ─ score Adds of every layer
After:   x_BSD ─ Gather(rows min(r, B-1)) ─ x_RSD ─ Reshape ─ [G,N,S,D] ─ Mul(v_N1D)
              ─ ReduceMean(N) ─ x_GSD ─ layers (unchanged) ─ h_GSD
         m_B.. ─ Gather(rows) ─ Reshape ─ [G,N,..] ─ ReduceMax(N) ─ m_G.. (the group's mask:
              the union of its members', additive masks being 0 where a token is seen)
         h_GSD ─ MatMul(w1h_DH) ─ Unsqueeze ─ [G,1,S,H] ─ Add(c_N1H) ─ Relu ─ MatMul(w2_HD)
              ─ Add(b2) ─ [G,N,S,D] ─ Reshape ─ [R,S,D] ─ Slice(:B) ─ last_hidden_state
         c_NH = p_NP · w1p_PH + b1: instance i's demux is MLP([h ; p_i]) with W1 = [w1h ; w1p]
              split by rows, so h·w1h is computed once per group, not N times.

Padding repeats the last row (edge padding: a padded slot mixes in a copy of a real
instance, whose mask adds nothing to the union) and its outputs are sliced off, so B in
gives B out for any B. The keys v_i are fixed seeded unit-Gaussian vectors; the demux
starts as the identity of h for every slot (W1h = W2 = I, a shift in b1/b2 keeps the
ReLU open) with small random p_i, so recovery (`--recover`) trains the separation.

Every new op is one of Shape, Add, Sub, Div, Mul, Range, Min (row indices), Gather,
Concat, Reshape, ReduceMean, ReduceMax (constant axes), MatMul, Relu, Unsqueeze, Slice
(constant axes): TensorRT 10's parser imports all of them (`compiler.targets.check_ops`
checks it; tests/test_mux.py runs that check). TensorRT itself is not installed here.

Cost of the union mask: a group attends over every position any member uses, so with
uneven lengths the shorter members see the longer one's tokens (they are trained to
tell them apart); callers who batch should sort by length first.

N = 1 emits nothing. Requires: float32 hidden states read once as one rank-3 graph
output; masks the layers read that carry the batch on axis 0 (float).
Preserves: graph inputs/outputs (names, dtypes, dynamic axes).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from planer.compiler.errors import UnsupportedModelError
from planer.compiler.irutil import NodeBuilder, const_array, region_between, replace_uses
from planer.compiler.loading import default_opset
from planer.compiler.names import PROVENANCE_PASS, BlockId, PassName
from planer.compiler.spec import ModelSpec

WIDTHS = (1, 2, 4)
SHIFT = 16.0  # keeps the identity-initialised ReLU open for hidden values above -SHIFT


@dataclasses.dataclass(frozen=True)
class DemuxWeights:
    """The demux MLP shared by the slots: relu(h·w1h + p_i·w1p + b1)·w2 + b2."""

    w1h: np.ndarray  # [D, H]
    w1p: np.ndarray  # [P, H]
    instances: np.ndarray  # [N, P], p_i
    b1: np.ndarray  # [H]
    w2: np.ndarray  # [H, D]
    b2: np.ndarray  # [D]

    @staticmethod
    def identity(n: int, width: int, hidden: int | None = None, *, seed: int = 0,
                 scale: float = 0.02) -> DemuxWeights:
        """Returns a demux whose slots all start near h (to be trained apart).

        With `hidden` below `width`, W1h and W2 are the first `hidden` coordinates'
        identity (the rest start at zero output).
        """
        rng = np.random.default_rng(seed + 1)
        h = hidden or width
        eye = np.eye(width, h, dtype=np.float32)
        return DemuxWeights(
            w1h=eye, w1p=(rng.standard_normal((width, h)) * scale).astype(np.float32),
            instances=(rng.standard_normal((n, width)) * scale).astype(np.float32),
            b1=np.full(h, SHIFT, np.float32), w2=eye.T.copy(),
            b2=np.where(np.arange(width) < h, -SHIFT, 0.0).astype(np.float32))


@dataclasses.dataclass(frozen=True)
class MuxConfig:
    """N instances per backbone row; keys and demux weights default to seeded ones.

    Attributes:
        n: instances mixed per row (1: no rewrite).
        seed: seeds the keys v_i (unit Gaussian) and the demux's initial p_i, w1p.
        hidden: the demux's hidden width H (default D; at most D keeps it cheap).
        keys: [N, D] mixing vectors, replacing the seeded ones (tests pin exact cases).
        demux: demux weights, replacing the identity start.
    """

    n: int = 1
    seed: int = 0
    hidden: int | None = None
    keys: np.ndarray | None = None
    demux: DemuxWeights | None = None

    def resolved_keys(self, width: int) -> np.ndarray:
        if self.keys is not None:
            return np.asarray(self.keys, np.float32).reshape(self.n, width)
        return np.random.default_rng(self.seed).standard_normal((self.n, width)).astype(
            np.float32)


def apply_mux(model: ir.Model, spec: ModelSpec, config: MuxConfig) -> int:
    """Mixes groups of `config.n` rows after the embeddings and demuxes them at the output.

    Returns 1 when the graph was rewritten, 0 for N = 1 (nothing emitted).

    Raises:
        UnsupportedModelError: N is not 1, 2 or 4, or the model's entry, masks or output
            are not in a form the rewrite handles (named).
    """
    if config.n not in WIDTHS:
        raise UnsupportedModelError(f"mux N must be one of {WIDTHS}, not {config.n}.")
    if config.n == 1:
        return 0
    if any(node.metadata_props.get(PROVENANCE_PASS) == PassName.MUX for node in model.graph):
        raise UnsupportedModelError("the model is already multiplexed (it holds planer's mux "
                                    "nodes); compile the original with --mux instead.")
    multiplex(model, stream_entry(spec), hidden_output(model.graph, spec.hidden), config,
              last_layer=len(spec.layers) - 1)
    return 1


def multiplex(model: ir.Model, entry: ir.Value, end: ir.Value, config: MuxConfig, *,
              last_layer: int) -> None:
    """Rewrites the nodes between `entry` [B, S, D] and `end` [B, S, D] to run on groups.

    Every value those nodes read from outside (other than constants and `entry`) is taken
    for a mask and combined per group by its largest value.
    """
    graph = model.graph
    width = entry.shape[-1] if entry.shape is not None else None
    if not isinstance(width, int):
        raise UnsupportedModelError(f"mux needs the width of {entry.name}, which is not known.")
    region = region_between(entry, end)
    masks = _outside_reads(graph, region, entry)
    opset = default_opset(model)
    mux = NodeBuilder(graph, _first_reader(graph, entry), pass_name=PassName.MUX,
                      block=str(BlockId(0, "mux")))
    batch = mux.op("Shape", [entry], "batch", {"start": 0, "end": 1})
    rows = _padded_rows(mux, batch, config.n)
    mixed = _mix(mux, entry, rows, config.resolved_keys(width), opset)
    _redirect(entry, mixed, region)
    for mask in masks:
        _redirect(mask, _union(mux, mask, rows, config.n, opset), region)
    # Inserted before the output's producer; the sort below puts every new node in place.
    demux = NodeBuilder(graph, _producer(end), pass_name=PassName.MUX,
                        block=str(BlockId(last_layer, "demux")))
    weights = config.demux or DemuxWeights.identity(config.n, width, config.hidden,
                                                    seed=config.seed)
    _demux(demux, end, batch, weights)
    for node in graph:  # the layers' values now hold G rows, not the batch their shapes say
        if id(node) in region:
            for value in node.outputs:
                value.shape = None
    TopologicalSortPass()(model)


def stream_entry(spec: ModelSpec) -> ir.Value:
    """Returns layer 0's input on the residual stream (before its LayerNorm if pre-LN)."""
    x = spec.layers[0].attention.x
    producer = x.producer()
    if producer is not None and producer.op_type == "LayerNormalization" and producer.inputs \
            and producer.inputs[0] is not None \
            and any(u.op_type in ("Add", "Sum") for u in producer.inputs[0].consumers()):
        return producer.inputs[0]
    return x


def hidden_output(graph: ir.Graph, width: int) -> ir.Value:
    """Returns the graph output holding the last hidden states [B, S, D].

    Raises:
        UnsupportedModelError: no float rank-3 output of width D, or several.
    """
    found = [v for v in graph.outputs if v.dtype == ir.DataType.FLOAT and v.shape is not None
             and len(v.shape) == 3 and v.shape[-1] == width]
    if len(found) != 1:
        names = ", ".join(str(v.name) for v in graph.outputs)
        raise UnsupportedModelError(f"mux restores rows at the last hidden states [batch, seq, "
                                    f"{width}], which must be one graph output; outputs: {names}.")
    others = [v for v in graph.outputs if v is not found[0]]
    if others:
        raise UnsupportedModelError(f"mux demultiplexes only the hidden-state output "
                                    f"{found[0].name}; {others[0].name} would keep B/N rows.")
    return found[0]


def _outside_reads(graph: ir.Graph, region: set[int], entry: ir.Value) -> list[ir.Value]:
    """Returns the non-constant values the layers read from outside (the masks)."""
    found: dict[int, ir.Value] = {}
    for node in graph:
        if id(node) not in region:
            continue
        for value in node.inputs:
            if value is None or value is entry or const_array(value) is not None:
                continue
            producer = value.producer()
            if producer is None or id(producer) not in region:
                found[id(value)] = value
    for value in found.values():
        if value.dtype != ir.DataType.FLOAT or value.shape is None or not value.shape.rank():
            raise UnsupportedModelError(f"the layers read {value.name} (not a float tensor of "
                                        "known rank), which mux cannot combine per group.")
    return [v for v in found.values() if v.shape is not None and v.shape[0] != 1]


def _padded_rows(b: NodeBuilder, batch: ir.Value, n: int) -> ir.Value:
    """Returns the row indices of the padded batch: min(r, B - 1) for r < ceil(B/N)·N."""
    one = b.const("one", np.array([1], np.int64))
    width = b.const("n", np.array([n], np.int64))
    groups = b.op("Div", [b.op("Add", [batch, b.const("n_minus_1", np.array([n - 1], np.int64))],
                               "rows/Add"), width], "groups")
    total = b.op("Mul", [groups, width], "rows/Mul")
    last = b.op("Sub", [batch, one], "rows/last")
    scalar = b.const("scalar", np.array([], np.int64))
    span = b.op("Range", [b.const("zero", np.array(0, np.int64)),
                          b.op("Reshape", [total, scalar], "rows/total"),
                          b.const("step", np.array(1, np.int64))], "rows/Range")
    return b.op("Min", [span, last], "rows")


def _grouped(b: NodeBuilder, x: ir.Value, rows: ir.Value, n: int, name: str) -> ir.Value:
    """Gathers the padded rows of x and reshapes them to [G, N, ...]."""
    padded = b.op("Gather", [x, rows], f"{name}/pad", {"axis": 0})
    rest = b.op("Shape", [x], f"{name}/rest", {"start": 1})
    head = b.const(f"{name}/head", np.array([-1, n], np.int64))
    shape = b.op("Concat", [head, rest], f"{name}/shape", {"axis": 0})
    return b.op("Reshape", [padded, shape], f"{name}/groups")


def _reduce(b: NodeBuilder, op: str, x: ir.Value, name: str, opset: int) -> ir.Value:
    """Reduces axis 1 away (axes as an input from opset 18, an attribute before)."""
    if opset >= 18:
        axes = b.const(f"{name}/axes", np.array([1], np.int64))
        return b.op(op, [x, axes], name, {"keepdims": 0})
    return b.op(op, [x], name, {"axes": [1], "keepdims": 0})


def _mix(b: NodeBuilder, x: ir.Value, rows: ir.Value, keys: np.ndarray, opset: int) -> ir.Value:
    """Returns mean_i(v_i ⊙ x_i) per group: [G, S, D]."""
    n, width = keys.shape
    grouped = _grouped(b, x, rows, n, "x")
    key = b.const("keys", keys.reshape(n, 1, width))
    return _reduce(b, "ReduceMean", b.op("Mul", [grouped, key], "x/keyed"), "x/mixed", opset)


def _union(b: NodeBuilder, mask: ir.Value, rows: ir.Value, n: int, opset: int) -> ir.Value:
    """Returns the group's mask: the largest (most open) of its members' values."""
    name = f"mask/{_slug(str(mask.name))}"
    return _reduce(b, "ReduceMax", _grouped(b, mask, rows, n, name), f"{name}/union", opset)


def _demux(b: NodeBuilder, h: ir.Value, batch: ir.Value, w: DemuxWeights) -> ir.Value:
    """Restores N rows per group at every position and drops the padded rows."""
    n, hidden = w.instances.shape[0], w.b1.shape[0]
    shared = b.op("MatMul", [h, b.const("w1h", w.w1h)], "w1h/MatMul")
    slots = b.op("Add", [b.op("MatMul", [b.const("instances", w.instances),
                                         b.const("w1p", w.w1p)], "w1p/MatMul"),
                         b.const("b1", w.b1)], "b1/Add")
    slots = b.op("Reshape", [slots, b.const("slots_shape", np.array([n, 1, hidden], np.int64))],
                 "slots")
    wide = b.op("Unsqueeze", [shared, b.const("axis1", np.array([1], np.int64))], "wide")
    act = b.op("Relu", [b.op("Add", [wide, slots], "hidden/Add")], "hidden/Relu")
    out = b.op("Add", [b.op("MatMul", [act, b.const("w2", w.w2)], "w2/MatMul"),
                       b.const("b2", w.b2)], "b2/Add")
    rest = b.op("Shape", [h], "rest", {"start": 1})
    shape = b.op("Concat", [b.const("head", np.array([-1], np.int64)), rest], "shape",
                 {"axis": 0})
    flat = b.op("Reshape", [out, shape], "rows")
    zero, axis0 = b.const("start", np.array([0], np.int64)), b.const("axes", np.array([0],
                                                                                      np.int64))
    result = b.op("Slice", [flat, zero, batch, axis0], "out")
    result.type, result.shape = h.type, h.shape
    replace_uses(h, result)
    for node in b.nodes:  # the demux itself keeps reading h
        for i, value in enumerate(node.inputs):
            if value is result:
                node.replace_input_with(i, h)
    return result


def _redirect(old: ir.Value, new: ir.Value, region: set[int]) -> None:
    """Points the layers' reads of `old` (only theirs) at `new`."""
    for use in list(old.uses()):
        if id(use.node) in region:
            use.node.replace_input_with(use.idx, new)


def _first_reader(graph: ir.Graph, value: ir.Value) -> ir.Node:
    readers = {id(u) for u in value.consumers()}
    return next(node for node in graph if id(node) in readers)


def _producer(value: ir.Value) -> ir.Node:
    node = value.producer()
    if node is None:
        raise UnsupportedModelError(f"{value.name} is not computed by a node.")
    return node


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_." else "_" for c in name)
