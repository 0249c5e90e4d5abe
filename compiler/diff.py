"""Matches two ONNX models block by block and node by node, and says what changed.

    a.onnx ─ load ─ canonicalize ─ find blocks ─┐                     ┌─ per-layer records
                                                ├─ pair layers ─ pair nodes ─┤  op deltas, totals
    b.onnx ─ load ─ canonicalize ─ find blocks ─┘  (shared weights)   └─ unmatched lists

Layers pair by evidence, never by position alone: a layer of B pairs with a layer of A
when they share weights (the same float tensor, or a column/row subset of it, as pruning
leaves), chosen by maximum-weight bipartite matching. Nodes then pair in this order,
each step only between nodes of corresponding blocks (or both outside every layer):

    block    the spec's projections and block outputs of paired layers
    name     same unique name, op type and attributes (untouched exporter nodes)
    weights  the same constant inputs by content (names may differ)
    structure  walking inputs/consumers out from pairs already made, same op type
    sequence  what is left, aligned on the op-type sequence (difflib)

Both graphs are compared in canonical form (`canonicalize`), so Gemm and LayerNorm
spellings do not show up as changes. Nodes planer adds carry `planer.block` metadata,
which places them in their block ahead of the block finder's own regions.

This module holds the correspondence (`diff_models`, `Diff.to_dict`); running both
models and measuring where their numbers part lives in `diff_numbers`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Container, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import onnx_ir as ir

from planer.compiler.blocks import find_blocks
from planer.compiler.canonicalize import canonicalize
from planer.compiler.irutil import const_array
from planer.compiler.loading import load_model
from planer.compiler.names import PROVENANCE_BLOCK, PROVENANCE_PASS, BlockId
from planer.compiler.spec import LayerSpec, Linear, ModelSpec, layer_record, model_flops

logger = logging.getLogger(__name__)

OUTSIDE = "outside"  # the group of nodes that belong to no layer
ROLES = ("q", "k", "v", "o", "w1", "w2", "gate")  # gate: gated FFNs only


@dataclasses.dataclass
class Side:
    """One model of the diff: canonical graph, its layers (if found) and planer's files."""

    path: Path
    model: ir.Model
    spec: ModelSpec | None
    no_layers: str | None  # why the block finder found no layers
    labels: dict[ir.Node, str]  # node -> "layer3/attn" | "layer3/ffn" | "layer3/norm"
    planer: dict[str, Any]  # plan.json / report.json found beside a planer output

    @property
    def nodes(self) -> list[ir.Node]:
        """Returns the graph's nodes in order."""
        return list(self.model.graph)


@dataclasses.dataclass
class Correspondence:
    """Pairs between two models: layers (A index -> B index) and nodes (A -> (B, how))."""

    layers: dict[int, int]
    nodes: dict[ir.Node, tuple[ir.Node, str]]
    nodes_b: set[ir.Node]  # the B side of `nodes`


def read_side(path: str | Path) -> Side:
    """Loads and canonicalizes a model and labels its nodes with the blocks they belong to."""
    path = Path(path)
    model = load_model(path)
    canonicalize(model)
    spec, why = None, None
    try:
        spec = find_blocks(model)
    except Exception as exc:  # any model must diff, with or without readable layers
        logger.debug("block finder failed on %s", path, exc_info=True)
        why = str(exc) or type(exc).__name__
    return Side(path, model, spec, why, block_labels(model, spec), _planer_files(path))


def _planer_files(path: Path) -> dict[str, Any]:
    found = {}
    for name in ("plan.json", "report.json"):
        file = path.parent / name
        if file.is_file():
            try:
                found[name.removesuffix(".json")] = json.loads(file.read_text())
            except (OSError, ValueError):
                logger.warning("could not read %s", file)
    report = found.get("report")
    return found if isinstance(report, dict) and report.get("tool") == "planer" else {}


# ---------------------------------------------------------------- blocks


def block_labels(model: ir.Model, spec: ModelSpec | None) -> dict[ir.Node, str]:
    """Labels nodes by block: planer's provenance first, then the finder's regions."""
    labels: dict[ir.Node, str] = {}
    for node in model.graph:
        block = node.metadata_props.get(PROVENANCE_BLOCK)
        if block:
            labels[node] = _block_label(block)
    if spec is None:
        return labels
    graph = _dataflow(model)
    for layer in spec.layers:
        i, a, f = layer.index, layer.attention, layer.ffn
        for sub, x, out in (("attn", a.x, a.out), ("ffn", f.x, f.out)):
            for node in _region(graph, x, out):
                labels.setdefault(node, str(BlockId(i, sub)))
        for node in (*_residual_norm(a.out), *_residual_norm(f.out)):
            labels.setdefault(node, str(BlockId(i, "norm")))
    return labels


def _block_label(block: str) -> str:
    """Returns the block a provenance block id belongs to (`layer3/ffn/expert2` -> `layer3/ffn`).

    Blocks that are no layer's (token skimming's shared state, `skim`) keep two path levels.
    """
    parsed = BlockId.try_parse(block)
    if parsed is None:
        return "/".join(block.split("/")[:2])
    return str(BlockId(parsed.layer, parsed.kind))


def _dataflow(model: ir.Model) -> nx.DiGraph:
    graph = nx.DiGraph()
    for node in model.graph:
        graph.add_node(node)
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None:
                graph.add_edge(producer, node)
    return graph


def _region(graph: nx.DiGraph, x: ir.Value, out: ir.Value) -> set[ir.Node]:
    """Returns the nodes on some path from `x` to `out` (the block between them)."""
    last = out.producer()
    if last is None:
        return set()
    upstream = nx.ancestors(graph, last) | {last}
    readers = [n for n in x.consumers() if n in upstream]
    downstream = set(readers).union(*(nx.descendants(graph, n) for n in readers))
    return upstream & downstream


def _residual_norm(out: ir.Value) -> list[ir.Node]:
    adds = [n for n in out.consumers() if n.op_type == "Add"]
    if len(adds) != 1:
        return []
    norms = [n for n in adds[0].outputs[0].consumers() if n.op_type == "LayerNormalization"]
    return adds + norms[:1]


def boundaries(layer: LayerSpec) -> list[tuple[str, ir.Value]]:
    """Returns the layer's block outputs, each followed by its residual sum/norm output."""
    result = []
    for sub, out in (("attn", layer.attention.out), ("ffn", layer.ffn.out)):
        block = BlockId(layer.index, sub)
        result.append((str(block.child("out")), out))
        after = _residual_norm(out)
        if after:
            result.append((str(block.child("norm")), after[-1].outputs[0]))
    return result


# ---------------------------------------------------------------- layer pairing


class _Digests:
    """Content digests of constant tensors, cached per value (names never matter)."""

    def __init__(self) -> None:
        self._full: dict[int, str | None] = {}
        self._lines: dict[tuple[int, int], frozenset[bytes]] = {}
        self._weights: dict[tuple[int, int], str] = {}

    def of(self, value: ir.Value | None) -> str | None:
        if value is None:
            return None
        key = id(value)
        if key not in self._full:
            array = const_array(value)
            self._full[key] = None if array is None else _digest(array)
        return self._full[key]

    def weight(self, lin: Linear) -> str:
        """Returns the digest of the projection's own share of its weight."""
        key = (id(lin), -1)
        if key not in self._weights:
            self._weights[key] = _digest(lin.w())
        return self._weights[key]

    def lines(self, lin: Linear, axis: int) -> frozenset[bytes]:
        """Returns the byte strings of the weight's rows (axis 0) or columns (axis 1)."""
        key = (id(lin), axis)
        if key not in self._lines:
            w = np.ascontiguousarray(lin.w() if axis == 0 else lin.w().T)
            self._lines[key] = frozenset(row.tobytes() for row in w)
        return self._lines[key]


def _digest(array: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{array.dtype}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def relation(a: Linear, b: Linear, digests: _Digests) -> str:
    """Tells how B's projection weight derives from A's: same, sliced or different."""
    wa, wb = a.w(), b.w()
    if wa.shape == wb.shape and digests.weight(a) == digests.weight(b):
        return "same"
    # Pruning keeps whole columns (Q/K/V/W1 outputs) or whole rows (O/W2 inputs).
    for axis in (0, 1):
        other = 1 - axis
        if wa.shape[other] == wb.shape[other] and wb.shape[axis] <= wa.shape[axis] \
                and digests.lines(b, axis) <= digests.lines(a, axis):
            return "sliced"
    return "different"


def pair_layers(a: Side, b: Side, digests: _Digests) -> dict[int, int]:
    """Pairs layers of A and B that share weights, by maximum-weight bipartite matching."""
    if a.spec is None or b.spec is None:
        return {}
    shared_a = {layer.index: _layer_constants(a, layer.index, digests) for layer in a.spec.layers}
    shared_b = {layer.index: _layer_constants(b, layer.index, digests) for layer in b.spec.layers}
    graph = nx.Graph()
    for la in a.spec.layers:
        for lb in b.spec.layers:
            related = sum(relation(pa, pb, digests) != "different"
                          for pa, pb in zip(la.projections(), lb.projections(), strict=False))
            # A projection weight must carry over: seeded biases and norms can coincide
            # between unrelated models, whole weight matrices do not.
            if related:
                score = related + len(shared_a[la.index] & shared_b[lb.index])
                # Among equally good pairings, keep layer order.
                graph.add_edge(("a", la.index), ("b", lb.index),
                               weight=score + (0.01 if la.index == lb.index else 0.0))
    pairs = {}
    for u, v in nx.max_weight_matching(graph):
        (_, i), (_, j) = sorted((u, v))
        pairs[i] = j
    return dict(sorted(pairs.items()))


def _layer_constants(side: Side, index: int, digests: _Digests) -> set[str]:
    found: set[str] = set()
    for node, label in side.labels.items():
        block = BlockId.try_parse(label)
        if block is None or block.layer != index:
            continue
        for value in node.inputs:
            array = const_array(value)
            # Float tensors only: shape constants and scalars repeat across unrelated layers.
            digest = digests.of(value)
            if array is not None and array.size > 1 and array.dtype.kind == "f" \
                    and digest is not None:
                found.add(digest)
    return found


# ---------------------------------------------------------------- node pairing


def correspond(a: Side, b: Side, digests: _Digests | None = None) -> Correspondence:
    """Pairs the layers and nodes of two models (see the module docstring for the order)."""
    digests = digests or _Digests()
    layers = pair_layers(a, b, digests)
    matcher = _NodeMatcher(a, b, layers, digests)
    matcher.by_block()
    matcher.by_key("name", _name_key)
    matcher.by_key("weights", lambda node: _weights_key(node, digests))
    matcher.spread()
    matcher.by_sequence()
    return Correspondence(layers, matcher.pairs, matcher.taken)


class _NodeMatcher:
    def __init__(self, a: Side, b: Side, layers: dict[int, int], digests: _Digests):
        self.a, self.b, self.layers, self.digests = a, b, layers, digests
        self.pairs: dict[ir.Node, tuple[ir.Node, str]] = {}
        self.taken: set[ir.Node] = set()
        self.queue: list[tuple[ir.Node, ir.Node]] = []

    def group(self, side: Side, node: ir.Node, *, is_a: bool) -> str | None:
        """Names the node's block in B's terms; None for an A layer with no partner."""
        label = side.labels.get(node)
        if label is None:
            return OUTSIDE
        if not is_a:
            return label
        block = BlockId.try_parse(label)
        if block is None or block.layer not in self.layers:
            return None
        return str(BlockId(self.layers[block.layer], block.sub))

    def add(self, na: ir.Node, nb: ir.Node, how: str) -> bool:
        if na in self.pairs or nb in self.taken or na.op_type != nb.op_type \
                or na.domain != nb.domain:
            return False
        ga = self.group(self.a, na, is_a=True)
        if ga is None or ga != self.group(self.b, nb, is_a=False):
            return False
        self.pairs[na] = (nb, how)
        self.taken.add(nb)
        self.queue.append((na, nb))
        return True

    def by_block(self) -> None:
        spec_a, spec_b = self.a.spec, self.b.spec
        if spec_a is None or spec_b is None:
            return  # layers pair only where both sides have a spec
        for ia, ib in self.layers.items():
            la, lb = spec_a.layers[ia], spec_b.layers[ib]
            for pa, pb in zip(la.projections(), lb.projections(), strict=False):
                self.add(pa.matmul, pb.matmul, "block")
                add_a, add_b = _bias_add(pa), _bias_add(pb)
                if add_a is not None and add_b is not None:
                    self.add(add_a, add_b, "block")
            for (_, va), (_, vb) in zip(boundaries(la), boundaries(lb), strict=False):
                na, nb = va.producer(), vb.producer()
                if na is not None and nb is not None:
                    self.add(na, nb, "block")

    def by_key(self, how: str, key: Any) -> None:
        index_a = _unique(self.a.nodes, key)
        index_b = _unique(self.b.nodes, key)
        for k, na in index_a.items():
            if k in index_b:
                self.add(na, index_b[k], how)

    def spread(self) -> None:
        while self.queue:
            na, nb = self.queue.pop()
            for va, vb in zip(na.inputs, nb.inputs, strict=False):
                pa = va.producer() if va is not None else None
                pb = vb.producer() if vb is not None else None
                if pa is not None and pb is not None:
                    self.add(pa, pb, "structure")
            for va, vb in zip(na.outputs, nb.outputs, strict=False):
                for key, ca in _readers(va, self.pairs).items():
                    cb = _readers(vb, self.taken).get(key)
                    if ca is not None and cb is not None:
                        self.add(ca, cb, "structure")

    def by_sequence(self) -> None:
        left: dict[str | None, list[ir.Node]] = defaultdict(list)
        right: dict[str | None, list[ir.Node]] = defaultdict(list)
        for node in self.a.nodes:
            if node not in self.pairs:
                left[self.group(self.a, node, is_a=True)].append(node)
        for node in self.b.nodes:
            if node not in self.taken:
                right[self.group(self.b, node, is_a=False)].append(node)
        for group, nodes_a in left.items():
            nodes_b = right.get(group, [])
            if group is None or not nodes_b:
                continue
            ops_a = [n.op_type for n in nodes_a]
            ops_b = [n.op_type for n in nodes_b]
            seq = difflib.SequenceMatcher(None, ops_a, ops_b, autojunk=False)
            for block in seq.get_matching_blocks():
                for k in range(block.size):
                    self.add(nodes_a[block.a + k], nodes_b[block.b + k], "sequence")
            self.queue.clear()


def _bias_add(lin: Linear) -> ir.Node | None:
    if lin.bias is None:
        return None
    adds = [n for n in lin.matmul.outputs[0].consumers() if n.op_type == "Add"]
    return adds[0] if len(adds) == 1 else None


def _readers(value: ir.Value, exclude: Container[ir.Node]) -> dict[tuple, ir.Node | None]:
    """Unpaired readers of `value` keyed by (op type, input slot); None where ambiguous."""
    found: dict[tuple, ir.Node | None] = {}
    for node, slot in value.uses():
        if node in exclude:
            continue
        key = (node.op_type, slot)
        found[key] = None if key in found else node
    return found


def _unique(nodes: Iterable[ir.Node], key: Any) -> dict[Any, ir.Node]:
    counts: Counter = Counter()
    first: dict[Any, ir.Node] = {}
    for node in nodes:
        k = key(node)
        if k is not None:
            counts[k] += 1
            first.setdefault(k, node)
    return {k: n for k, n in first.items() if counts[k] == 1}


def _name_key(node: ir.Node) -> tuple | None:
    if not node.name:
        return None
    return (node.name, node.op_type, node.domain, len(node.inputs), attributes_key(node))


def _weights_key(node: ir.Node, digests: _Digests) -> tuple | None:
    found = [digests.of(v) for v in node.inputs
             if v is not None and v.const_value is not None and v.const_value.size > 1]
    if not found:
        return None
    return (node.op_type, node.domain, tuple(found))


def attributes_key(node: ir.Node) -> str:
    """Returns the node's attributes as one comparable string (subgraphs by type only)."""
    parts = []
    for name, attr in sorted(node.attributes.items()):
        value = attr.value
        if isinstance(value, ir.Graph | ir.TensorProtocol):
            value = type(value).__name__
        parts.append(f"{name}={value!r}")
    return ";".join(parts)


def node_change(na: ir.Node, nb: ir.Node, pairs: Mapping[ir.Node, tuple[ir.Node, str]],
                digests: _Digests) -> str | None:
    """Says what differs between two paired nodes (attributes, weights, inputs), or None."""
    reasons = set()
    if attributes_key(na) != attributes_key(nb):
        reasons.add("attributes")
    if len(na.inputs) != len(nb.inputs):
        reasons.add("inputs")
    for va, vb in zip(na.inputs, nb.inputs, strict=False):
        if va is None or vb is None:
            if (va is None) != (vb is None):
                reasons.add("inputs")
            continue
        da, db = digests.of(va), digests.of(vb)
        if da is not None or db is not None:
            if da != db:
                reasons.add("weights")
            continue
        pa, pb = va.producer(), vb.producer()
        if pa is None or pb is None:
            if (pa is None) != (pb is None) or va.name != vb.name:
                reasons.add("inputs")
        elif pairs.get(pa, (None, ""))[0] is not pb:
            reasons.add("inputs")
    return ", ".join(sorted(reasons)) or None


# ---------------------------------------------------------------- the diff as data


@dataclasses.dataclass
class Diff:
    """Two models and their correspondence, summarised by `to_dict` (the `--json` object)."""

    a: Side
    b: Side
    match: Correspondence
    digests: _Digests
    batch: int = 1
    seq_len: int = 128

    def to_dict(self) -> dict[str, Any]:
        """Returns per-layer records, the outside-layer group, totals and unmatched lists."""
        rows = self._node_rows()
        layers = [self._layer_record(ia, ib, rows.get(("a", ia) if ia is not None else ("b", ib),
                                                      []))
                  for ia, ib in self._layer_rows()]
        outside = _group_record(rows.get((OUTSIDE,), []))
        every = [n for entries in rows.values() for n in entries]
        totals = _group_record(every)
        del totals["node_list"]
        totals.update(params=[_params(self.a.model), _params(self.b.model)],
                      flops=[self._flops(self.a.spec), self._flops(self.b.spec)],
                      node_count=[len(self.a.nodes), len(self.b.nodes)])
        return {
            "a": self._side_record(self.a), "b": self._side_record(self.b),
            "batch": self.batch, "seq_len": self.seq_len,
            "layers": layers, "outside": outside, "totals": totals,
            "unmatched": {
                "layers_a": [r["a"] for r in layers if r["b"] is None],
                "layers_b": [r["b"] for r in layers if r["a"] is None],
                "nodes_a": [n["a"] for n in every if n["status"] == "removed"],
                "nodes_b": [n["b"] for n in every if n["status"] == "added"],
            },
            "identical": not any(n["status"] != "same" for n in every)
            and len(self.a.nodes) == len(self.b.nodes),
            "notes": self._notes(),
            "plan": self.b.planer.get("plan"), "report": self.b.planer.get("report"),
            "divergence": None,
        }

    def _side_record(self, side: Side) -> dict[str, Any]:
        spec = side.spec
        return {"path": str(side.path), "layers": len(spec.layers) if spec else None,
                "kind": spec.kind if spec else None, "hidden": spec.hidden if spec else None,
                "no_layers": side.no_layers, "planer": bool(side.planer),
                "nodes": len(side.nodes)}

    def _flops(self, spec: ModelSpec | None) -> int | None:
        return model_flops(spec, batch=self.batch, seq_len=self.seq_len) if spec else None

    def _notes(self) -> list[str]:
        notes = []
        for name, side in (("A", self.a), ("B", self.b)):
            if side.spec is None:
                notes.append(f"no Transformer layers found in {name} ({side.path.name}): "
                             f"{side.no_layers} Only node-level comparison is shown.")
        return notes

    def _layer_rows(self) -> list[tuple[int | None, int | None]]:
        rows: list[tuple[int | None, int | None]] = []
        paired_b = set(self.match.layers.values())
        for layer in self.a.spec.layers if self.a.spec else []:
            rows.append((layer.index, self.match.layers.get(layer.index)))
        for layer in self.b.spec.layers if self.b.spec else []:
            if layer.index not in paired_b:
                rows.append((None, layer.index))
        return rows

    def _node_rows(self) -> dict[tuple, list[dict[str, Any]]]:
        """Groups every node entry by the layer row it is shown in."""
        inverse = {ib: ia for ia, ib in self.match.layers.items()}
        rows: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
        for node in self.a.nodes:
            pair = self.match.nodes.get(node)
            entry = {"op": node.op_type, "a": node.name, "b": None, "how": None, "why": None,
                     "status": "removed"}
            if pair is not None:
                why = node_change(node, pair[0], self.match.nodes, self.digests)
                entry.update(b=pair[0].name, how=pair[1], why=why,
                             status="changed" if why else "same")
            rows[_row_of(self.a.labels.get(node), "a", {})].append(entry)
        for node in self.b.nodes:
            if node not in self.match.nodes_b:
                entry = {"op": node.op_type, "a": None, "b": node.name, "how": None,
                         "why": None, "status": "added"}
                rows[_row_of(self.b.labels.get(node), "b", inverse)].append(entry)
        return rows

    def _layer_record(self, ia: int | None, ib: int | None,
                      nodes: list[dict[str, Any]]) -> dict[str, Any]:
        la = self.a.spec.layers[ia] if ia is not None and self.a.spec else None
        lb = self.b.spec.layers[ib] if ib is not None and self.b.spec else None
        ra = layer_record(la, batch=self.batch, seq_len=self.seq_len) if la else {}
        rb = layer_record(lb, batch=self.batch, seq_len=self.seq_len) if lb else {}
        record: dict[str, Any] = {"a": ia, "b": ib,
                                  "status": "paired" if la and lb else "unmatched"}
        for key in ("heads", "head_size", "hidden", "ffn", "activation", "norm", "params",
                    "flops"):
            record[key] = [ra.get(key), rb.get(key)]
        changes = []
        for key, label in (("heads", "heads"), ("head_size", "head size"), ("hidden", "hidden"),
                           ("ffn", "FFN"), ("activation", "activation"), ("norm", "norm")):
            if la and lb and ra[key] != rb[key]:
                changes.append(f"{label} {ra[key]}->{rb[key]}")
        record["projections"] = {}
        if la and lb:
            for role, pa, pb in zip(ROLES, la.projections(), lb.projections(), strict=False):
                record["projections"][role] = relation(pa, pb, self.digests)
            refit = [r for r, how in record["projections"].items() if how == "different"]
            if refit:
                changes.append(f"weights changed: {', '.join(refit)}")
        plan_layer = self._plan_layer(ib)
        changes.extend(_plan_changes(plan_layer))
        record.update(plan=plan_layer, passes=self._passes(ib))
        record.update(_group_record(nodes))
        if la and lb and not changes and any(record["nodes"][k] for k in
                                             ("changed", "added", "removed")):
            by = f" by {', '.join(record['passes'])}" if record["passes"] else ""
            changes.append(f"rewritten{by}, same weights")
        record["changes"] = changes
        return record

    def _plan_layer(self, ib: int | None) -> dict[str, Any] | None:
        plan = self.b.planer.get("plan") or {}
        layers = plan.get("layers") if isinstance(plan, dict) else None
        if ib is None or not isinstance(layers, list) or ib >= len(layers):
            return None
        return layers[ib] if isinstance(layers[ib], dict) else None

    def _passes(self, ib: int | None) -> list[str]:
        if ib is None:
            return []
        return sorted({node.metadata_props.get(PROVENANCE_PASS, "") for node in self.b.nodes
                       if _layer_of(node.metadata_props.get(PROVENANCE_BLOCK)) == ib} - {""})


def _layer_of(label: str | None) -> int | None:
    """Returns the layer index of a block id, or None for a label that is not one."""
    block = BlockId.try_parse(label)
    return block.layer if block is not None else None


def _row_of(label: str | None, side: str, inverse: Mapping[int, int]) -> tuple:
    index = _layer_of(label)
    if index is None:
        return (OUTSIDE,)
    if side == "b":
        return ("a", inverse[index]) if index in inverse else ("b", index)
    return ("a", index)


def _plan_changes(entry: Mapping[str, Any] | None) -> list[str]:
    if not entry:
        return []
    changes = []
    moe = entry.get("moe")
    if isinstance(moe, dict):
        how = f"top-{moe['top_k']}" if moe.get("top_k") else f"tau {moe.get('tau')}"
        changes.append(f"MoE {moe.get('experts')} experts {how}")
    if entry.get("skim_keep") is not None:
        changes.append(f"skim {entry['skim_keep']}")
    return changes


def _group_record(nodes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    counts = Counter(n["status"] for n in nodes)
    ops: dict[str, dict[str, int]] = defaultdict(lambda: {"added": 0, "removed": 0, "changed": 0})
    for n in nodes:
        if n["status"] != "same":
            ops[n["op"]][n["status"]] += 1
    return {"nodes": {k: counts.get(k, 0) for k in ("same", "changed", "added", "removed")},
            "ops": dict(sorted(ops.items())), "node_list": list(nodes)}


def _params(model: ir.Model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and tensor.dtype.is_floating_point():
            total += int(np.prod(tensor.shape.numpy()))
    return total


def diff_models(path_a: str | Path, path_b: str | Path, *, batch: int = 1,
                seq_len: int = 128) -> Diff:
    """Reads both models and pairs their layers and nodes."""
    a, b = read_side(path_a), read_side(path_b)
    digests = _Digests()
    match = correspond(a, b, digests)
    return Diff(a, b, match, digests, batch=batch, seq_len=seq_len)


def format_delta(pair: list[Any], scale: float = 1.0) -> str:
    """Formats the change from pair[0] to pair[1] (divided by `scale`), or "-" if unknown."""
    if None in pair:
        return "-"
    diff = (pair[1] - pair[0]) / scale
    return f"{diff:+,.0f}" if scale == 1.0 else f"{diff:+.3f}"
