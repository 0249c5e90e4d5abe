"""Refuses decoder exports that carry a key/value cache, naming the cache input.

A cached decoder export (``use_cache=True`` with ``past_key_values``) takes each layer's
earlier keys and values as graph inputs and appends this step's to them:

    past_key_BHPd ─┐
    x ─ K proj ─ heads ─ Concat(axis=-2) ─ key_BHTd ─ MatMul(q, keyᵀ) ─ Softmax ─ ...
                                        └─▶ present_key (graph output)

Head pruning changes H per layer, so the cache a pruned model reads and writes would
no longer be the shape the caller holds; planer compiles the cache-free export (one
full-length prompt per call, the causal mask inside) and says so here, before the
finder reports a Concat where it expected a projection.
"""

from __future__ import annotations

from collections import deque

import onnx_ir as ir

from planer.compiler.contrib_emit import node_label
from planer.compiler.errors import UnsupportedModelError

# Ops that only move a cache tensor's elements around on its way to the Concat or MatMul;
# after the Concat, keys may also be scaled (decomposed SDPA multiplies Kᵀ by d^-1/4).
_LAYOUT = {"Transpose", "Cast", "Reshape", "Identity", "Unsqueeze", "Squeeze", "Expand",
           "Slice", "Split"}
_SCALE = {"Mul", "Div"}
_FLOAT = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


def check_kv_cache(model: ir.Model) -> None:
    """Raises when a key/value cache goes into attention (an input) or comes out (an output).

    Raises:
        UnsupportedModelError: names the first cache input (or output) and the Concat that
            extends it.
    """
    for value in model.graph.inputs:
        if value.name in model.graph.initializers or value.dtype not in _FLOAT:
            continue
        concat = _cache_concat(value)
        if concat is not None:
            raise UnsupportedModelError(
                f"input {value.name!r} is a past key/value cache ({node_label(concat)} appends "
                "this step's keys or values to it before attention); planer compiles decoders "
                "without a cache, since pruning heads would change every layer's cache shape: "
                "export the model with use_cache=False (no past_key_values inputs) and compile "
                "that.")
    check_kv_cache_outputs(model)


def check_kv_cache_outputs(model: ir.Model) -> None:
    """Raises when a graph output returns a grown key/value cache (``present_*``).

    Exports made with ``use_cache=True`` but without past inputs still append the new
    keys to an empty cache and return it, so the finder would meet a Concat in K's place.

    Raises:
        UnsupportedModelError: names the first such output and its Concat.
    """
    for value in model.graph.outputs:
        concat = _producing_concat(value)
        if concat is not None and _reached(concat.outputs[0], stop={"MatMul"},
                                           through=_LAYOUT | _SCALE):
            raise UnsupportedModelError(
                f"output {value.name!r} returns a key/value cache ({node_label(concat)} "
                "appends this step's keys or values to it before attention); planer compiles "
                "decoders without a cache, since pruning heads would change every layer's "
                "cache shape: export the model with use_cache=False (no past_key_values "
                "inputs or present outputs) and compile that.")


def _producing_concat(value: ir.Value, depth: int = 8) -> ir.Node | None:
    """Follows layout ops back from `value` to the Concat computing it, if any."""
    for _ in range(depth):
        node = value.producer()
        if node is None:
            return None
        if node.op_type == "Concat":
            return node
        if node.op_type not in _LAYOUT or node.inputs[0] is None:
            return None
        value = node.inputs[0]
    return None


def _cache_concat(value: ir.Value) -> ir.Node | None:
    """Returns the Concat extending `value` when its result feeds a MatMul, else None."""
    # Through Concat too: an export may first join the cache with an empty one.
    for concat in _reached(value, stop={"Concat"}, through=_LAYOUT | {"Concat"}):
        if _reached(concat.outputs[0], stop={"MatMul"}, through=_LAYOUT | _SCALE):
            return concat
    return None


def _reached(value: ir.Value, *, stop: set[str], through: set[str],
             limit: int = 64) -> list[ir.Node]:
    """Returns the `stop` nodes reached from `value` through `through` ops only (in BFS order)."""
    found: list[ir.Node] = []
    queue: deque[ir.Value] = deque([value])
    seen: set[int] = set()
    while queue and len(seen) < limit:
        item = queue.popleft()
        for node in item.consumers():
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in stop:
                found.append(node)
            if node.op_type in through:
                queue.extend(node.outputs)
    return found
