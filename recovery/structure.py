"""Reads a compiled model's residual stream: the part recovery mirrors in torch.

Dimensions: B batch, S sequence, D model width.

    graph inputs ─ embeddings, mask and position plumbing (ORT, frozen) ─┬─ entry x_BSD ───┐
                                          aux: score masks, rotary cos/sin ─┘               │
    entry ─ [(norm) ─ attn ─ residual Add ─ (norm) ─ FFN/MoE ─ residual Add] × L ─ (norm) ─ end
               └── blocks (planer's finder) ──┘     └── stream ops (STREAM_OPS) ──┘

The region between `entry` (the first layer's input; for pre-norm models the value the
first norm reads: a LayerNormalization's input, or the x of a spelled-out RMSNorm
x·γ/√(mean(x²)+ε), found by walking its elementwise ops back to the one value they
start from) and `end` (the model's main output: hidden states, or an LM's logits) is
described as an ordered list of steps: attention and FFN blocks as the finder describes them
(`compiler.blocks`), MoE blocks as planer's FFN→MoE pass emitted them, token-skim
points (`layer2/skim`: predictor, keep rule, gather; kind "skim") and their write-back
(`skim/write_back`: skimmed rows scattered back; kind "skim_out"), and the few
residual-stream ops between them. A sub-block a plan dropped is a residual Add of its
constant bias (`layer3/attn/dropped_bias`), so the steps stay in the graph's own order
and the layer outputs are found by counting FFN residuals, not by assuming pairs.

Values the region reads but does not compute (attention masks, and rotary cos/sin
computed from positions) are `aux`: ORT computes them per batch with the entry. The
stream ops are the residual Adds and every other node of the region outside a block
(norms as LayerNormalization or spelled out, Reshape, an LM head's MatMul); those not in
STREAM_OPS are named by `unsupported_steps`. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from planer.compiler import blocks as finder
from planer.compiler.capture import main_output
from planer.compiler.errors import UnsupportedModelError
from planer.compiler.irutil import SHAPE_READERS, const_array, region_between
from planer.compiler.names import PROVENANCE_BLOCK, PROVENANCE_PASS, BlockId, PassName
from planer.compiler.spec import AttentionSpec, FfnSpec

# Replayed by the mirror (recovery.stream_ops): residual sums, norms as LayerNormalization
# or decomposed (RMSNorm: Cast, Pow, ReduceMean, Add, Sqrt, Div | Reciprocal, Mul), plumbing
# and an LM head's MatMul.
STREAM_OPS = frozenset({"Add", "Sum", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg",
                        "Cast", "ReduceMean", "MatMul", "LayerNormalization", "Identity",
                        "Reshape"})
# The ops a decomposed norm (RMSNorm, a LayerNorm spelled out) is made of.
_NORM_OPS = frozenset({"Cast", "Pow", "ReduceMean", "Add", "Sub", "Sqrt", "Div", "Reciprocal",
                       "Mul", "Neg"})
_NORM_MAX_NODES = 16


@dataclasses.dataclass
class MoeBlock:
    """An FFN that planer's FFN→MoE pass rewrote: the nodes it emitted for one block."""

    block: str
    x: ir.Value
    out: ir.Value
    nodes: list[ir.Node]


@dataclasses.dataclass
class SkimBlock:
    """Nodes the token-skim pass emitted for one skim point, or for its write-back.

    Attributes:
        block: "layer<i>/skim" (a point) or "skim/write_back".
        x: a point's input [B, S, D]; the write-back's: the last layer's output.
        out: the gathered rows a point hands the next layer; the full-length output.
        nodes: the nodes of the region this step replaces.
        masks: the additive attention masks a point makes for later layers.
        weights: the predictor's float initializers (a point).
        constants: every initializer named under the block (keep ratio, slack, always-kept
            positions), read or not by the region's nodes.
    """

    block: str
    x: ir.Value
    out: ir.Value
    nodes: list[ir.Node]
    masks: list[ir.Value] = dataclasses.field(default_factory=list)
    weights: list[ir.Value] = dataclasses.field(default_factory=list)
    constants: dict[str, ir.Value] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Step:
    """One step of the stream: a block, or a residual-stream op replayed as is.

    Attributes:
        kind: "attn", "ffn", "moe" (blocks) or the op type ("Add", "LayerNormalization"...).
        inputs: the values it reads (for blocks: the block input only).
        output: the value it writes.
        block: the finder's record for blocks, the node for stream ops.
    """

    kind: str
    inputs: list[ir.Value]
    output: ir.Value
    block: AttentionSpec | FfnSpec | MoeBlock | SkimBlock | ir.Node


@dataclasses.dataclass
class Stream:
    """The residual stream of a model from its first layer's input to its output.

    Attributes:
        entry: the value the stream starts from (computed in ORT).
        aux: values the steps read but the stream does not compute (masks, rotary
            cos/sin; ORT).
        end: the model's hidden-state output, which the last step writes.
        steps: every step, in graph order.
        layer_outputs: each layer's output value, in order (None where the layers cannot
            be told apart).
        norm: "post" (BERT) or "pre" (GPT-2, ViT).
        other_outputs: graph outputs the stream does not produce (computed in ORT only).
        region: ids of the nodes the steps cover (blocks' nodes included).
    """

    entry: ir.Value
    aux: list[ir.Value]
    end: ir.Value
    steps: list[Step]
    layer_outputs: list[ir.Value] | None
    norm: str
    other_outputs: list[str]
    region: set[int]

    def blocks(self) -> list[Step]:
        """Returns the block steps (attention, FFN, MoE)."""
        return [s for s in self.steps if s.kind in ("attn", "ffn", "moe")]


def read_stream(model: ir.Model) -> Stream:
    """Describes the residual stream of a canonical model (compiled or not).

    Raises:
        UnsupportedModelError: no layers were found, or the output is not reached from
            the first layer through blocks and residual-stream ops alone.
    """
    graph = model.graph
    order = {id(node): i for i, node in enumerate(graph)}
    found = _find_blocks(graph)
    if not found:
        raise UnsupportedModelError("no attention or FFN blocks were found to mirror.")
    first = min(found, key=lambda b: order[id(b.x.producer())] if b.x.producer() else -1)
    entry = _entry(first.x, order)
    end = _end_value(graph)
    region = region_between(entry, end)
    if id(end.producer()) not in region:
        raise UnsupportedModelError(
            f"the output {end.name} does not depend on the first layer's input {entry.name}."
        )
    steps = _steps(graph, found, region)
    steps.sort(key=lambda s: order[id(s.output.producer())])
    provided = {id(m) for s in steps if isinstance(s.block, SkimBlock) for m in s.block.masks}
    aux = [v for v in _aux_values(steps, entry, region) if id(v) not in provided]
    norm = _norm_style(steps)
    _name_blocks(steps)
    others = [str(v.name) for v in graph.outputs if v is not end]
    return Stream(entry, aux, end, steps, _layer_outputs(steps, norm), norm, others, region)


def _steps(graph: ir.Graph, found: list[Block], region: set[int]) -> list[Step]:
    """Returns the region's blocks as one step each, and its other nodes as stream ops."""
    inside: set[int] = set()
    steps: list[Step] = []
    for blk in found:
        producer = blk.out.producer()
        if producer is None or id(producer) not in region:
            continue
        inside |= _block_nodes(blk.out, blk.x, region)
        kind = "moe" if isinstance(blk, MoeBlock) else \
            "attn" if isinstance(blk, AttentionSpec) else "ffn"
        steps.append(Step(kind, [blk.x], blk.out, blk))
    for skim in _skim_blocks(graph, region):
        inside |= {id(n) for n in skim.nodes}
        kind = "skim_out" if skim.block == f"{_SKIM_STATE}/write_back" else "skim"
        steps.append(Step(kind, [skim.x], skim.out, skim))
    for node in graph:
        if id(node) in region and id(node) not in inside:
            steps.append(Step(node.op_type, [v for v in node.inputs if v is not None],
                              node.outputs[0], node))
    return steps


def unsupported_steps(stream: Stream) -> list[str]:
    """Names the stream ops a torch mirror cannot replay (empty when it can)."""
    bad = []
    for step in stream.steps:
        node = step.block
        if not isinstance(node, ir.Node):
            continue  # a block: its own mirror decides
        if step.kind not in STREAM_OPS or node.domain not in ("", "ai.onnx") \
                or len(node.outputs) != 1:
            bad.append(f"{node.op_type} ({node.name})")
    return bad


# ---------------------------------------------------------------- blocks


Block = AttentionSpec | FfnSpec | MoeBlock


def _find_blocks(graph: ir.Graph) -> list[Block]:
    """Returns every attention, dense FFN and MoE block, unpaired.

    `find_blocks` pairs each attention with the next FFN and so refuses (or mispairs) a
    compiled model whose plan dropped a sub-block; the stream orders blocks by itself, so
    it takes the finder's unpaired blocks.
    """
    found: list[Block] = list(finder.find_unpaired_blocks(graph))
    found.extend(_moe_blocks(graph))
    return found


def _moe_blocks(graph: ir.Graph) -> list[MoeBlock]:
    """Collects the FFN→MoE pass's nodes per block; x is what its first Reshape reads."""
    by_block: dict[str, list[ir.Node]] = {}
    for node in graph:
        if node.metadata_props.get(PROVENANCE_PASS) != PassName.FFN_TO_MOE:
            continue
        block = node.metadata_props.get(PROVENANCE_BLOCK, "")
        if BlockId.try_parse(block) is not None:
            by_block.setdefault(block, []).append(node)
    result = []
    for block, nodes in by_block.items():
        x_node = next((n for n in nodes if n.name == f"{block}/x/Reshape"), None)
        mine = {id(n) for n in nodes}
        outs = [v for n in nodes for v in n.outputs
                if any(id(u.node) not in mine for u in v.uses()) or v.is_graph_output()]
        if x_node is None or len(outs) != 1 or x_node.inputs[0] is None:
            raise UnsupportedModelError(f"{block}: the MoE block cannot be read back "
                                        "(no single input and output).")
        result.append(MoeBlock(block, x_node.inputs[0], outs[0], nodes))
    return result


_SKIM_STATE = "skim"  # passes.token_skim.STATE_BLOCK: nodes every skim point shares


def _skim_blocks(graph: ir.Graph, region: set[int]) -> list[SkimBlock]:
    """Groups the region's token-skim nodes: one block per skim point, one write-back.

    A point is named by its block (`layer2/skim`); nodes another pass respelled inside it
    (the ORT-kernels stage's predictor GELU, block `layer2/skim/predictor/gelu/...`)
    belong to it too. Every other skim node of the region is the write-back's.
    """
    skim = [n for n in graph if id(n) in region and _skim_block(n) is not None]
    if not skim:
        return []
    names = {_skim_block(n) for n in skim} - {_SKIM_STATE, None}
    points = sorted((b for b in names if b is not None), key=lambda b: BlockId.parse(b).layer)
    result = []
    for block in points:
        mine = [n for n in skim if _skim_block(n) == block]
        by_name = {n.name: n for n in graph if (n.name or "").startswith(f"{block}/")}
        x_node = by_name.get(f"{block}/shape_BKD")
        out_node = by_name.get(f"{block}/rows_kept/Gather") or by_name.get(f"{block}/h_kept_BKD")
        if x_node is None or out_node is None or x_node.inputs[0] is None:
            raise UnsupportedModelError(f"{block}: the skim point cannot be read back "
                                        "(no input rows or no gathered rows).")
        masks = [n.outputs[0] for name, n in by_name.items()
                 if name == f"{block}/mask_add_B11K"]
        weights = [v for n in mine for v in n.inputs if v is not None
                   and "/predictor/" in str(v.name) and _is_float_constant(v)]
        constants = {name: v for name, v in graph.initializers.items()
                     if name.startswith(f"{block}/")}
        result.append(SkimBlock(block, x_node.inputs[0], out_node.outputs[0], mine, masks,
                                list({id(v): v for v in weights}.values()), constants))
    rest = [n for n in skim if _skim_block(n) == _SKIM_STATE]
    result.append(_skim_write_back(graph, rest))
    return result


def _skim_block(node: ir.Node) -> str | None:
    """Returns the skim block a node belongs to (a point's or `skim`), or None."""
    block = node.metadata_props.get(PROVENANCE_BLOCK, "")
    if block == _SKIM_STATE or block.startswith(f"{_SKIM_STATE}/"):
        return _SKIM_STATE if node.metadata_props.get(PROVENANCE_PASS) \
            == PassName.TOKEN_SKIM else None
    parsed = BlockId.try_parse(block)
    if parsed is not None and parsed.kind == "skim":
        return str(BlockId(parsed.layer, "skim"))
    return None


def _is_float_constant(value: ir.Value) -> bool:
    array = const_array(value)
    return array is not None and array.dtype.kind == "f"


def _skim_write_back(graph: ir.Graph, nodes: list[ir.Node]) -> SkimBlock:
    """Reads the write-back: one output leaves the skim nodes; its input is the last layer's."""
    order = {id(n): i for i, n in enumerate(graph)}
    mine = {id(n) for n in nodes}
    outs = [v for n in nodes for v in n.outputs
            if v.is_graph_output() or any(id(u) not in mine for u in v.consumers())]
    reads = [v for n in nodes for v in n.inputs if v is not None and v.producer() is not None
             and _skim_block(v.producer()) is None]  # type: ignore[arg-type]
    if len(outs) != 1 or not reads:
        raise UnsupportedModelError("the token-skim write-back cannot be read back "
                                    "(no single full-length output).")
    last = max(reads, key=lambda v: order[id(v.producer())])
    return SkimBlock(f"{_SKIM_STATE}/write_back", last, outs[0], nodes)


# ---------------------------------------------------------------- region


def _entry(x: ir.Value, order: dict[int, int]) -> ir.Value:
    """Returns the stream's first value, walking back from the first block's input x.

    Back over a norm (a LayerNormalization node, or one spelled out like RMSNorm) whose
    input a residual Add also reads (pre-norm), over the residual Adds of sub-blocks a plan
    dropped before the first block that remains, and over a skim point before layer 0 (its
    gathered rows are not where the stream starts).
    """
    value = x
    while (producer := value.producer()) is not None:
        source = _norm_source(value, order)
        if source is not None:
            upstream = source.producer()
            own = region_between(source, value)  # the norm's nodes
            read_by_residual = any(u.op_type in ("Add", "Sum") and id(u) not in own
                                   for u in source.consumers())
            if not read_by_residual and (upstream is None or _dropped_bias(upstream) is None):
                break
            value = source
        elif (dropped := _dropped_bias(producer)) is not None:
            value = next(v for v in producer.inputs if v is not None and v is not dropped)
        elif (point := _skim_point_input(producer)) is not None:
            value = point  # a skim point before layer 0: the stream starts at its input
        else:
            break
    return value


def _norm_source(value: ir.Value, order: dict[int, int]) -> ir.Value | None:
    """Returns the value a norm computing `value` normalises, if `value` is a norm's output.

    A LayerNormalization node's input; or the one value s that a short chain of
    elementwise ops and a ReduceMean computes `value` from (with constants): walking back
    from `value`, the open inputs collapse to s once the ReduceMean has been passed
    (RMSNorm: x·γ/√(mean(x²)+ε) collapses to x).
    """
    producer = value.producer()
    if producer is not None and producer.op_type == "LayerNormalization":
        return producer.inputs[0] if producer.inputs else None
    frontier = {id(value): value}
    reduced, walked = False, 0
    while walked < _NORM_MAX_NODES:
        latest = max(frontier.values(), key=lambda v: order.get(id(v.producer()), -1))
        if len(frontier) == 1 and reduced:
            return latest
        node = latest.producer()
        if node is None or node.op_type not in _NORM_OPS or node.domain not in ("", "ai.onnx"):
            return None
        del frontier[id(latest)]
        walked += 1
        reduced = reduced or node.op_type == "ReduceMean"
        frontier.update((id(v), v) for v in node.inputs
                        if v is not None and const_array(v) is None)
        if not frontier:
            return None
    return None


def _skim_point_input(node: ir.Node) -> ir.Value | None:
    """Returns the input rows of the skim point `node` belongs to, if it is a point's."""
    block = _skim_block(node)
    if block is None or block == _SKIM_STATE or node.graph is None:
        return None
    shape = next((n for n in node.graph if n.name == f"{block}/shape_BKD"), None)
    return shape.inputs[0] if shape is not None else None


def _dropped_bias(node: ir.Node) -> ir.Value | None:
    """Returns the constant a dropped sub-block leaves in its residual Add, if `node` is one."""
    if node.op_type not in ("Add", "Sum") or len(node.inputs) != 2:
        return None
    for value in node.inputs:
        if value is not None and str(value.name).endswith("/dropped_bias") \
                and const_array(value) is not None:
            return value
    return None


def _end_value(graph: ir.Graph) -> ir.Value:
    """Returns the graph output that carries the hidden states (`capture.main_output`)."""
    infos = [_Info(str(v.name), v) for v in graph.outputs]
    name = main_output(infos)
    return next(v for v in graph.outputs if v.name == name)


@dataclasses.dataclass
class _Info:
    """The two fields `main_output` reads of an ORT NodeArg, from an ir.Value."""

    name: str
    value: ir.Value

    @property
    def type(self) -> str:
        dtype = self.value.dtype
        names = {ir.DataType.FLOAT: "float", ir.DataType.FLOAT16: "float16",
                 ir.DataType.DOUBLE: "double", ir.DataType.BFLOAT16: "bfloat16"}
        return f"tensor({names.get(dtype, 'other') if dtype is not None else 'other'})"

    @property
    def shape(self) -> list[object] | None:
        return None if self.value.shape is None else list(self.value.shape)


def _block_nodes(out: ir.Value, x: ir.Value, region: set[int]) -> set[int]:
    """Returns ids of the region's nodes between a block's input and its output."""
    seen: set[int] = set()
    stack = [out.producer()]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen or id(node) not in region:
            continue
        seen.add(id(node))
        stack.extend(v.producer() for v in node.inputs if v is not None and v is not x)
    return seen


def _aux_values(steps: list[Step], entry: ir.Value, region: set[int]) -> list[ir.Value]:
    """Returns the non-constant values the steps read that the region does not compute."""
    reads: list[ir.Value] = []
    for step in steps:
        if isinstance(step.block, AttentionSpec):
            reads.extend(v for op in step.block.score_ops for i, v in enumerate(op.inputs)
                         if i != op.scores_index and v is not None)
            # cos/sin of a rotary: computed from positions before the stream (or constant).
            reads.extend(v for rotary in step.block.rotary.values()
                         for v in (rotary.cos, rotary.sin))
        elif step.kind not in ("ffn", "moe", "attn"):
            reads.extend(step.inputs)
    aux: dict[int, ir.Value] = {}
    for value in reads:
        producer = value.producer()
        if value is entry or const_array(value) is not None:
            continue
        if producer is None or id(producer) not in region:
            aux[id(value)] = value
    return list(aux.values())


# ---------------------------------------------------------------- layers


def _residual_kind(step: Step, outputs: dict[int, str]) -> str | None:
    """Tells which sub-block a residual Add closes ("attn"/"ffn"), or None if not one."""
    if step.kind not in ("Add", "Sum") or len(step.inputs) != 2:
        return None
    kinds = []
    for value in step.inputs:
        if id(value) in outputs:
            kinds.append(outputs[id(value)])
        elif value is _dropped_bias(step.block):  # type: ignore[arg-type]
            # A dropped sub-block's bias: `layer3/attn/dropped_bias`.
            parsed = BlockId.try_parse(str(value.name).rsplit("/", 1)[0])
            if parsed is not None and parsed.kind in ("attn", "ffn"):
                kinds.append(parsed.kind)
    return kinds[0] if len(kinds) == 1 else None


def _readers(value: ir.Value) -> list[ir.Node]:
    return [u for u in value.consumers() if u.op_type not in SHAPE_READERS]


def _norm_style(steps: list[Step]) -> str:
    """Post-LN when every attention residual feeds one LayerNorm and nothing else."""
    outputs = {id(s.output): ("ffn" if s.kind == "moe" else s.kind) for s in steps
               if s.kind in ("attn", "ffn", "moe")}
    closes = [s for s in steps if _residual_kind(s, outputs) == "attn"]
    if not closes:
        closes = [s for s in steps if _residual_kind(s, outputs) == "ffn"]
    post = all(len(r := _readers(s.output)) == 1 and r[0].op_type == "LayerNormalization"
               for s in closes)
    return "post" if closes and post else "pre"


def _layer_outputs(steps: list[Step], norm: str) -> list[ir.Value] | None:
    """Returns each layer's output: after its FFN residual (and its LayerNorm, post-LN)."""
    outputs = {id(s.output): ("ffn" if s.kind == "moe" else s.kind) for s in steps
               if s.kind in ("attn", "ffn", "moe")}
    kinds = [(_residual_kind(s, outputs), s) for s in steps]
    closes = [(k, s) for k, s in kinds if k is not None]
    if not closes or [k for k, _ in closes] != ["attn", "ffn"] * (len(closes) // 2):
        return None
    result = []
    for kind, step in closes:
        if kind != "ffn":
            continue
        value = step.output
        readers = _readers(value)
        if norm == "post" and len(readers) == 1 and readers[0].op_type == "LayerNormalization":
            value = readers[0].outputs[0]
        result.append(value)
    return result


def _name_blocks(steps: list[Step]) -> None:
    """Names blocks `layer<i>/<kind>` by counting FFN residuals (drops included) before them."""
    outputs = {id(s.output): ("ffn" if s.kind == "moe" else s.kind) for s in steps
               if s.kind in ("attn", "ffn", "moe")}
    layer = 0
    for step in steps:
        if isinstance(step.block, AttentionSpec | FfnSpec):
            step.block.block = str(BlockId(layer, step.kind))
        if _residual_kind(step, outputs) == "ffn":
            layer += 1


def layer_output_names(stream: Stream) -> list[str] | None:
    """Names the layer outputs (for exposing them from ORT), or None."""
    if stream.layer_outputs is None:
        return None
    return [str(v.name) for v in stream.layer_outputs]


def describe(stream: Stream) -> dict[str, object]:
    """Summarises what is mirrored and what stays frozen in ORT, for the report."""
    counts: dict[str, int] = {}
    for step in stream.steps:
        counts[step.kind] = counts.get(step.kind, 0) + 1
    return {
        "mirrored": {"from": str(stream.entry.name), "to": str(stream.end.name),
                     "steps": counts, "norm": stream.norm,
                     "layers": len(stream.layer_outputs or [])},
        "frozen_in_ort": {"before": f"everything computing {stream.entry.name} "
                          "(embeddings) and the attention masks (and rotary cos/sin)",
                          "aux": [str(v.name) for v in stream.aux],
                          "outputs_not_trained": stream.other_outputs},
    }
