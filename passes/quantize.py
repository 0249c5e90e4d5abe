"""Quantizes the chosen blocks' projections to INT8 through onnxruntime.quantization.

Dimensions: B batch, S sequence, D input width, N output width of one projection.

Before:  x_BSD ─ MatMul(w_DN, float) ─ y_BSN
dynamic: x_BSD ─ DynamicQuantizeLinear ─ MatMulInteger(w_DN int8) ─ Cast ─ Mul(scales) ─ y_BSN
static:  x_BSD ─ QuantizeLinear ─ DequantizeLinear ─ MatMul ─ QuantizeLinear ─ DequantizeLinear
         w_DN int8 ─ DequantizeLinear(per-output-channel scale) ──┘          ─ y_BSN  (QDQ,
                                                                   ranges from calibration)

ONNX Runtime fuses both forms into integer GEMMs when it loads the model (VNNI/AMX
dot products where the CPU has them): DynamicQuantizeMatMul / MatMulIntegerToFloat, and
QLinearMatMul for static, which needs uint8 activations on ORT's CPU provider (with
int8 ones it leaves a float MatMul); symmetric int8 activations are for TensorRT.

Planer writes none of the quantization itself: the chosen projections go, by name, to
`quantize_dynamic` or `quantize_static` (`nodes_to_quantize`), so only the planned
blocks change. The projections are the MatMuls of the ModelSpec (`Linear.matmul`)
found when the model was read, or their re-emitted form from head pruning
(`layer3/attn/q/MatMul`); each is renamed `<block>/<role>/MatMul` first, so ORT's
derived names are planer's. Afterwards every node of a quantized projection gets a
block-derived name (`layer3/attn/q/int8/Mul`, `layer3/attn/q_k_v/int8/DynamicQuantizeLinear`
for the input the three share) and provenance (`planer.pass = quantize`).

onnxruntime.quantization reads and writes files, so the stage saves the model to a
scratch folder (external data, no 2 GiB limit), quantizes there, reads the result
back into memory and swaps the new graph into the same `ir.Model`, so callers holding
the model see the quantized graph.

Requires: the listed blocks' projections still in the graph (not dropped, not split
into experts), static mode needs calibration feeds.  Preserves: graph inputs/outputs,
every node outside the listed projections (names and provenance included).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

from planer.compiler.calibration import CalibrationSet
from planer.compiler.errors import BadInputError, PreconditionError
from planer.compiler.irutil import const_array
from planer.compiler.names import PROVENANCE_BLOCK, PROVENANCE_PASS, BlockId, PassName
from planer.compiler.plan import INT8_BLOCKS, INT8_MODES, Int8Plan, Plan
from planer.compiler.spec import LayerSpec, Linear, ModelSpec

logger = logging.getLogger(__name__)

PASS_NAME = PassName.QUANTIZE
ROLES = {"attn": ("q", "k", "v", "o"), "ffn": ("w1", "w2")}
ROLE_ORDER = ("q", "k", "v", "o", "w1", "w2")

Feed = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """Which blocks of which layers become INT8, and how static ranges are calibrated.

    Attributes:
        layers: layer index -> the blocks to quantize and the mode (compiler.plan.Int8Plan).
            Layers not listed stay float.
        symmetric_activations: static mode: zero-point 0 for activations (TensorRT
            needs it); otherwise asymmetric uint8 activations, which keep the range of
            one-sided tensors such as GELU outputs.
        calibration_samples: static mode: at most this many calibration rows set the
            activation ranges (min/max).
    """

    layers: Mapping[int, Int8Plan]
    symmetric_activations: bool = False
    calibration_samples: int = 128

    @staticmethod
    def from_plan(plan: Plan, **options: Any) -> QuantizeConfig:
        """Returns the config a plan's `int8` fields ask for."""
        return QuantizeConfig({i: la.int8 for i, la in enumerate(plan.layers)
                               if la.int8 is not None}, **options)

    def modes(self) -> set[str]:
        return {choice.mode for choice in self.layers.values()}


@dataclasses.dataclass(frozen=True)
class _Target:
    """One projection to quantize: its block, role and (planer) node name."""

    block: BlockId
    role: str
    name: str
    output: str  # the MatMul's output value name, kept by the quantizer
    mode: str


def apply_quantize(model: ir.Model, spec: ModelSpec, config: QuantizeConfig,
                   calib: CalibrationSet | None = None) -> int:
    """Quantizes the listed blocks' projections in place; returns how many blocks changed.

    Args:
        model: the model to rewrite (its graph is replaced by the quantized one).
        spec: the model's blocks as found when it was read; attention blocks that head
            pruning re-emitted are found by the names it gave them.
        config: what to quantize.
        calib: calibration batches; required when any layer is static.

    Raises:
        PreconditionError: a listed block's projections are gone, or ORT left one float.
        BadInputError: static mode without calibration.
    """
    if not config.layers:
        return 0
    if "static" in config.modes() and calib is None:
        raise BadInputError("static int8 sets activation ranges from calibration data; pass "
                            "--calibration (or use mode \"dynamic\").")
    targets = _targets(model, spec, config)
    with tempfile.TemporaryDirectory(prefix="planer-int8-") as scratch:
        quantized = _quantize_files(model, targets, config, calib, Path(scratch))
        _check_quantized(quantized, targets)
        _mark(quantized.graph, targets, before={n.name or "" for n in model.graph})
        _swap_graph(model, quantized)
    blocks = {(t.block, t.mode) for t in targets}
    logger.info("quantized %d projections in %d blocks to int8", len(targets), len(blocks))
    return len(blocks)


def apply_int8(model: ir.Model, spec: ModelSpec, plan: Plan, calib: CalibrationSet | None,
               *, target: str = "ort") -> dict[str, Any]:
    """Quantizes what the plan's `int8` fields ask for; returns report.json's `int8` entry.

    Runs last among the rewrites (after ORT kernel choice, before emission): the other
    passes read float weights. `spec` is the model as read (the compile's source spec):
    the finder cannot re-read a graph in ORT's kernel spelling, and the source spec's
    FFN MatMuls are still the graph's own nodes. `target="tensorrt"` makes static
    activations symmetric and refuses dynamic mode. Returns an empty dict when the plan
    quantizes nothing (the model is untouched).

    Raises:
        BadInputError: static mode without calibration, or dynamic mode for TensorRT.
        PreconditionError: a planned block is gone from the graph or already quantized.
    """
    config = QuantizeConfig.from_plan(plan, symmetric_activations=target == "tensorrt")
    dynamic = sorted(i for i, c in config.layers.items() if c.mode == "dynamic")
    if target == "tensorrt" and dynamic:
        raise BadInputError(f"plan layer {dynamic[0]} asks for dynamic int8, which TensorRT "
                            'does not run (MatMulInteger); use mode "static" (QDQ).')
    blocks = apply_quantize(model, spec, config, calib)
    if not blocks:
        return {}
    info: dict[str, Any] = {
        str(BlockId(i)): {**choice.to_dict(),
                          "matmuls": sum(len(ROLES[k]) for k in choice.kinds())}
        for i, choice in sorted(config.layers.items())
    }
    if "static" in config.modes() and calib is not None:
        samples = sum(len(next(iter(f.values()))) for f in _calibration_feeds(calib, config))
        info["calibration"] = {"samples": samples, "method": "minmax",
                               "symmetric_activations": config.symmetric_activations}
    return info


# ---------------------------------------------------------------- choosing the nodes


def _targets(model: ir.Model, spec: ModelSpec, config: QuantizeConfig) -> list[_Target]:
    """Resolves each listed projection to its node, then gives each its planer name.

    Every node is resolved before any is renamed, so a refused config changes nothing.
    """
    graph = model.graph
    by_name = {node.name: node for node in graph if node.name}
    found: list[tuple[BlockId, str, ir.Node, str]] = []
    for index, choice in sorted(config.layers.items()):
        _check_choice(index, choice, len(spec.layers))
        for kind in choice.kinds():
            block = BlockId(index, kind)
            for role, linear in _linears(spec.layers[index], kind).items():
                node = _projection_node(graph, by_name, block, role, linear)
                found.append((block, role, node, choice.mode))
    for block, role, node, _ in found:
        name = f"{block}/{role}/MatMul"
        if node.name != name and name in by_name:
            raise PreconditionError(f"{name} names another node already; planer cannot name "
                                    "the projection it quantizes.")
    targets = []
    for block, role, node, mode in found:
        node.name = f"{block}/{role}/MatMul"
        targets.append(_Target(block, role, node.name, str(node.outputs[0].name), mode))
    return targets


def dynamic_int8_weights(model: ir.Model, spec: ModelSpec, plan: Plan) -> set[str]:
    """Names the weights of the projections `apply_int8` will quantize in dynamic mode.

    Resolved as `apply_int8` resolves them (the source spec, then head pruning's names),
    without renaming anything; recovery simulates their rounding (recovery.fakequant).
    A projection that is gone (split into experts) is skipped: quantizing it fails later
    with its own sentence.
    """
    config = QuantizeConfig.from_plan(plan)
    graph = model.graph
    by_name = {node.name: node for node in graph if node.name}
    names: set[str] = set()
    for index, choice in sorted(config.layers.items()):
        if choice.mode != "dynamic" or not 0 <= index < len(spec.layers):
            continue
        for kind in choice.kinds():
            block = BlockId(index, kind)
            for role, linear in _linears(spec.layers[index], kind).items():
                try:
                    node = _projection_node(graph, by_name, block, role, linear)
                except PreconditionError:
                    continue
                if node.inputs[1] is not None and const_array(node.inputs[1]) is not None:
                    names.add(str(node.inputs[1].name))
    return names


def _linears(layer: LayerSpec, kind: str) -> dict[str, Linear]:
    a, f = layer.attention, layer.ffn
    if kind == "attn":
        return {"q": a.q, "k": a.k, "v": a.v, "o": a.o}
    return {"w1": f.w1, "w2": f.w2}


def _check_choice(index: int, choice: Int8Plan, layers: int) -> None:
    if not 0 <= index < layers:
        raise PreconditionError(f"int8 asks for layer {index}, but the model has {layers}.")
    if choice.blocks not in INT8_BLOCKS or choice.mode not in INT8_MODES:
        raise PreconditionError(f"layer {index}: int8 {choice.to_dict()} is not one of blocks "
                                f"{INT8_BLOCKS} x modes {INT8_MODES}.")


def _projection_node(graph: ir.Graph, by_name: Mapping[str, ir.Node], block: BlockId,
                     role: str, linear: Linear) -> ir.Node:
    """Returns the projection's MatMul as it is now in `graph`.

    In order: the spec's own node; the node head pruning re-emitted in its place (it
    names every projection `<block>/<role>/MatMul`); the node of the spec's name reading
    the spec's weight (the same node after an earlier quantization swapped the graph).
    """
    if any(n.metadata_props.get(PROVENANCE_PASS) == PASS_NAME
           and n.metadata_props.get(PROVENANCE_BLOCK) == str(block)
           and (n.name or "").startswith(f"{block}/{role}/") for n in graph):
        raise PreconditionError(f"{block}'s {role} projection is already quantized.")
    node: ir.Node | None = linear.matmul if linear.matmul.graph is graph else None
    planer_named = by_name.get(f"{block}/{role}/MatMul")
    if node is None and planer_named is not None \
            and planer_named.metadata_props.get(PROVENANCE_BLOCK) == str(block):
        node = planer_named
    same = by_name.get(linear.matmul.name or "")
    if node is None and same is not None and len(same.inputs) == 2 \
            and same.inputs[1] is not None and same.inputs[1].name == linear.weight.name:
        node = same
    if node is None or node.op_type != "MatMul":
        raise PreconditionError(f"{block}'s {role} projection is no longer in the graph "
                                "(dropped or split into experts), so it cannot be quantized.")
    return node


# ---------------------------------------------------------------- running ORT's quantizer


def _quantize_files(model: ir.Model, targets: Sequence[_Target], config: QuantizeConfig,
                    calib: CalibrationSet | None, scratch: Path) -> ir.Model:
    """Saves `model`, quantizes the targets in the file, reads the result back into memory."""
    source = scratch / "float.onnx"
    ir.save(model, source, external_data="float.onnx.data")
    names = {mode: [t.name for t in targets if t.mode == mode] for mode in INT8_MODES}
    feeds = _calibration_feeds(calib, config) if calib is not None else []
    inputs = {str(v.name) for v in model.graph.inputs}
    result = quantize_file(source, scratch / "int8.onnx", names,
                           feeds=[{k: v for k, v in f.items() if k in inputs} for f in feeds],
                           symmetric_activations=config.symmetric_activations)
    quantized = ir.load(result)
    ir.external_data.load_to_model(quantized)  # the scratch folder goes away
    return quantized


def quantize_file(source: Path, destination: Path, nodes: Mapping[str, Sequence[str]], *,
                  feeds: Sequence[Feed] = (), symmetric_activations: bool = False) -> Path:
    """Quantizes the named MatMuls of the model file at `source` the way planer emits INT8.

    Static first, so its calibration (over `feeds`) sees the float model; dynamic then
    rewrites its own nodes only. Intermediate and final files are written next to
    `destination` (with external data); the result's path is returned (`source` when
    nothing is named). The block profiler quantizes its variants through this too, so
    what it times is what the pass emits.

    Args:
        source: the float model.
        destination: where the quantized model goes.
        nodes: mode ("dynamic"/"static") -> names of the MatMul nodes to quantize so.
        feeds: static mode: the calibration inputs.
        symmetric_activations: static mode: zero-point 0 activations (TensorRT).
    """
    current = source
    for mode in ("static", "dynamic"):
        names = list(nodes.get(mode, ()))
        if not names:
            continue
        out = destination.with_name(f"{destination.stem}.{mode}{destination.suffix}")
        with _quiet_preprocess_advice():
            if mode == "static":
                quantize_static(
                    current, out, _Feeds(feeds), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul"], nodes_to_quantize=names, per_channel=True,
                    activation_type=(QuantType.QInt8 if symmetric_activations
                                     else QuantType.QUInt8),
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                    use_external_data_format=True,
                    extra_options=_static_options(symmetric_activations))
            else:
                quantize_dynamic(current, out, op_types_to_quantize=["MatMul"],
                                 nodes_to_quantize=names, weight_type=QuantType.QInt8,
                                 use_external_data_format=True)
        current = out
    return current


def _static_options(symmetric_activations: bool) -> dict[str, Any]:
    return {
        "ActivationSymmetric": symmetric_activations,
        "WeightSymmetric": True,
        # The output keeps its Q/DQ pair: ORT's CPU provider fuses DQ ─ MatMul ─ Q into
        # QLinearMatMul, but without the Q it dequantizes the weight on every run and
        # multiplies in float (measured 2x slower than float here).
    }


def _calibration_feeds(calib: CalibrationSet, config: QuantizeConfig) -> list[Feed]:
    """Returns the first `calibration_samples` rows of the fitting batches."""
    feeds, left = [], config.calibration_samples
    for batch in calib.batches:
        rows = len(next(iter(batch.values())))
        feeds.append({k: v[:left] for k, v in batch.items()})
        left -= min(rows, left)
        if left <= 0:
            break
    return feeds


class _Feeds(CalibrationDataReader):
    """Hands ORT's calibrator planer's calibration batches, one at a time."""

    def __init__(self, feeds: Sequence[Feed]):
        self._feeds = list(feeds)
        self._next = iter(self._feeds)

    def get_next(self) -> Feed | None:
        return next(self._next, None)

    def rewind(self) -> None:
        self._next = iter(self._feeds)


class _DropPreprocessAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _quiet_preprocess_advice() -> Iterator[None]:
    """Silences ORT's advice to pre-process, which planer skips on purpose.

    Its pre-processing runs ORT's graph optimizer, which would fuse and rename the
    projections planer names blocks by; the advice would only alarm the user.
    """
    root = logging.getLogger()
    quiet = _DropPreprocessAdvice()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


# ---------------------------------------------------------------- names and provenance


def _check_quantized(model: ir.Model, targets: Sequence[_Target]) -> None:
    """Refuses a result where ORT's quantizer left a listed projection in float."""
    nodes = {node.name: node for node in model.graph}
    for t in targets:
        node = nodes.get(t.name)
        kept = node is not None and node.op_type == "MatMul"
        dequantized = node is not None and kept and all(
            _producer_op(v) == "DequantizeLinear" for v in node.inputs)
        if (t.mode == "dynamic" and kept) or (t.mode == "static" and not dequantized):
            raise PreconditionError(f"onnxruntime.quantization left {t.name} in float; "
                                    f"{t.block} cannot be quantized {t.mode}.")


def _producer_op(value: ir.Value | None) -> str | None:
    producer = value.producer() if value is not None else None
    return producer.op_type if producer is not None else None


def _mark(graph: ir.Graph, targets: Sequence[_Target], *, before: set[str]) -> None:
    """Names the quantizer's nodes after their blocks and stamps planer's provenance.

    Each projection owns the new nodes next to it, up to the float graph: upstream its
    weight, scale and input quantization, downstream (static) the Q/DQ pair on its
    output. An input quantized once for several projections (x for Q, K and V) is
    named after all of them.
    """
    owners: dict[ir.Node, list[_Target]] = {}
    producers = {v.name: node for node in graph for v in node.outputs}
    for t in targets:
        stack, seen = [producers.get(t.output)], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            owners.setdefault(node, []).append(t)
            upstream = [v.producer() for v in node.inputs if v is not None]
            downstream = [u for v in node.outputs for u in v.consumers()
                          if node.name == t.name or u.op_type == "DequantizeLinear"]
            stack.extend(n for n in (*upstream, *downstream)
                         if n is not None and n.name not in before)
    used: set[str] = set()
    for node in graph:  # graph order keeps the suffixes stable
        mine = owners.get(node)
        if not mine:
            continue
        roles = sorted({t.role for t in mine}, key=ROLE_ORDER.index)
        block = min(t.block for t in mine)
        if node.name not in {t.name for t in mine}:
            part = "weight/" if _reads_constants_only(node) else ""
            node.name = _unique(f"{block}/{'_'.join(roles)}/int8/{part}{node.op_type}", used)
        node.metadata_props[PROVENANCE_PASS] = PASS_NAME
        node.metadata_props[PROVENANCE_BLOCK] = str(block)


def _reads_constants_only(node: ir.Node) -> bool:
    """True for the weight's own nodes (its DequantizeLinear), which read initializers only."""
    return all(v is None or v.const_value is not None or v.is_initializer() for v in node.inputs)


def _unique(name: str, used: set[str]) -> str:
    candidate, n = name, 0
    while candidate in used:
        n += 1
        candidate = f"{name}_{n}"
    used.add(candidate)
    return candidate


def _swap_graph(model: ir.Model, quantized: ir.Model) -> None:
    """Makes `model` hold the quantized graph (and the opsets and IR version it needs)."""
    model.graph = quantized.graph
    model.ir_version = quantized.ir_version
    model.functions.clear()
    model.functions.update(quantized.functions)
