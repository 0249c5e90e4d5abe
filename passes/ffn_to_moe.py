"""Rewrites dense FFN blocks as mixture-of-experts blocks that skip unchosen experts' work.

Dimensions: B batch, S sequence, T = B·S tokens, D model width, F FFN width, E experts,
G = F/E neurons per expert, h router width, n tokens an expert runs on, C capacity.

Before:  x_BSD ─ MatMul(w1_DF) ─ Add ─ act ─ MatMul(w2_FD) ─ Add(b2) ─ y_BSD
Router:  x_TD ─ MatMul(r1_Dh) ─ Add ─ Relu ─ MatMul(r2_hE) ─ Add ─ Abs ─ r_TE
Select:  top-k: r_TE >= k-th best (TopK)      dynamic-k: r_TE >= (1 - tau)·max r
         And(real-token mask from attention_mask): padding tokens choose no expert
After, target "ort", lowering "gather" (any selection; the default):
         pairs keyed by expert: top-k (t, j < k) keyed TopK's j-th expert id, dynamic-k
         (t, e) keyed e if chosen; padding / unchosen pairs keyed E
         ─ TopK(ascending, K = #chosen) sorts them by expert ─ Gather(x_TD, t)
         ─ Split(per-expert counts) ─ E expert MLPs (act replayed) ─ Concat(+ zero row)
         ─ Gather(rank of each pair; the zero row for unchosen) ─ ReduceSum over a
         token's pairs ─ Add(b2) ─ Reshape ─ y_BSD
After, target "ort", lowering "scatter" (any selection; the older, slower chain):
         for e: NonZero(sel[:, e]) ─ GatherND(x_TD) ─ expert MLP ─
                acc = ScatterND(acc, idx, GatherND(acc, idx) + y) ─ Add(b2) ─ y_BSD
After, target "ort", lowering "kernel" (static top-k, act in {relu, gelu_tanh}):
         NonZero(real tokens) ─ GatherND ─ router ─ TopK ─ ScatterElements(0 chosen,
         -1e4 else) ─ com.microsoft.MoE(fc2 scaled by k) ─ ScatterND ─ Add(b2) ─ y_BSD
After, target "tensorrt" (shape-computable, fixed expert capacity C):
         score = Where(sel, r, -1), padded with C rows of -1 (and x with C zero rows)
         for e: TopK(score[:, e], C) ─ Gather rows ─ expert MLP ─ Mul(valid = score >= 0)
                ─ acc = ScatterND(acc, idx, GatherND(acc, idx) + y)   (TopK ids are unique)
         ─ Slice first T rows ─ Add(b2) ─ Reshape ─ y_BSD
         An expert asked for by more than C tokens runs on the C best-scoring ones (the
         others skip that expert); C >= T reproduces the ort lowerings.

Splitting F into E groups only regroups the sum in the second MatMul, so with every
expert chosen the rewrite reproduces the dense block on real tokens (tests pin this
down). DSTI's ReLU-fication (`MoeLayer.activation == "relu"`) is the one rewrite that
changes the function on purpose: each expert runs `Relu(x·w1 + b1)` in place of the
FFN's GELU, which makes expert outputs sparse and com.microsoft.MoE applicable, and
loses quality until recovery trains the experts (`--recover`).

Padding tokens choose no expert, so their FFN output is b2 alone: attention
masks them out as keys and nothing reads their rows downstream, so real tokens are
unaffected; only the padding rows of the last hidden state differ from the dense model.
Every ScatterND writes unique indices and has no reduction: ORT's reduction="add" with
duplicates races across threads, and TensorRT has no reduction at all.

Requires: FFN weights are initializers; a float32 model.  Preserves: graph inputs/outputs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from planer.compiler.errors import PreconditionError
from planer.compiler.irutil import NodeBuilder, remove_dead_producers, replace_uses
from planer.compiler.names import PROVENANCE_BLOCK, PROVENANCE_PASS, PassName
from planer.compiler.plan import MoePlan
from planer.compiler.spec import FfnSpec, ModelSpec
from planer.passes.moe_fit import FittedLayer, Router, activation_root

logger = logging.getLogger(__name__)

PASS_NAME = PassName.FFN_TO_MOE
TARGETS = ("ort", "tensorrt")
LOWERINGS = ("auto", "gather", "scatter", "kernel")
KERNEL_ACTIVATIONS = {"relu": "relu", "gelu_tanh": "gelu"}
RELUFIED = "planer.relufied"  # metadata on the nodes that run ReLU-fied experts (recovery reads it)
_PAD_SCORE = -1.0  # below every router score (Abs output >= 0)
_MASKED_LOGIT = -1e4  # exp(-1e4) == 0 in float32: unchosen experts get zero weight


@dataclasses.dataclass(frozen=True, eq=False)
class MoeLayer:
    """One FFN's experts, router and selection rule.

    Attributes:
        experts: [E, G] FFN channel indices of each expert (a partition of the width).
        router: the fitted gate predicting each expert's output norm.
        top_k: static number of experts per token, or None with `tau`.
        tau: dynamic-k threshold: expert e runs if r_e >= (1 - tau) * max r.
        capacity: tokens per expert in the tensorrt lowering (C); required there.
        lowering: this layer's "ort" lowering when chosen per layer (by measurement,
            cost_model.kernels.moe_lowering_costs); None follows the config's.
        activation: "relu" to run the experts with ReLU (ReLU-fication), or None for
            the FFN's own activation.
    """

    experts: np.ndarray
    router: Router
    top_k: int | None = None
    tau: float | None = None
    capacity: int | None = None
    lowering: str | None = None
    activation: str | None = None

    def __post_init__(self) -> None:
        if (self.top_k is None) == (self.tau is None):
            raise PreconditionError("an MoE layer needs exactly one of top_k or tau.")
        count = self.experts.shape[0]
        if self.top_k is not None and not 1 <= self.top_k <= count:
            raise PreconditionError(f"top_k {self.top_k} does not fit {count} experts.")
        if self.tau is not None and not 0.0 <= self.tau <= 1.0:
            raise PreconditionError(f"tau {self.tau} is not in [0, 1].")
        if self.lowering not in (None, *LOWERINGS):
            raise PreconditionError(f"unknown MoE lowering {self.lowering!r}.")
        if self.activation not in (None, "relu"):
            raise PreconditionError(f"unknown expert activation {self.activation!r} "
                                    "(only \"relu\" replaces the FFN's).")


@dataclasses.dataclass(frozen=True)
class FfnToMoeConfig:
    """Which layers become MoE, and how they are lowered.

    Attributes:
        layers: layer index -> its experts, router and selection.
        target: "ort" (dynamic shapes) or "tensorrt" (shape-computable only).
        lowering: for "ort": "gather" (tokens sorted by expert, one gather each way),
            "scatter" (per-expert NonZero/GatherND/ScatterND chain), "kernel"
            (com.microsoft.MoE; static top-k with relu/tanh-GELU only) or "auto"
            (gather, unless a layer carries its own measured choice).
        fuse_activation: on "ort", run an erf-GELU as ORT's BiasGelu kernel (same
            formula) rather than replaying the exported Div/Erf/Add/Mul/Mul nodes.
    """

    layers: Mapping[int, MoeLayer]
    target: str = "ort"
    lowering: str = "auto"
    fuse_activation: bool = True

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise PreconditionError(f"unknown target runtime {self.target!r}; use one of "
                                    f"{', '.join(TARGETS)}.")
        if self.lowering not in LOWERINGS:
            raise PreconditionError(f"unknown MoE lowering {self.lowering!r}.")


def apply_ffn_to_moe(model: ir.Model, spec: ModelSpec, config: FfnToMoeConfig) -> int:
    """Rewrites the listed layers' FFNs as MoE blocks; returns how many changed."""
    changed = 0
    tokens = _TokenMask(model.graph)
    for layer in spec.layers:
        moe = config.layers.get(layer.index)
        if moe is None:
            continue
        if layer.ffn.w1.matmul.metadata_props.get(PROVENANCE_PASS) == PASS_NAME:
            # The finder sees one expert of an MoE block as a narrow FFN: a second run
            # must leave the block as it is.
            logger.info("%s is already a mixture of experts; left as is", layer.ffn.block)
            continue
        _rewrite(model, layer.ffn, moe, config, tokens)
        changed += 1
    return changed


def rewrite_ffn(model: ir.Model, ffn: FfnSpec, moe: MoeLayer, config: FfnToMoeConfig) -> str:
    """Rewrites one FFN of `model` (found by hand, e.g. a one-FFN model); returns its lowering."""
    return _rewrite(model, ffn, moe, config, _TokenMask(model.graph))


def _rewrite(model: ir.Model, ffn: FfnSpec, moe: MoeLayer, config: FfnToMoeConfig,
             tokens: _TokenMask) -> str:
    _check(ffn, moe)
    lowering = choose_lowering(ffn, moe, config)
    b = NodeBuilder(model.graph, ffn.out_node, pass_name=PASS_NAME, block=ffn.block)
    fused = config.fuse_activation and lowering in ("gather", "scatter")
    if lowering == "kernel" or (fused and expert_activation(ffn, moe) == "gelu"):
        model.opset_imports.setdefault("com.microsoft", 1)
    out = _LOWERINGS[lowering](b, ffn, moe, tokens, fused)
    replace_uses(ffn.out, out)
    remove_dead_producers(ffn.out)
    return lowering


def choose_lowering(ffn: FfnSpec, moe: MoeLayer, config: FfnToMoeConfig) -> str:
    """Returns the layer's lowering under `config`: "tensorrt", or one of the ort ones."""
    if config.target == "tensorrt":
        _capacity(ffn, moe)
        return "tensorrt"
    requested = moe.lowering or config.lowering
    if requested == "kernel" and not kernel_fits(expert_activation(ffn, moe), moe.top_k):
        raise PreconditionError(
            f"{ffn.block}: com.microsoft.MoE needs static top-k and a relu or tanh-GELU "
            f"FFN; this one is {expert_activation(ffn, moe)} with "
            f"{'top_k' if moe.top_k is not None else 'tau'}.")
    if requested == "auto":
        # Without a per-layer measurement (the pipeline times gather against the kernel
        # where it fits): gather. MiniLM's FFN, 8 experts, top-2, ORT 1.32 CPU, one
        # thread: gather 2.5-2.6x dense at 128 tokens, 1.7-1.8x at 1 token; the kernel
        # (timed with tanh-GELU) 0.92-0.97x and 2.0-2.2x.
        return "gather"
    return requested


def expert_activation(ffn: FfnSpec, moe: MoeLayer) -> str:
    """Returns the activation the experts run: the FFN's, or "relu" when ReLU-fied."""
    return moe.activation or ffn.activation


def kernel_fits(activation: str, top_k: int | None) -> bool:
    """True when com.microsoft.MoE computes this FFN exactly: static top-k, relu/tanh-GELU."""
    return top_k is not None and activation in KERNEL_ACTIVATIONS


def config_from_fits(
    fitted: Mapping[int, FittedLayer],
    plans: Mapping[int, MoePlan],
    *,
    target: str = "ort",
    lowering: str = "auto",
    tokens: int | None = None,
    capacity_factor: float = 1.25,
) -> FfnToMoeConfig:
    """Builds the pass config from fitted layers and per-layer plans (top_k or tau).

    For the tensorrt target each expert's capacity is
    `ceil(capacity_factor * tokens * experts_per_token / E)` (at most `tokens`), where
    experts per token is k, or for tau the held-out average; `tokens` is batch x seq_len
    the engine is built for.
    """
    layers = {}
    for index, plan in plans.items():
        fit = fitted[index]
        if plan.experts != fit.experts.shape[0]:
            raise PreconditionError(f"layer {index}: the plan asks for {plan.experts} experts "
                                    f"but the router was fitted for {fit.experts.shape[0]}.")
        capacity = None
        if target == "tensorrt":
            if tokens is None:
                raise PreconditionError("the tensorrt lowering needs the token count "
                                        "(batch x seq_len) to size expert capacity.")
            per_token = plan.top_k or fit.quality(plan).experts_per_token
            capacity = min(tokens, int(np.ceil(capacity_factor * tokens * per_token
                                               / plan.experts)))
        layers[index] = MoeLayer(fit.experts, fit.router, top_k=plan.top_k, tau=plan.tau,
                                 capacity=capacity, activation=plan.activation)
    return FfnToMoeConfig(layers, target=target, lowering=lowering)


class _TokenMask:
    """Builds, once per model, the real-token mask [T, 1] and indices [n, 1] from attention_mask."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        mask = next((v for v in graph.inputs if v.name == "attention_mask"), None)
        # Only a [B, S] mask marks tokens; any other layout routes every token.
        rank_ok = mask is not None and (mask.shape is None or len(mask.shape) == 2)
        self.mask = mask if rank_ok else None
        self._real: ir.Value | None = None
        self._index: ir.Value | None = None

    def _builder(self, anchor: ir.Node) -> NodeBuilder:
        # Built before the first MoE layer that asks, so every later layer can read it.
        return NodeBuilder(self.graph, anchor, pass_name=PASS_NAME, block="moe/tokens")

    def real_T1(self, anchor: ir.Node) -> ir.Value | None:
        """Returns bool [T, 1]: token t is not padding; None without an attention_mask."""
        if self.mask is None:
            return None
        if self._real is None:
            b = self._builder(anchor)
            flat = b.op("Reshape", [self.mask, b.const("shape_T1", np.array([-1, 1]))],
                        "Reshape")
            self._real = b.op("Cast", [flat], "Cast", {"to": ir.DataType.BOOL})
        return self._real

    def index_n1(self, anchor: ir.Node) -> ir.Value | None:
        """Returns int64 [n, 1]: the flat indices of real tokens; None without a mask."""
        if self.mask is None:
            return None
        if self._index is None:
            b = self._builder(anchor)
            flat = b.op("Reshape", [self.mask, b.const("shape_T", np.array([-1]))],
                        "index/Reshape")
            nz = b.op("NonZero", [flat], "index/NonZero")
            self._index = b.op("Transpose", [nz], "index/Transpose", {"perm": [1, 0]})
        return self._index


def _capacity(ffn: FfnSpec, moe: MoeLayer) -> int:
    """Returns the tokens per expert of the tensorrt lowering, which needs one."""
    if moe.capacity is None:
        raise PreconditionError(f"{ffn.block}: the tensorrt lowering needs an expert "
                                "capacity (tokens per expert).")
    return moe.capacity


def _check(ffn: FfnSpec, moe: MoeLayer) -> None:
    groups = np.sort(moe.experts.reshape(-1))
    if not np.array_equal(groups, np.arange(ffn.width)):
        raise PreconditionError(f"{ffn.block}: the experts must partition its "
                                f"{ffn.width} FFN channels exactly once.")
    if moe.router.w1.shape[0] != ffn.w1.in_features or \
            moe.router.w2.shape[1] != moe.experts.shape[0]:
        raise PreconditionError(f"{ffn.block}: the router does not fit width "
                                f"{ffn.w1.in_features} and {moe.experts.shape[0]} experts.")
    if activation_root(ffn) is None:
        raise PreconditionError(f"{ffn.block}: cannot find where its activation starts.")


def _flatten(b: NodeBuilder, ffn: FfnSpec) -> tuple[ir.Value, ir.Value]:
    """Returns (x_TD, shape of x_BSD)."""
    d = ffn.w1.in_features
    x_TD = b.op("Reshape", [ffn.x, b.const("shape_TD", np.array([-1, d]))], "x/Reshape")
    return x_TD, b.op("Shape", [ffn.x], "x/Shape")


def _router(b: NodeBuilder, x_TD: ir.Value, router: Router) -> ir.Value:
    w1 = b.const("router/w1", router.w1.astype(np.float32))
    h = b.op("MatMul", [x_TD, w1], "router/fc1/MatMul")
    h = b.op("Add", [h, b.const("router/b1", router.b1.astype(np.float32))], "router/fc1/Add")
    h = b.op("Relu", [h], "router/Relu")
    r = b.op("MatMul", [h, b.const("router/w2", router.w2.astype(np.float32))], "router/fc2/MatMul")
    r = b.op("Add", [r, b.const("router/b2", router.b2.astype(np.float32))], "router/fc2/Add")
    return b.op("Abs", [r], "router/Abs")


def _selection(b: NodeBuilder, r_TE: ir.Value, moe: MoeLayer,
               real_T1: ir.Value | None) -> ir.Value:
    """Returns bool sel_TE: which experts each token runs (mirrors moe_fit.select)."""
    if moe.top_k is not None:
        values, _ = _topk(b, r_TE, moe.top_k, "select")
        kth = b.op("Slice", [values, b.const("select/kth_start", np.array([moe.top_k - 1])),
                             b.const("select/kth_end", np.array([moe.top_k])),
                             b.const("select/axis1", np.array([1]))], "select/Slice")
        threshold = kth
    else:
        top = b.op("ReduceMax", [r_TE, b.const("select/axes", np.array([1]))],
                   "select/ReduceMax", {"keepdims": 1})
        factor = b.const("select/one_minus_tau",
                         np.array(1.0 - float(moe.tau or 0.0), dtype=np.float32))
        threshold = b.op("Mul", [top, factor], "select/Mul")
    sel = b.op("GreaterOrEqual", [r_TE, threshold], "select/GreaterOrEqual")
    if real_T1 is not None:
        sel = b.op("And", [sel, real_T1], "select/And")
    return sel


def _expert_mlp(b: NodeBuilder, ffn: FfnSpec, group: np.ndarray, x_nD: ir.Value,
                name: str, fused: bool = False, relu: bool = False) -> ir.Value:
    """Runs expert `group` on gathered rows: the FFN's own activation spelling replayed.

    With `fused` (ort lowerings, erf-GELU FFNs) the activation is ORT's contrib
    BiasGelu/Gelu instead: the same erf formula in one kernel. ORT's own Gelu fusion
    misses the dynamo exporter's spelling, and five elementwise nodes per expert cost
    more than the expert's MatMuls at a few tokens. With `relu` (ReLU-fication) it is
    one Relu, whatever the FFN's activation was.
    """
    w1, b1 = ffn.w1.w()[:, group], ffn.w1.b()
    h = b.op("MatMul", [x_nD, b.const(f"{name}/w1", w1)], f"{name}/fc1/MatMul")
    if relu and ffn.activation != "relu":
        if b1 is not None:
            h = b.op("Add", [h, b.const(f"{name}/b1", b1[group])], f"{name}/fc1/Add")
        a = b.op("Relu", [h], f"{name}/Relu")
        b.nodes[-1].metadata_props[RELUFIED] = "true"
        return b.op("MatMul", [a, b.const(f"{name}/w2", ffn.w2.w()[group])],
                    f"{name}/fc2/MatMul")
    if fused and ffn.activation == "gelu":
        if b1 is not None:
            a = b.op("BiasGelu", [h, b.const(f"{name}/b1", b1[group])], f"{name}/BiasGelu",
                     domain="com.microsoft")
        else:
            a = b.op("Gelu", [h], f"{name}/Gelu", domain="com.microsoft")
        return b.op("MatMul", [a, b.const(f"{name}/w2", ffn.w2.w()[group])],
                    f"{name}/fc2/MatMul")
    if b1 is not None:
        h = b.op("Add", [h, b.const(f"{name}/b1", b1[group])], f"{name}/fc1/Add")
    a = _replay_activation(b, ffn, h, name)
    return b.op("MatMul", [a, b.const(f"{name}/w2", ffn.w2.w()[group])], f"{name}/fc2/MatMul")


def _replay_activation(b: NodeBuilder, ffn: FfnSpec, h: ir.Value, name: str) -> ir.Value:
    root = activation_root(ffn)
    order = {id(n): i for i, n in enumerate(b.graph)}
    mapping: dict[int, ir.Value] = {id(root): h}
    last = h
    for i, node in enumerate(sorted(ffn.nodes, key=lambda n: order[id(n)])):
        inputs = [mapping.get(id(v), v) if v is not None else None for v in node.inputs]
        last = b.op(node.op_type, inputs, f"{name}/act/{node.op_type}_{i}",
                    {k: a for k, a in node.attributes.items()}, domain=node.domain)
        mapping[id(node.outputs[0])] = last
    return mapping[id(ffn.w2.matmul.inputs[0])]


def _accumulate(b: NodeBuilder, acc: ir.Value | None, zeros: ir.Value, idx_n1: ir.Value,
                y_nD: ir.Value, name: str) -> ir.Value:
    """Adds y's rows into acc at unique indices, without ScatterND's racy reduction."""
    if acc is None:
        return b.op("ScatterND", [zeros, idx_n1, y_nD], f"{name}/ScatterND")
    old = b.op("GatherND", [acc, idx_n1], f"{name}/acc/GatherND")
    y_nD = b.op("Add", [old, y_nD], f"{name}/acc/Add")
    return b.op("ScatterND", [acc, idx_n1, y_nD], f"{name}/ScatterND")


def _finish(b: NodeBuilder, ffn: FfnSpec, acc_TD: ir.Value, shape: ir.Value) -> ir.Value:
    y = b.op("Reshape", [acc_TD, shape], "y/Reshape")
    b2 = ffn.w2.b()
    # b2 last, on [B, S, D], with the block's shape annotated: ORT then fuses it with the
    # residual Add and LayerNorm (SkipLayerNormalization) as it did for the dense FFN.
    if b2 is not None:
        y.shape, y.type = ffn.out.shape, ffn.out.type
        y = b.op("Add", [y, b.const("b2", b2)], "b2/Add")
    y.shape, y.type = ffn.out.shape, ffn.out.type
    return y


def _zeros(b: NodeBuilder, like: ir.Value, name: str) -> ir.Value:
    shape = b.op("Shape", [like], f"{name}/Shape")
    zero = ir.tensor(np.zeros(1, dtype=np.float32))
    return b.op("ConstantOfShape", [shape], f"{name}/ConstantOfShape", {"value": zero})


# ---------------------------------------------------------------- lowerings


def _emit_scatter(b: NodeBuilder, ffn: FfnSpec, moe: MoeLayer, tokens: _TokenMask,
                  fused: bool) -> ir.Value:
    x_TD, shape = _flatten(b, ffn)
    sel_TE = _selection(b, _router(b, x_TD, moe.router), moe, tokens.real_T1(b.anchor))
    sel_ET = b.op("Transpose", [sel_TE], "select/Transpose", {"perm": [1, 0]})
    zeros = _zeros(b, x_TD, "acc/zeros")
    acc = None
    for e, group in enumerate(moe.experts):
        name = f"expert{e}"
        pick = b.op("Gather", [sel_ET, b.const(f"{name}/id", np.array(e, dtype=np.int64))],
                    f"{name}/Gather", {"axis": 0})
        nz = b.op("NonZero", [pick], f"{name}/NonZero")
        idx = b.op("Transpose", [nz], f"{name}/Transpose", {"perm": [1, 0]})
        x_nD = b.op("GatherND", [x_TD, idx], f"{name}/GatherND")
        y_nD = _expert_mlp(b, ffn, group, x_nD, name, fused, relu=moe.activation == "relu")
        acc = _accumulate(b, acc, zeros, idx, y_nD, name)
    if acc is None:
        raise PreconditionError(f"{ffn.block}: an MoE layer needs at least one expert.")
    return _finish(b, ffn, acc, shape)


def _emit_sorted(b: NodeBuilder, ffn: FfnSpec, moe: MoeLayer, tokens: _TokenMask,
                 fused: bool) -> ir.Value:
    e_count = moe.experts.shape[0]
    x_TD, shape = _flatten(b, ffn)
    r_TE = _router(b, x_TD, moe.router)
    real_T1 = tokens.real_T1(b.anchor)
    unchosen = b.const("sort/unchosen", np.array(e_count, dtype=np.int64))
    if moe.top_k is not None:
        # Static k: the pairs are (t, j < k) holding TopK's expert ids. Exactly k per token
        # (an exact tie at the k-th score, which the >= rule would add, is dropped here;
        # real router scores do not tie). Padding tokens' pairs are keyed "unchosen".
        _, key = _topk(b, r_TE, moe.top_k, "select")
        if real_T1 is not None:
            key = b.op("Where", [real_T1, key, unchosen], "sort/Where")
        per_token = moe.top_k
    else:
        # Dynamic k: the pairs are all (t, e); the unchosen ones are keyed E.
        sel_TE = _selection(b, r_TE, moe, real_T1)
        expert_ids = b.const("sort/expert_ids_E", np.arange(e_count, dtype=np.int64))
        key = b.op("Where", [sel_TE, expert_ids, unchosen], "sort/Where")
        per_token = e_count
    key = b.op("Reshape", [key, b.const("sort/shape_P", np.array([-1]))], "sort/Reshape")
    ids_1E = b.const("sort/ids_1E", np.arange(e_count, dtype=np.int64).reshape(1, -1))
    key_P1 = b.op("Unsqueeze", [key, b.const("sort/axis1", np.array([1]))], "sort/Unsqueeze")
    hits = b.op("Cast", [b.op("Equal", [key_P1, ids_1E], "sort/Equal")], "sort/Cast",
                {"to": ir.DataType.INT64})
    counts_E = b.op("ReduceSum", [hits, b.const("sort/axes0", np.array([0]))],
                    "sort/counts/ReduceSum", {"keepdims": 0})
    total = b.op("ReduceSum", [counts_E, b.const("sort/axes_all", np.array([0]))],
                 "sort/total/ReduceSum", {"keepdims": 1})
    # Ascending keys group the chosen pairs by expert; the unchosen (key E) fall off the end.
    _, order = _topk(b, key, total, "sort", largest=0)
    token = b.op("Div", [order, b.const("sort/per_token", np.array(per_token, np.int64))],
                 "sort/Div")
    x_nD = b.op("Gather", [x_TD, token], "sort/rows/Gather", {"axis": 0})
    parts = _multi(b, "Split", [x_nD, counts_E], "sort/Split", {"axis": 0}, e_count)
    ys = [_expert_mlp(b, ffn, group, parts[e], f"expert{e}", fused,
                      relu=moe.activation == "relu") for e, group in enumerate(moe.experts)]
    zero_row = b.const("unsort/zero_row_1D", np.zeros((1, ffn.w1.in_features), np.float32))
    y_nD = b.op("Concat", [*ys, zero_row], "unsort/Concat", {"axis": 0})
    # rank[pair] = its row in y_nD when chosen, else `total`, the zero row.
    fill = b.op("Expand", [total, b.op("Shape", [key], "unsort/Shape")], "unsort/Expand")
    ranks = b.op("Range", [b.const("unsort/zero", np.array(0, dtype=np.int64)),
                           b.op("Squeeze", [total], "unsort/Squeeze"),
                           b.const("unsort/one", np.array(1, dtype=np.int64))],
                 "unsort/Range")
    rank = b.op("ScatterElements", [fill, order, ranks], "unsort/ScatterElements",
                {"axis": 0})
    rank = b.op("Reshape", [rank, b.const("unsort/shape_TK", np.array([-1, per_token]))],
                "unsort/Reshape")
    y_TKD = b.op("Gather", [y_nD, rank], "unsort/Gather", {"axis": 0})
    acc = b.op("ReduceSum", [y_TKD, b.const("unsort/axes1", np.array([1]))],
               "unsort/ReduceSum", {"keepdims": 0})
    return _finish(b, ffn, acc, shape)


def _multi(b: NodeBuilder, op_type: str, inputs: list[ir.Value | None], name: str,
           attributes: dict, outputs: int) -> list[ir.Value]:
    node = ir.node(op_type, inputs, attributes=attributes, name=f"{b.block}/{name}",
                   num_outputs=outputs,
                   metadata_props={PROVENANCE_PASS: b.pass_name, PROVENANCE_BLOCK: b.block})
    for i, value in enumerate(node.outputs):
        value.name = f"{b.block}/{name}_out{i}"
    b.graph.insert_before(b.anchor, node)
    b.nodes.append(node)
    return list(node.outputs)


def _emit_kernel(b: NodeBuilder, ffn: FfnSpec, moe: MoeLayer, tokens: _TokenMask,
                 fused: bool) -> ir.Value:
    x_TD, shape = _flatten(b, ffn)
    idx = tokens.index_n1(b.anchor)
    x_nD = b.op("GatherND", [x_TD, idx], "tokens/GatherND") if idx is not None else x_TD
    r_nE = _router(b, x_nD, moe.router)
    k = int(moe.top_k or 0)
    _, chosen = _topk(b, r_nE, k, "select")
    # Unweighted top-k through a softmax router: the chosen logits 0, the rest -1e4, so
    # each chosen expert weighs exactly 1/k; fc2 carries the factor k back.
    masked = b.op("ConstantOfShape", [b.op("Shape", [r_nE], "select/Shape")],
                  "select/ConstantOfShape",
                  {"value": ir.tensor(np.array([_MASKED_LOGIT], dtype=np.float32))})
    zero_k = b.op("ConstantOfShape", [b.op("Shape", [chosen], "select/k/Shape")],
                  "select/k/ConstantOfShape",
                  {"value": ir.tensor(np.zeros(1, dtype=np.float32))})
    logits = b.op("ScatterElements", [masked, chosen, zero_k], "select/ScatterElements",
                  {"axis": 1})
    w1, b1, w2 = ffn.w1.w(), ffn.w1.b(), ffn.w2.w()
    fc1 = np.stack([w1[:, g].T for g in moe.experts])  # [E, G, D]
    fc2 = np.stack([w2[g].T * np.float32(k) for g in moe.experts])
    inputs = [x_nD, logits, b.const("kernel/fc1", np.ascontiguousarray(fc1)),
              b.const("kernel/fc1_bias", np.stack([b1[g] for g in moe.experts]))
              if b1 is not None else None,
              b.const("kernel/fc2", np.ascontiguousarray(fc2))]
    y = b.op("MoE", inputs, "kernel/MoE",
             {"k": k, "activation_type": KERNEL_ACTIVATIONS[expert_activation(ffn, moe)]},
             domain="com.microsoft")
    if moe.activation == "relu" and ffn.activation != "relu":
        b.nodes[-1].metadata_props[RELUFIED] = "true"
    if idx is not None:
        y = b.op("ScatterND", [_zeros(b, x_TD, "tokens/zeros"), idx, y], "tokens/ScatterND")
    return _finish(b, ffn, y, shape)


def _topk(b: NodeBuilder, scores: ir.Value, k: int | ir.Value, name: str,
          largest: int = 1) -> tuple[ir.Value, ir.Value]:
    k_value = k if isinstance(k, ir.Value) else b.const(f"{name}/k", np.array([k], np.int64))
    values, indices = _multi(b, "TopK", [scores, k_value], f"{name}/TopK",
                             {"axis": -1, "sorted": 1, "largest": largest}, 2)
    return values, indices


def _emit_tensorrt(b: NodeBuilder, ffn: FfnSpec, moe: MoeLayer, tokens: _TokenMask,
                   fused: bool) -> ir.Value:
    del fused  # TensorRT takes the exported spelling (and has no contrib ops)
    c, d = _capacity(ffn, moe), ffn.w1.in_features
    e_count = moe.experts.shape[0]
    x_TD, shape = _flatten(b, ffn)
    r_TE = _router(b, x_TD, moe.router)
    sel_TE = _selection(b, r_TE, moe, tokens.real_T1(b.anchor))
    pad = b.const("capacity/pad_score", np.array(_PAD_SCORE, dtype=np.float32))
    score = b.op("Where", [sel_TE, r_TE, pad], "capacity/Where")
    # C always-invalid rows make TopK(C) legal for any T (even T < C) with a constant K.
    score = b.op("Concat", [score, b.const("capacity/pad_rows_CE",
                                           np.full((c, e_count), _PAD_SCORE, np.float32))],
                 "capacity/score/Concat", {"axis": 0})
    x_PD = b.op("Concat", [x_TD, b.const("capacity/pad_rows_CD", np.zeros((c, d), np.float32))],
                "capacity/x/Concat", {"axis": 0})
    score_EP = b.op("Transpose", [score], "capacity/Transpose", {"perm": [1, 0]})
    zeros = _zeros(b, x_PD, "acc/zeros")
    acc = None
    for e, group in enumerate(moe.experts):
        name = f"expert{e}"
        row = b.op("Gather", [score_EP, b.const(f"{name}/id", np.array(e, dtype=np.int64))],
                   f"{name}/Gather", {"axis": 0})
        values, idx_C = _topk(b, row, c, name)
        valid = b.op("GreaterOrEqual", [values, b.const(f"{name}/zero", np.array(
            0.0, dtype=np.float32))], f"{name}/valid/GreaterOrEqual")
        valid = b.op("Cast", [valid], f"{name}/valid/Cast", {"to": ir.DataType.FLOAT})
        axis1 = b.const(f"{name}/axis1", np.array([1]))
        valid = b.op("Unsqueeze", [valid, axis1], f"{name}/valid/Unsqueeze")
        x_CD = b.op("Gather", [x_PD, idx_C], f"{name}/rows/Gather", {"axis": 0})
        y_CD = b.op("Mul", [_expert_mlp(b, ffn, group, x_CD, name,
                                        relu=moe.activation == "relu"), valid], f"{name}/Mul")
        idx_C1 = b.op("Unsqueeze", [idx_C, axis1], f"{name}/Unsqueeze")
        acc = _accumulate(b, acc, zeros, idx_C1, y_CD, name)
    t = b.op("Gather", [b.op("Shape", [x_TD], "tokens/Shape"),
                        b.const("tokens/axis0", np.array([0]))], "tokens/Gather", {"axis": 0})
    acc_TD = b.op("Slice", [acc, b.const("tokens/start", np.array([0])), t,
                            b.const("tokens/slice_axes", np.array([0]))], "tokens/Slice")
    return _finish(b, ffn, acc_TD, shape)


_LOWERINGS = {"gather": _emit_sorted, "scatter": _emit_scatter, "kernel": _emit_kernel,
              "tensorrt": _emit_tensorrt}
