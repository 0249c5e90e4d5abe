"""Decides from the graph alone, before anything is calibrated, what compile can rewrite.

    model.onnx ─ load ─ prepare ─ canonicalize ─ find blocks ─ analyze ─▶ Support
                        │                                        │
                        │ weight-only int8 folded to float,      │ per layer: can head
                        │ quantized activations refused,         │ pruning and channel
                        │ fused ORT kernels spelled out          │ pruning rewrite it?
                        ▼                                        ▼
                  UnsupportedModelError (one sentence naming the op type and node)

`inspect` prints the verdict (per layer and for the model); `compile` calls
`require_supported` right after reading, so a model it cannot rewrite stops there with
the same sentence instead of failing its own check after minutes of fitting.

What a layer needs beyond what the finder already checks:

* Every extra term added to the attention scores (mask, bias) must either be the same
  for every head (head axis 1 or absent) or carry the heads on axis -3 with a size the
  graph's shapes state (an MPNet or T5 relative-position bias, ALiBi slopes): head
  pruning replays these terms on fewer heads and slices such a term to the kept ones.
  A term that varies per head along an axis planer cannot place is refused.
* Rotary cos/sin must broadcast over the heads or hold one row per head on axis -3, as
  their shapes state (compiler.rotary); head pruning gathers the kept heads' rows.
* Projection weights must be float32: the refit solves in float64 and writes float32.

An unplaceable per-head term stops head pruning only: channel pruning still rewrites
the layer, the FLOPs and latency allocations keep its heads, and a plan that prunes them
is refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir

from planer.compiler.contrib import expand_contrib_ops
from planer.compiler.contrib_emit import node_label
from planer.compiler.errors import UnsupportedModelError
from planer.compiler.irutil import const_array
from planer.compiler.kv_cache import check_kv_cache
from planer.compiler.plan import Plan
from planer.compiler.quantized import check_quantized, dequantize_weights
from planer.compiler.rotary import head_rows
from planer.compiler.spec import AttentionSpec, LayerSpec, ModelSpec

# Inputs that carry only shapes, indices or axes, never per-element values.
_DATA_INPUTS = {
    "Reshape": (0,), "Expand": (0,), "Tile": (0,), "Unsqueeze": (0,), "Squeeze": (0,),
    "Slice": (0,), "Gather": (0, 1), "Transpose": (0,), "Cast": (0,), "Identity": (0,),
    "Shape": (), "Size": (), "ConstantOfShape": (), "Range": (),
}


@dataclasses.dataclass(frozen=True)
class LayerSupport:
    """What compile can do to one layer; each field is None or the sentence saying why not.

    Attributes:
        fatal: compile cannot rewrite the layer at all.
        heads: head pruning cannot rewrite it (channel pruning still can; its heads stay).
    """

    fatal: str | None = None
    heads: str | None = None

    @property
    def supported(self) -> bool:
        return self.fatal is None and self.heads is None

    @property
    def verdict(self) -> str:
        """One word for the inspect table: yes, "FFN only" (heads stay) or no."""
        return "no" if self.fatal else "FFN only" if self.heads else "yes"

    def to_dict(self) -> dict[str, Any]:
        """Returns the layer's verdict as `inspect --json` prints it."""
        reason = self.fatal or self.heads
        return {"supported": self.supported, "heads_prunable": reason is None,
                **({"reason": reason} if reason else {})}


@dataclasses.dataclass(frozen=True)
class Support:
    """Whether compile can rewrite each layer, and why not where it cannot."""

    layers: tuple[LayerSupport, ...]

    @property
    def supported(self) -> bool:
        return all(layer.supported for layer in self.layers)

    @property
    def reasons(self) -> list[str]:
        return [f"layer {i}: {la.fatal or la.heads}" for i, la in enumerate(self.layers)
                if not la.supported]

    def to_dict(self) -> dict[str, Any]:
        """Returns the model verdict as `inspect --json` prints it."""
        return {"supported": self.supported, "unsupported": self.reasons}


def prepare(model: ir.Model) -> dict[str, int]:
    """Reads foreign spellings into planer's graph form, in place; call before canonicalize.

    Returns counts: weights dequantized, fused operators expanded.

    Raises:
        UnsupportedModelError: quantized activations, a past key/value cache input, or a
            fused operator planer cannot spell out (the sentence names it).
    """
    check_kv_cache(model)
    check_quantized(model)
    dequantized = dequantize_weights(model)
    return {"dequantized_weights": dequantized, "expanded_ops": expand_contrib_ops(model)}


def analyze(spec: ModelSpec) -> Support:
    """Checks every layer of a read model for parts compile cannot rewrite."""
    return Support(tuple(LayerSupport(fatal=_fatal_problem(layer),
                                      heads=head_pruning_problem(layer))
                         for layer in spec.layers))


def require_supported(spec: ModelSpec, plan: Plan | None = None) -> None:
    """Raises, before any fitting, when compile cannot rewrite the model (or `plan`).

    A layer whose heads cannot be pruned is fine as long as the plan keeps them all
    (allocation under a FLOPs or latency target does: passes.prune_fit).

    Raises:
        UnsupportedModelError: a layer holds a construct planer cannot rewrite, or the
            plan prunes heads where head pruning cannot.
    """
    support = analyze(spec)
    fatal = [(i, la.fatal) for i, la in enumerate(support.layers) if la.fatal]
    if fatal:
        i, reason = fatal[0]
        more = f" ({len(fatal) - 1} more layers alike)" if len(fatal) > 1 else ""
        raise UnsupportedModelError(f"layer {i}: {reason}{more}.")
    if plan is None:
        return
    for layer, la, choice in zip(spec.layers, support.layers, plan.layers, strict=True):
        if la.heads and choice.heads < layer.attention.heads:
            raise UnsupportedModelError(
                f"the plan prunes layer {layer.index} to {choice.heads} of "
                f"{layer.attention.heads} heads, but {la.heads}; keep its heads at "
                f"{layer.attention.heads} (its FFN can still be pruned).")


def head_pruning_problem(layer: LayerSpec) -> str | None:
    """Returns why head pruning cannot rewrite `layer`, or None when it can."""
    return _per_head_term(layer.attention) or _rotary_rows(layer.attention)


def _rotary_rows(attn: AttentionSpec) -> str | None:
    """Names a rotary cos/sin whose head axis the graph's shapes do not tell."""
    for role, rotary in sorted(attn.rotary.items()):
        for term, mul in ((rotary.cos, rotary.nodes[1]), (rotary.sin, rotary.nodes[2])):
            if attn.heads > 1 and head_rows(term, attn.heads, attn.x) is None:
                return (f"its rotary embedding multiplies {role.upper()} by {term.name!r} "
                        f"at {node_label(mul)}, whose shape does not tell whether "
                        "it holds one row per head, so head pruning cannot slice it")
    return None


def _fatal_problem(layer: LayerSpec) -> str | None:
    for lin in layer.projections():
        dtype = lin.weight.const_value.dtype if lin.weight.const_value is not None else None
        if dtype is not None and dtype != ir.DataType.FLOAT:
            return (f"the weights of {node_label(lin.matmul)} are {dtype.name.lower()}; "
                    "planer compiles float32 models, so convert the model to float32 first")
    return None


def per_head_operands(attn: AttentionSpec) -> list[tuple[int, int]]:
    """Returns (score step, input position) of each score term with a head axis to slice.

    Such a term is [.., H, S, S] with H = the layer's head count on axis -3 (the scores'
    head axis, by broadcasting), known from the graph's shapes; head pruning keeps its
    rows of the kept heads (an MPNet or T5 relative-position bias, ALiBi slopes).
    """
    found = []
    for index, step in enumerate(attn.score_ops):
        for position, operand in enumerate(step.inputs):
            if position != step.scores_index and operand is not None \
                    and _static_head_axis(operand) == attn.heads > 1:
                found.append((index, position))
    return found


def _per_head_term(attn: AttentionSpec) -> str | None:
    """Names a score term that differs per head in a way head pruning cannot slice."""
    sliceable = set(per_head_operands(attn))
    for index, step in enumerate(attn.score_ops):
        for position, operand in enumerate(step.inputs):
            if position == step.scores_index or operand is None \
                    or (index, position) in sliceable:
                continue
            how = _head_axis(operand, attn.heads)
            if how is not None:
                node = operand.producer()
                where = f"from {node_label(node)}" if node is not None else \
                    f"from graph input {operand.name!r}"
                return (f"its attention scores add a per-head term {where} ({how}), which "
                        "head pruning cannot slice: its head axis is not known to be axis -3 "
                        f"of size {attn.heads}")
    return None


def _static_head_axis(value: ir.Value) -> int | None:
    shape = value.shape
    if shape is None or len(shape) < 3:
        return None
    dim = shape[len(shape) - 3]
    return dim if isinstance(dim, int) else None


def _head_axis(value: ir.Value, heads: int) -> str | None:
    """Says why `value` varies per head (`heads` > 1), or returns None when it cannot."""
    dim = _static_head_axis(value)
    if dim is not None:
        return f"shape {_dims(value.shape)}" if dim > 1 else None  # type: ignore[arg-type]
    if heads > 1 and _reaches_head_constant(value, heads):
        return f"computed from a constant with an axis of {heads}, the head count"
    if value.producer() is None and value.const_value is None and \
            (value.shape is None or len(value.shape) >= 3):
        # A graph input could be fed [B, H, S, S] as well as [B, 1, S, S].
        return "a graph input whose head axis is not fixed"
    return None


def _reaches_head_constant(value: ir.Value, heads: int, budget: int = 64) -> bool:
    """Tells whether a constant with an axis of length `heads` feeds `value`'s elements."""
    stack, seen = [value], set()
    while stack and budget > 0:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        budget -= 1
        array = const_array(item)
        if array is not None:
            if array.size > 1 and heads in array.shape:
                return True
            continue
        producer = item.producer()
        if producer is None:
            continue
        positions = _DATA_INPUTS.get(producer.op_type, range(len(producer.inputs)))
        stack.extend(producer.inputs[p] for p in positions  # type: ignore[misc]
                     if p < len(producer.inputs) and producer.inputs[p] is not None)
    return False


def _dims(shape: ir.Shape) -> str:
    names = [str(d) if isinstance(d, int) or (d.value and not str(d.value).startswith("unk__"))
             else "?" for d in shape]
    return "[" + ", ".join(names) + "]"


