"""Removes skimmed tokens from the computation of later layers (Transkimmer, for real).

Dimensions: B batch, S sequence, D model width, H heads, K tokens kept (slots), Hp
predictor width.

Before:  x_BSD ─ layer i ─ ... ─ layer L-1 ─ y_BSD
After:   x_BSD ─ score_BS ─ keep: first token + top-(k_b - 1) real tokens, k_b = ceil(r·n_b)
         ─ Gather ─ x_BKD ─ layer i ─ ... (mask [B,1,1,K] from the kept mask) ─ y_BKD
         ─ write back ─ y_BSD (skimmed positions hold x_BSD, their state where they left,
           or A(x_BSD) = x·W + b where the point has a forwarding map, + c·V with c the
           kept tokens' mean final row where the map has a context term: `skim_forward`)

Scores (higher = keep): the attention each token receives in layer i-1 (mean over heads
and real queries; training-free), the [CLS] row of that attention, or a fitted predictor
LayerNorm ─ MatMul ─ Add ─ GELU ─ MatMul ─ Add on the layer input (`skim_fit` fits it).
Masks are cumulative: a skim point only chooses among the tokens still active; the
always-kept positions (default: the first token) win every choice, padding loses all.
Batch > 1: each sequence keeps its own count k_b, packed into K = max_b k_b slots
(`ort`) or K = ceil(r·K_prev) slots (`tensorrt`, shape-computable); the attention mask
covers the filler slots, and a filler token's output is its state where it left.

Selection is three small sorts of the [B, K_prev] scores (TopK), never NonZero:
rank by score, invert that permutation to get each slot's rank (kept = rank < k_b),
then order kept tokens by position, followed by the rest. Keeping the kept tokens in
their original order makes skim_keep 1.0 reproduce the dense model exactly.

Write-back per lowering:
  ort       ScatterND (unique indices, from NonZero of the active mask) of each stage's
            leaving tokens and the final active tokens onto the first skim point's input.
  tensorrt  no scatter, no NonZero: each skim point gathers its whole input in the new
            order (kept first); unwinding from the last layer, Where(active, later, here),
            Concat the skimmed rows, Gather by the inverse permutation (TopK again).

Requires: attention re-emitted in canonical form (head pruning, all heads kept or not)
so reshapes read no input shapes; an additive mask (Add) in the score ops, if any;
float32; an encoder (positions are not recomputed after the embeddings).
Preserves: graph inputs/outputs and their shapes; layers before the first skim point.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from planer.compiler.errors import PreconditionError
from planer.compiler.irutil import NodeBuilder, is_dead, remove_dead_producers
from planer.compiler.loading import default_opset
from planer.compiler.names import PROVENANCE_BLOCK, PROVENANCE_PASS, BlockId, PassName
from planer.compiler.spec import LayerSpec, ModelSpec
from planer.passes.skim_forward import (
    ForwardMap,
    emit_context,
    emit_context_term,
    emit_forward,
    has_context,
)

logger = logging.getLogger(__name__)

PASS_NAME = PassName.TOKEN_SKIM
# The block of the nodes every skim point shares (token state, write-back): no one layer's.
STATE_BLOCK = "skim"
LOWERINGS = ("ort", "tensorrt")
SCORES = ("attention", "cls")
_F32 = np.float32
_MAX = float(np.finfo(_F32).max)
_MIN = float(np.finfo(_F32).min)  # what transformers adds for masked keys; finite, no NaN
_POS_OFFSET = float(2**23)  # > any position, exact in float32
_COUNT_SLACK = 1e-4  # ceil(0.3 * 10) must be 3, not 4, despite float rounding


def keep_count(ratio: float, active: int) -> int:
    """Returns how many of `active` tokens a skim point with keep ratio `ratio` keeps."""
    return max(1, math.ceil(ratio * active - _COUNT_SLACK))


@dataclasses.dataclass(frozen=True)
class Predictor:
    """A fitted keep scorer: LayerNorm ─ Linear(D, Hp) ─ GELU(erf) ─ Linear(Hp, 1)."""

    gamma: np.ndarray  # [D]
    beta: np.ndarray  # [D]
    w1: np.ndarray  # [D, Hp]
    b1: np.ndarray  # [Hp]
    w2: np.ndarray  # [Hp]
    b2: float
    epsilon: float = 1e-5

    def score(self, x: np.ndarray) -> np.ndarray:
        """Scores rows of `x` [..., D] in numpy (the graph computes the same)."""
        from scipy.special import erf

        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        z = (x - mu) / np.sqrt(var + self.epsilon) * self.gamma + self.beta
        h = z @ self.w1 + self.b1
        h = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
        return h @ self.w2 + self.b2


@dataclasses.dataclass(frozen=True)
class TokenSkimConfig:
    """Where tokens are skimmed and how they are chosen.

    Attributes:
        keep: layer index -> r, the fraction of the still-active tokens kept entering that
            layer. A layer listed with 1.0 still drops padding there (all real tokens
            stay); layers not listed keep their input as is.
        score: training-free score where no predictor is given: "attention" (attention
            received in the previous layer) or "cls" (the first token's attention row).
        predictors: layer index -> fitted Predictor, used instead of `score` there.
        lowering: "ort" or "tensorrt" (see the module docstring).
        always_keep: original positions kept at every skim point ([CLS] by default).
        forward: layer index -> ForwardMap applied to the rows that point lets go
            (`skim_forward`); points without one forward the state as is.
    """

    keep: Mapping[int, float]
    score: str = "attention"
    predictors: Mapping[int, Predictor] = dataclasses.field(default_factory=dict)
    lowering: str = "ort"
    always_keep: tuple[int, ...] = (0,)
    forward: Mapping[int, ForwardMap] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.lowering not in LOWERINGS:
            raise ValueError(f"lowering must be one of {LOWERINGS}, not {self.lowering!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, not {self.score!r}")
        for layer, r in self.keep.items():
            if not 0.0 < r <= 1.0:
                raise ValueError(f"layer {layer}: skim keep ratio {r} is not in (0, 1]")

    @staticmethod
    def from_plan(skim_keep: Sequence[float | None], **kwargs: Any) -> TokenSkimConfig:
        """Builds the config for a Plan's per-layer `skim_keep` (None and 1.0 skim nothing)."""
        keep = {i: float(r) for i, r in enumerate(skim_keep) if r is not None and r < 1.0}
        return TokenSkimConfig(keep=keep, **kwargs)


def apply_token_skim(model: ir.Model, spec: ModelSpec, config: TokenSkimConfig) -> int:
    """Skims tokens before the configured layers; returns how many skim points were added.

    Raises:
        PreconditionError: the graph does not meet the requirements in the module
            docstring (the message says which).
    """
    points = sorted(config.keep)
    if not points:
        return 0
    _check(model, spec, config, points)
    graph = model.graph
    opset = default_opset(model)
    first = spec.layers[points[0]]
    # Anchors are taken before any skim node reads the layer inputs.
    anchors = {i: _first_reader(graph, stream_in(spec.layers[i])) for i in points}
    state = _initial_state(graph, first, anchors[points[0]])
    state_start = next(n for n in graph if n.metadata_props.get(PROVENANCE_BLOCK) == STATE_BLOCK)
    stages: list[_Stage] = []
    for index in points:
        layer = spec.layers[index]
        b = NodeBuilder(graph, anchors[index], pass_name=PASS_NAME,
                        block=str(BlockId(index, "skim")))
        # The layer's own input: computed by the layers before it on the previous slots.
        state = dataclasses.replace(state, h=stream_in(layer))
        score = _score(b, spec, layer, state, config, opset)
        stage = _skim(b, state, score, config.keep[index], config, opset)
        _redirect_readers(stream_in(layer), stage.h_next)
        stages.append(stage)
        state = _State(stage.h_next, stage.active_next, stage.pos_next, stage.mask_add)
    for layer in spec.layers[points[0]:]:
        point = max(i for i in points if i <= layer.index)
        _rewire_mask(layer, stages[points.index(point)].mask_add, point)
    _write_back(graph, spec, stages, state, config, opset)
    _forget_shapes(graph, state_start)
    # Each stage builds the next stage's state; what no later stage or lowering read (the
    # last stage's positions, the first stage's leavers under scatter) goes now.
    for node in reversed(list(graph)):
        if (node.graph is graph and node.metadata_props.get(PROVENANCE_PASS) == PASS_NAME
                and is_dead(node)):
            remove_dead_producers(node.outputs[0])
    return len(points)


def active_masks(model: ir.Model) -> dict[int, ir.Value]:
    """Returns, per skim point (layer index), the [B, K] mask of the slots it kept (1/0).

    Works on a model read back from disk: the nodes are found by their provenance (this
    pass, block `layer<i>/skim`), never by value names, and the mask is the one float Cast
    of a Less in that block (`_skim`: slot index < kept count).

    Raises:
        ValueError: a skim block holds more than one such mask.
    """
    masks: dict[int, ir.Value] = {}
    for node in model.graph:
        block = BlockId.try_parse(node.metadata_props.get(PROVENANCE_BLOCK))
        if node.metadata_props.get(PROVENANCE_PASS) != PASS_NAME or block is None \
                or block.sub != "skim" or node.op_type != "Cast":
            continue
        source = node.inputs[0].producer() if node.inputs[0] is not None else None
        if source is None or source.op_type != "Less" \
                or source.metadata_props.get(PROVENANCE_BLOCK) != str(block):
            continue
        if block.layer in masks:
            raise ValueError(f"{block} holds more than one active mask")
        masks[block.layer] = node.outputs[0]
    return masks


def _check(model: ir.Model, spec: ModelSpec, config: TokenSkimConfig, points: list[int]) -> None:
    if spec.kind != "encoder":
        raise PreconditionError(
            "token skimming needs an encoder; a decoder's causal mask and cache depend on "
            "positions that removing tokens would shift."
        )
    for index in points:
        if not 0 <= index < len(spec.layers):
            raise PreconditionError(f"skim layer {index} does not exist "
                                    f"(the model has {len(spec.layers)} layers).")
        if index == 0 and index not in config.predictors:
            raise PreconditionError(
                "skimming before layer 0 needs a fitted predictor: the training-free "
                "scores read the previous layer's attention, and layer 0 has none."
            )
    for layer in spec.layers[points[0]:]:
        softmax = layer.attention.nodes[0]
        if softmax.metadata_props.get(PROVENANCE_PASS) != PassName.HEAD_PRUNING:
            raise PreconditionError(
                f"{layer.attention.block} is not in canonical form; run head pruning (all "
                "heads kept is fine) before token skimming, so attention reshapes stop "
                "reading the sequence length from the model inputs."
            )
        if layer.attention.q.w().dtype != _F32:
            raise PreconditionError("token skimming supports float32 models only.")
        if layer.attention.rotary:
            raise PreconditionError(
                f"{layer.attention.block} applies rotary position embeddings, whose angles "
                "follow token positions; token skimming does not yet gather them with the "
                "kept tokens, so it cannot skim before or through this layer."
            )
    for index, fmap in config.forward.items():
        if index not in config.keep or fmap.b.shape[0] != spec.hidden:
            raise PreconditionError(f"the forwarding map of layer {index} fits no skim point "
                                    f"of width {spec.hidden}.")
    if default_opset(model) < 13:
        raise PreconditionError("token skimming needs opset 13 or later.")


def stream_in(layer: LayerSpec) -> ir.Value:
    """Returns the residual stream entering the layer (post-LN: attn.x; pre-LN: LN input)."""
    x = layer.attention.x
    if layer.norm == "pre":
        producer = x.producer()
        source = producer.inputs[0] if producer is not None else None
        if producer is None or producer.op_type != "LayerNormalization" or source is None:
            raise PreconditionError(f"{layer.block}: pre-LN input is not a LayerNorm.")
        return source
    return x


def stream_out(layer: LayerSpec) -> ir.Value:
    """Returns the residual stream leaving the layer (post-LN: after its output LayerNorm)."""
    add = next((u for u in layer.ffn.out.consumers() if u.op_type == "Add"), None)
    if add is None:
        raise PreconditionError(f"{layer.block}: the FFN output feeds no residual Add.")
    if layer.norm == "pre":
        return add.outputs[0]
    ln = next((u for u in add.outputs[0].consumers() if u.op_type == "LayerNormalization"), None)
    if ln is None:
        raise PreconditionError(f"{layer.block}: no LayerNorm after the FFN residual.")
    return ln.outputs[0]


def _first_reader(graph: ir.Graph, value: ir.Value) -> ir.Node:
    readers = {id(n) for n in value.consumers()}
    node = next((n for n in graph if id(n) in readers), None)
    if node is None:
        raise PreconditionError(f"the layer input {value.name} has no readers.")
    return node


def _redirect_readers(old: ir.Value, new: ir.Value) -> None:
    """Points the model's readers of `old` at `new`; the skim nodes keep reading `old`."""
    for use in list(old.uses()):
        if use.node.metadata_props.get(PROVENANCE_PASS) != PASS_NAME:
            use.node.replace_input_with(use.idx, new)


# ---------------------------------------------------------------- state and scores


@dataclasses.dataclass
class _State:
    """The token set entering a skim point: hidden rows, active mask, original positions."""

    h: ir.Value  # [B, K, D]
    active: ir.Value  # [B, K] float 1/0
    pos: ir.Value  # [B, K] int64 original positions
    mask_add: ir.Value | None  # [B, 1, 1, K] additive mask, None before the first point


@dataclasses.dataclass
class _Stage:
    """What one skim point produced (the write-back reads it)."""

    block: str
    h_in: ir.Value  # [B, K, D] its input
    active_in: ir.Value  # [B, K]
    pos_in: ir.Value  # [B, K]
    leaving: ir.Value  # [B, K] bool: active here, not kept
    perm: ir.Value  # [B, K] kept first (by position), then the rest
    slots: ir.Value  # [1] int64 slots kept
    h_all: ir.Value | None  # [B, K, D] input rows in `perm` order (tensorrt)
    h_next: ir.Value
    active_next: ir.Value
    pos_next: ir.Value
    mask_add: ir.Value


def _initial_state(graph: ir.Graph, layer: LayerSpec, anchor: ir.Node) -> _State:
    h = stream_in(layer)
    b = NodeBuilder(graph, anchor, pass_name=PASS_NAME, block=STATE_BLOCK)
    mask = next((v for v in graph.inputs if v.name == "attention_mask"), None)
    shape_h = b.op("Shape", [h], "shape_BSD")
    shape_bs = b.op("Slice", [shape_h, _i64(b, "zero", [0]), _i64(b, "two", [2])], "shape_BS")
    if mask is None:  # no padding possible: every token is real
        active = b.op("ConstantOfShape", [shape_bs], "active_BS",
                      {"value": ir.tensor(np.array([1.0], dtype=_F32))})
    else:
        active = b.op("Cast", [mask], "active_BS", {"to": ir.DataType.FLOAT})
    seq = b.op("Gather", [shape_h, _i64(b, "one_scalar", 1)], "seq_len", {"axis": 0})
    ramp = b.op("Range", [_i64(b, "zero_scalar", 0), seq, _i64(b, "one_step", 1)], "range_S")
    pos = b.op("Expand", [ramp, shape_bs], "pos_BS")
    return _State(h, active, pos, None)


def _score(b: NodeBuilder, spec: ModelSpec, layer: LayerSpec, state: _State,
           config: TokenSkimConfig, opset: int) -> ir.Value:
    """Returns [B, K] keep scores of the tokens entering `layer` (higher = keep)."""
    predictor = config.predictors.get(layer.index)
    if predictor is not None:
        return _predictor_score(b, predictor, state.h, opset)
    probs = spec.layers[layer.index - 1].attention.nodes[0].outputs[0]  # Softmax, [B,H,K,K]
    heads = b.op("ReduceSum", [probs, _i64(b, "axis_heads", [1])], "score/ReduceSum_heads",
                 {"keepdims": 0})  # [B, K, K]; the 1/H of a mean does not change the ranking
    if config.score == "cls":
        return b.op("Gather", [heads, _i64(b, "first_query", 0)], "score/cls_row", {"axis": 1})
    queries = _unsqueeze(b, state.active, [1], "score/active_B1K", opset)
    received = b.op("MatMul", [queries, heads], "score/received")  # real queries only
    return _squeeze(b, received, [1], "score/received_BK", opset)


def _predictor_score(b: NodeBuilder, p: Predictor, h: ir.Value, opset: int) -> ir.Value:
    gamma, beta = b.const("predictor/gamma", p.gamma.astype(_F32)), b.const(
        "predictor/beta", p.beta.astype(_F32))
    if opset >= 17:
        z = b.op("LayerNormalization", [h, gamma, beta], "predictor/LayerNorm",
                 {"axis": -1, "epsilon": p.epsilon})
    else:
        z = _layer_norm(b, h, gamma, beta, p.epsilon, opset)
    y = b.op("MatMul", [z, b.const("predictor/w1", p.w1.astype(_F32))], "predictor/fc1/MatMul")
    y = b.op("Add", [y, b.const("predictor/b1", p.b1.astype(_F32))], "predictor/fc1/Add")
    erf = b.op("Erf", [b.op("Mul", [y, _f32(b, "predictor/inv_sqrt2", 1 / math.sqrt(2))],
                            "predictor/gelu/Scale")], "predictor/gelu/Erf")
    erf = b.op("Add", [erf, _f32(b, "predictor/one", 1.0)], "predictor/gelu/Add")
    y = b.op("Mul", [b.op("Mul", [y, _f32(b, "predictor/half", 0.5)], "predictor/gelu/Half"),
                     erf], "predictor/gelu/Mul")
    w2 = b.const("predictor/w2", p.w2.astype(_F32).reshape(-1, 1))
    y = b.op("MatMul", [y, w2], "predictor/fc2/MatMul")
    y = b.op("Add", [y, _f32(b, "predictor/b2", p.b2)], "predictor/fc2/Add")
    return _squeeze(b, y, [2], "predictor/score_BK", opset)


def _layer_norm(b: NodeBuilder, h: ir.Value, gamma: ir.Value, beta: ir.Value, eps: float,
                opset: int) -> ir.Value:
    mean = _reduce(b, "ReduceMean", h, [-1], "predictor/ln/mean", opset, keepdims=1)
    d = b.op("Sub", [h, mean], "predictor/ln/Sub")
    var = _reduce(b, "ReduceMean", b.op("Mul", [d, d], "predictor/ln/Square"), [-1],
                  "predictor/ln/var", opset, keepdims=1)
    std = b.op("Sqrt", [b.op("Add", [var, _f32(b, "predictor/ln/eps", eps)], "predictor/ln/Add")],
               "predictor/ln/Sqrt")
    z = b.op("Div", [d, std], "predictor/ln/Div")
    return b.op("Add", [b.op("Mul", [z, gamma], "predictor/ln/Mul"), beta], "predictor/ln/Shift")


# ---------------------------------------------------------------- selection and gather


def _skim(b: NodeBuilder, state: _State, score: ir.Value, ratio: float,
          config: TokenSkimConfig, opset: int) -> _Stage:
    """Chooses the kept tokens of one skim point and gathers them into fewer slots."""
    shape_h = b.op("Shape", [state.h], "shape_BKD")
    k_in = b.op("Slice", [shape_h, _i64(b, "one", [1]), _i64(b, "two", [2])], "slots_in")
    live = b.op("Greater", [state.active, _f32(b, "half", 0.5)], "live_BK")
    forced = _forced(b, state.pos, config.always_keep)
    z = b.op("Where", [live, score, _f32(b, "lowest", _MIN)], "score_live")
    z = b.op("Where", [forced, _f32(b, "highest", _MAX), z], "score_forced")
    # Per-sequence count k_b = ceil(r * n_b); the slack keeps float rounding from adding one.
    n = _reduce(b, "ReduceSum", state.active, [1], "active_count_B1", opset, keepdims=1)
    k = b.op("Ceil", [b.op("Sub", [b.op("Mul", [n, _f32(b, "ratio", ratio)], "count_scaled"),
                                   _f32(b, "slack", _COUNT_SLACK)], "count_slack")], "keep_B1")
    k = b.op("Max", [k, _f32(b, "at_least_one", 1.0)], "keep_at_least_one_B1")
    by_score = _topk_indices(b, z, k_in, "by_score")
    rank = _topk_indices(b, b.op("Neg", [b.op("Cast", [by_score], "by_score_f",
                                              {"to": ir.DataType.FLOAT})], "by_score_neg"),
                         k_in, "rank")  # inverse permutation: each slot's rank
    kept = b.op("Less", [b.op("Cast", [rank], "rank_f", {"to": ir.DataType.FLOAT}), k], "kept_BK")
    pos_f = b.op("Cast", [state.pos], "pos_f", {"to": ir.DataType.FLOAT})
    neg_pos = b.op("Neg", [pos_f], "pos_neg")
    key = b.op("Where", [kept, neg_pos, b.op("Sub", [neg_pos, _f32(b, "offset", _POS_OFFSET)],
                                              "pos_neg_offset")], "order_key")
    perm = _topk_indices(b, key, k_in, "perm")  # kept by position, then the rest
    slots = _slots(b, k, k_in, ratio, config.lowering, opset)
    sel = b.op("Slice", [perm, _i64(b, "zero", [0]), slots, _i64(b, "one", [1])], "selected_BK")
    h_all = None
    if config.lowering == "tensorrt":
        h_all = _gather_rows(b, state.h, perm, shape_h, "rows_all")
        h_next = b.op("Slice", [h_all, _i64(b, "zero", [0]), slots, _i64(b, "one", [1])],
                      "h_kept_BKD")
    else:
        h_next = _gather_rows(b, state.h, sel, shape_h, "rows_kept")
    ramp = b.op("Range", [_i64(b, "zero_scalar", 0), _squeeze(b, slots, [0], "slots_scalar", opset),
                          _i64(b, "one_step", 1)], "slot_range")
    ramp_f = b.op("Cast", [ramp], "slot_range_f", {"to": ir.DataType.FLOAT})
    active_next = b.op("Cast", [b.op("Less", [ramp_f, k], "active_next_b")], "active_next",
                       {"to": ir.DataType.FLOAT})
    pos_next = b.op("GatherElements", [state.pos, sel], "pos_next", {"axis": 1})
    leaving = b.op("And", [live, b.op("Not", [kept], "not_kept")], "leaving_BK")
    mask = b.op("Mul", [b.op("Sub", [_f32(b, "one_f", 1.0), active_next], "masked"),
                        _f32(b, "mask_min", _MIN)], "mask_add_BK")
    mask = _unsqueeze(b, mask, [1, 2], "mask_add_B11K", opset)
    return _Stage(b.block, state.h, state.active, state.pos, leaving, perm, slots, h_all,
                  h_next, active_next, pos_next, mask)


def _forced(b: NodeBuilder, pos: ir.Value, positions: tuple[int, ...]) -> ir.Value:
    forced = None
    for p in positions:
        hit = b.op("Equal", [pos, _i64(b, f"always_keep_{p}", p)], f"always_keep_{p}")
        forced = hit if forced is None else b.op("Or", [forced, hit], f"always_keep_or_{p}")
    if forced is None:
        forced = b.op("Equal", [pos, _i64(b, "never", -1)], "always_keep_none")
    return forced


def _slots(b: NodeBuilder, k: ir.Value, k_in: ir.Value, ratio: float, lowering: str,
           opset: int) -> ir.Value:
    """Returns the [1] slot count: max_b k_b (ort) or ceil(r * K_in) from the shape (tensorrt)."""
    if lowering == "ort":
        most = _reduce(b, "ReduceMax", k, [0, 1], "slots_f", opset, keepdims=0)
        most = _unsqueeze(b, most, [0], "slots_f1", opset)
    else:
        k_in_f = b.op("Cast", [k_in], "slots_in_f", {"to": ir.DataType.FLOAT})
        most = b.op("Ceil", [b.op("Sub", [b.op("Mul", [k_in_f, _f32(b, "ratio", ratio)],
                                               "slots_scaled"),
                                          _f32(b, "slack", _COUNT_SLACK)], "slots_slack")],
                    "slots_f")
        most = b.op("Max", [most, _f32(b, "at_least_one", 1.0)], "slots_at_least_one")
    return b.op("Cast", [most], "slots", {"to": ir.DataType.INT64})


def _topk_indices(b: NodeBuilder, x: ir.Value, k: ir.Value, name: str) -> ir.Value:
    node = ir.node("TopK", [x, k], attributes={"axis": -1, "largest": 1, "sorted": 1},
                   num_outputs=2, name=f"{b.block}/{name}/TopK",
                   metadata_props={PROVENANCE_PASS: b.pass_name, PROVENANCE_BLOCK: b.block})
    node.outputs[0].name = f"{b.block}/{name}/TopK_values"
    node.outputs[1].name = f"{b.block}/{name}/TopK_out"
    b.graph.insert_before(b.anchor, node)
    b.nodes.append(node)
    return node.outputs[1]


def _gather_rows(b: NodeBuilder, h: ir.Value, index: ir.Value, shape_h: ir.Value,
                 name: str) -> ir.Value:
    """Returns h[b, index[b, t], :] for every b, t: one Gather on the flattened rows."""
    batch = b.op("Gather", [shape_h, _i64(b, "zero_scalar", 0)], f"{name}/batch", {"axis": 0})
    seq = b.op("Gather", [shape_h, _i64(b, "one_scalar", 1)], f"{name}/seq", {"axis": 0})
    total = b.op("Mul", [batch, seq], f"{name}/rows")
    start = b.op("Range", [_i64(b, "zero_scalar", 0), total, seq], f"{name}/row_start")
    start = b.op("Unsqueeze", [start, _i64(b, "axis_one", [1])], f"{name}/row_start_B1")
    flat_index = b.op("Add", [index, start], f"{name}/flat_index")
    width = b.op("Slice", [shape_h, _i64(b, "two", [2]), _i64(b, "three", [3])], f"{name}/width")
    flat_shape = b.op("Concat", [_i64(b, "minus_one", [-1]), width], f"{name}/flat_shape",
                      {"axis": 0})
    flat = b.op("Reshape", [h, flat_shape], f"{name}/flat")
    return b.op("Gather", [flat, flat_index], f"{name}/Gather", {"axis": 0})


# ---------------------------------------------------------------- masks


def _rewire_mask(layer: LayerSpec, mask_add: ir.Value, point: int) -> None:
    """Points the layer's additive attention mask at the skim point's [B,1,1,K] mask."""
    attn = layer.attention
    score_nodes = [n for n in attn.nodes[1:] if n.op_type in ("Add", "Sub", "Mul", "Div",
                                                              "Where", "Cast")]
    for step in attn.score_ops:
        operands = [v for j, v in enumerate(step.inputs) if j != step.scores_index]
        if step.op_type != "Add":
            raise PreconditionError(
                f"{attn.block} masks its scores with {step.op_type}; token skimming can only "
                "shorten an additive (Add) attention mask."
            )
        for node in score_nodes:
            if node.op_type != "Add":
                continue
            for j, item in enumerate(node.inputs):
                if any(item is v for v in operands) and j != step.scores_index:
                    node.replace_input_with(j, mask_add)
        # A skim point before layer 0 replaces every layer's mask, so the model's own
        # mask path is read by nothing any more; it goes with its last reader.
        for value in operands:
            if value is not None:
                remove_dead_producers(value)
    logger.debug("%s: mask from skim point %d", attn.block, point)


# ---------------------------------------------------------------- write-back


def _write_back(graph: ir.Graph, spec: ModelSpec, stages: list[_Stage], final: _State,
                config: TokenSkimConfig, opset: int) -> None:
    """Scatters the last layer's rows back to full length; skimmed rows hold their exit state."""
    y = stream_out(spec.layers[-1])
    uses = list(y.uses())
    producer = y.producer()
    assert producer is not None
    b = NodeBuilder(graph, producer, pass_name=PASS_NAME, block=f"{STATE_BLOCK}/write_back")
    if config.lowering == "ort":
        full = _write_back_scatter(b, stages, final, y, config)
    else:
        full = _write_back_permute(b, stages, final, y, config)
    graph.remove(b.nodes)  # built before the producer; they read y, so move them after it
    graph.insert_after(producer, b.nodes)
    for use in uses:
        use.node.replace_input_with(use.idx, full)
    if y.is_graph_output():
        outputs = graph.outputs
        index = next(i for i, v in enumerate(outputs) if v is y)
        name = y.name
        y.name = f"{name}/skim_kept"
        full.name, full.type, full.shape = name, y.type, y.shape
        outputs[index] = full


def _write_back_scatter(b: NodeBuilder, stages: list[_Stage], final: _State, y: ir.Value,
                        config: TokenSkimConfig) -> ir.Value:
    first = _layer_of(stages[0])
    context = emit_context(b, y, final.active) if has_context(config.forward) else None
    term = emit_context_term(b, context, first, config.forward.get(first), "stage0")
    full = emit_forward(b, stages[0].h_in, first, config.forward.get(first), "stage0",
                        context=None if term is None else _unsqueeze(
                            b, term, [1], "stage0/forward/context_B1D", 13))
    for i, stage in enumerate(stages[1:], start=1):
        layer = _layer_of(stage)
        full = _scatter_rows(b, full, stage.leaving, stage.pos_in, stage.h_in, f"stage{i}",
                             forward=(layer, config.forward.get(layer)), context=context)
    live = b.op("Greater", [final.active, _f32(b, "half", 0.5)], "final_live")
    return _scatter_rows(b, full, live, final.pos, y, "final")


def _scatter_rows(b: NodeBuilder, full: ir.Value, which: ir.Value, pos: ir.Value, rows: ir.Value,
                  name: str, *, forward: tuple[int, ForwardMap | None] = (-1, None),
                  context: ir.Value | None = None) -> ir.Value:
    """Sets full[b, pos[b, t]] = A(rows[b, t]) where which[b, t] (ScatterND, unique indices).

    A is `forward`'s map of that point (only the scattered rows are mapped), else none;
    `context` is c [B, D] for a map with a context term (each row reads its sequence's).
    """
    nz = b.op("Transpose", [b.op("NonZero", [which], f"{name}/NonZero")], f"{name}/slots_N2",
              {"perm": [1, 0]})
    target = b.op("GatherND", [pos, nz], f"{name}/positions_N")
    batch = b.op("Gather", [nz, _i64(b, "zero_scalar", 0)], f"{name}/batch_N", {"axis": 1})
    axis = _i64(b, "axis_one", [1])
    index = b.op("Concat", [b.op("Unsqueeze", [batch, axis], f"{name}/batch_N1"),
                            b.op("Unsqueeze", [target, axis], f"{name}/positions_N1")],
                 f"{name}/index_N2", {"axis": 1})
    term = emit_context_term(b, context, *forward, name)
    if term is not None:  # c · v of each row's sequence: [B, D] gathered to [N, D]
        term = b.op("Gather", [term, batch], f"{name}/forward/context_ND", {"axis": 0})
    values = emit_forward(b, b.op("GatherND", [rows, nz], f"{name}/rows_ND"), *forward, name,
                          context=term)
    return b.op("ScatterND", [full, index, values], f"{name}/ScatterND")


def _write_back_permute(b: NodeBuilder, stages: list[_Stage], final: _State,
                        y: ir.Value, config: TokenSkimConfig) -> ir.Value:
    out = y
    active = final.active
    context = emit_context(b, y, final.active) if has_context(config.forward) else None
    for i in range(len(stages) - 1, -1, -1):
        stage = stages[i]
        assert stage.h_all is not None
        layer = _layer_of(stage)
        # Every row not taken from `out` left here (skimmed, or a filler slot): mapped.
        term = emit_context_term(b, context, layer, config.forward.get(layer), f"stage{i}")
        h_all = emit_forward(b, stage.h_all, layer, config.forward.get(layer), f"stage{i}",
                             context=None if term is None else _unsqueeze(
                                 b, term, [1], f"stage{i}/forward/context_B1D", 13))
        live = b.op("Greater", [active, _f32(b, "half", 0.5)], f"stage{i}/live_BK")
        live = b.op("Unsqueeze", [live, _i64(b, "axis_two", [2])], f"stage{i}/live_BK1")
        kept_in = b.op("Slice", [h_all, _i64(b, "zero", [0]), stage.slots,
                                 _i64(b, "one", [1])], f"stage{i}/rows_kept_in")
        merged = b.op("Where", [live, out, kept_in], f"stage{i}/merged")
        rest = b.op("Slice", [h_all, stage.slots, _i64(b, "max", [2**62]),
                              _i64(b, "one", [1])], f"stage{i}/rows_skimmed")
        ordered = b.op("Concat", [merged, rest], f"stage{i}/rows_perm", {"axis": 1})
        shape_h = b.op("Shape", [stage.h_in], f"stage{i}/shape_BKD")
        k_in = b.op("Slice", [shape_h, _i64(b, "one", [1]), _i64(b, "two", [2])],
                    f"stage{i}/slots_in")
        perm_f = b.op("Cast", [stage.perm], f"stage{i}/perm_f", {"to": ir.DataType.FLOAT})
        inverse = _topk_indices(b, b.op("Neg", [perm_f], f"stage{i}/perm_neg"), k_in,
                                f"stage{i}/inverse")
        out = _gather_rows(b, ordered, inverse, shape_h, f"stage{i}/unpermute")
        active = stage.active_in
    return out


# ---------------------------------------------------------------- small helpers


def _layer_of(stage: _Stage) -> int:
    return BlockId.parse(stage.block).layer


def _forget_shapes(graph: ir.Graph, start: ir.Node) -> None:
    """Drops recorded shapes from `start` on: sequence dims there are now K."""
    seen = False
    outputs = {id(v) for v in graph.outputs}
    for node in graph:
        seen = seen or node is start
        if not seen:
            continue
        for value in node.outputs:
            if id(value) not in outputs:
                value.shape = None


def _i64(b: NodeBuilder, name: str, value: int | list[int]) -> ir.Value:
    return _const(b, name, np.array(value, dtype=np.int64))


def _f32(b: NodeBuilder, name: str, value: float) -> ir.Value:
    return _const(b, name, np.array(value, dtype=_F32))


def _const(b: NodeBuilder, name: str, array: np.ndarray) -> ir.Value:
    """Returns the block's constant `name`, registering it once (0-d arrays stay 0-d)."""
    full = f"{b.block}/const/{name}"
    if full in b.graph.initializers:
        return b.graph.initializers[full]
    return b.const(f"const/{name}", array)


def _unsqueeze(b: NodeBuilder, x: ir.Value, axes: list[int], name: str, opset: int) -> ir.Value:
    return b.op("Unsqueeze", [x, _i64(b, f"axes_{'_'.join(map(str, axes))}", axes)], name)


def _squeeze(b: NodeBuilder, x: ir.Value, axes: list[int], name: str, opset: int) -> ir.Value:
    return b.op("Squeeze", [x, _i64(b, f"axes_{'_'.join(map(str, axes))}", axes)], name)


def _reduce(b: NodeBuilder, op: str, x: ir.Value, axes: list[int], name: str, opset: int,
            *, keepdims: int) -> ir.Value:
    if op == "ReduceSum" or opset >= 18:
        return b.op(op, [x, _i64(b, f"axes_{'_'.join(map(str, axes))}", axes)], name,
                    {"keepdims": keepdims})
    return b.op(op, [x], name, {"axes": axes, "keepdims": keepdims})
