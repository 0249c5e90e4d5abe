"""Reads weight-only quantized graphs as float graphs, and refuses quantized activations.

A quantized model holds its weights as integers and turns them back into floats in
the graph. Where only the weights are quantized, folding that step into float
initializers gives the same float weights the model computes on every run, so planer
reads, prunes and refits the float graph (and the user quantizes the result again):

    DequantizeLinear(w_int8, scale, zero_point)  ─▶ w_float = (w − zp)·scale  (per tensor,
                                                     per axis or per block, as the op does)
    Cast(w_int8) ─ Mul(scale) [─ Sub/Add/Div/Transpose/Reshape of constants] ─▶ w_float

Where the activations are quantized too, the model's outputs depend on that rounding,
so a float rewrite would not reproduce them; those graphs are refused with a sentence
naming the node, before anything else runs:

    DynamicQuantizeLinear, MatMulInteger, QAttention, …  (onnxruntime quantize_dynamic)
    QuantizeLinear on an activation                       (quantize_static, QDQ format)
    MatMulNBits, GatherBlockQuantized                     (4-bit weight-only kernels)

The fold is exact: numpy evaluates the same float32 expression the op evaluates
(integer difference first, then one rounding multiply), so a neutral compile of the
folded graph matches the quantized input to float tolerance (tests pin this down).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from planer.compiler.contrib_emit import node_base, node_label
from planer.compiler.errors import UnsupportedModelError
from planer.compiler.irutil import add_initializer, const_array, replace_uses

logger = logging.getLogger(__name__)

THEN_QUANTIZE = ("compile the float model, then quantize the compiled one "
                 "(onnxruntime.quantization works on planer's output)")

# Integer kernels (the activations are quantized as the model runs), and what each does.
INTEGER_KERNELS = {
    "MatMulInteger": "multiplies them with activations quantized as the model runs "
                     "(dynamic quantization)",
    "DynamicQuantizeMatMul": "multiplies them with activations quantized as the model runs "
                             "(dynamic quantization)",
    "MatMulIntegerToFloat": "multiplies them with int8 activations",
    "QLinearMatMul": "multiplies them with int8 activations",
    "QGemm": "multiplies them with int8 activations",
    "ConvInteger": "multiplies them with int8 activations",
    "QOrderedMatMul": "multiplies them with int8 activations",
    "QAttention": "computes attention on int8 activations",
    "QEmbedLayerNormalization": "reads int8 embedding tables",
    "MatMulNBits": "holds them as 4-bit blocks",
    "MatMulBnb4": "holds them as 4-bit blocks",
    "GatherBlockQuantized": "holds embedding rows as quantized blocks",
    # Last: a weight kernel above names the construct better when both are present.
    "DynamicQuantizeLinear": "quantizes activations as the model runs (dynamic quantization)",
}
STORAGE_TYPES = {
    ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16,
    ir.DataType.INT4, ir.DataType.UINT4,
}
FOLDABLE = {"Mul", "Sub", "Add", "Div", "Transpose", "Reshape", "Unsqueeze", "Squeeze"}


def check_quantized(model: ir.Model) -> None:
    """Refuses a model whose activations are quantized, naming the first such node.

    Weight-only quantization (DequantizeLinear or Cast of stored integers) is not
    refused: `dequantize_weights` folds it.

    Raises:
        UnsupportedModelError: the graph runs integer kernels or quantizes activations.
    """
    kernels = {node.op_type: node for node in reversed(list(model.graph))
               if node.op_type in INTEGER_KERNELS}
    for op_type, what in INTEGER_KERNELS.items():
        if op_type in kernels:
            raise UnsupportedModelError(
                f"weights are quantized through {node_label(kernels[op_type])}, which "
                f"{what}; {THEN_QUANTIZE}."
            )
    for node in model.graph:
        if node.op_type == "QuantizeLinear" and const_array(node.inputs[0]) is None:
            raise UnsupportedModelError(
                f"activations are quantized through {node_label(node)} (static QDQ "
                f"quantization), so a float rewrite would not reproduce the model's "
                f"outputs; {THEN_QUANTIZE}."
            )


def dequantize_weights(model: ir.Model) -> int:
    """Folds weight-only quantization into float initializers; returns how many weights.

    Raises:
        UnsupportedModelError: a DequantizeLinear of stored weights uses a layout
            planer cannot evaluate (the sentence names the node).
    """
    graph = model.graph
    count = 0
    for node in list(graph):
        if node.op_type == "DequantizeLinear" and const_array(node.inputs[0]) is not None:
            _fold(graph, node, _dequantize(node))
            count += 1
        elif node.op_type == "Cast" and _stores_integers(node.inputs[0]) \
                and ir.DataType(node.attributes["to"].value).is_floating_point():
            array = const_array(node.inputs[0])
            to = ir.DataType(node.attributes["to"].value).numpy()
            folded = _fold(graph, node, array.astype(np.int32).astype(to))  # type: ignore[union-attr]
            _fold_forward(graph, folded)
            count += 1
    if count:
        logger.info("folded %d quantized weights into float initializers", count)
    return count


def _stores_integers(value: ir.Value | None) -> bool:
    """Tells whether `value` is a constant of a quantized storage type (int8, uint4, ...)."""
    array = const_array(value)
    if array is None:
        return False
    try:
        return ir.DataType.from_numpy(array.dtype) in STORAGE_TYPES
    except TypeError:
        return False


def _dequantize(node: ir.Node) -> np.ndarray:
    """Evaluates DequantizeLinear on its constant inputs as the op does, in float32."""
    x = const_array(node.inputs[0])
    scale = const_array(node.inputs[1])
    zero = const_array(node.inputs[2]) if len(node.inputs) > 2 else None
    if x is None or scale is None or (len(node.inputs) > 2 and node.inputs[2] is not None
                                      and zero is None):
        raise UnsupportedModelError(
            f"{node_label(node)} dequantizes stored weights with a computed scale or zero "
            f"point; {THEN_QUANTIZE}."
        )
    axis = int(node.attributes["axis"].value) if "axis" in node.attributes else 1
    block = int(node.attributes["block_size"].value) if "block_size" in node.attributes else 0
    values = x.astype(np.float32) if x.dtype.kind == "f" else x.astype(np.int32)
    if zero is not None:
        values = values - _broadcast(zero, x, axis, block, node).astype(values.dtype)
    out = values.astype(np.float32) * _broadcast(scale, x, axis, block, node).astype(np.float32)
    return out.astype(scale.dtype)


def _broadcast(param: np.ndarray, x: np.ndarray, axis: int, block: int,
               node: ir.Node) -> np.ndarray:
    """Shapes a per-tensor, per-axis or per-block parameter to broadcast against x."""
    if param.size == 1:
        return param.reshape(())
    axis = axis % x.ndim
    if block:
        param = np.repeat(param, block, axis=axis)
        param = np.take(param, np.arange(x.shape[axis]), axis=axis)
        return param
    if param.ndim != 1 or param.size != x.shape[axis]:
        raise UnsupportedModelError(
            f"{node_label(node)} has a scale of shape {list(param.shape)} for weights of "
            f"shape {list(x.shape)}; {THEN_QUANTIZE}."
        )
    shape = [1] * x.ndim
    shape[axis] = param.size
    return param.reshape(shape)


def _fold(graph: ir.Graph, node: ir.Node, array: np.ndarray) -> ir.Value:
    """Replaces `node`'s output with the constant `array` and removes the node."""
    value = add_initializer(graph, f"{node_base(node)}/dequantized", array)
    replace_uses(node.outputs[0], value)
    graph.remove(node, safe=True)
    return value


def _fold_forward(graph: ir.Graph, value: ir.Value) -> None:
    """Folds the scale arithmetic after a Cast of stored integers (Mul by scale, …)."""
    stack = [value]
    while stack:
        current = stack.pop()
        for node in list(current.consumers()):
            if node.op_type not in FOLDABLE or node.graph is not graph:
                continue
            arrays = [const_array(v) for v in node.inputs]
            if any(a is None for a in arrays if a is not None) or \
                    any(v is not None and a is None for v, a in zip(node.inputs, arrays,
                                                                   strict=True)):
                continue
            result = _evaluate(node, [a for a in arrays if a is not None])
            if result is not None:
                stack.append(_fold(graph, node, result))


def _evaluate(node: ir.Node, arrays: list[np.ndarray]) -> np.ndarray | None:
    op = node.op_type
    if op in ("Mul", "Sub", "Add", "Div"):
        a, b = arrays
        result = {"Mul": np.multiply, "Sub": np.subtract, "Add": np.add,
                  "Div": np.divide}[op](a, b)
        return np.asarray(result, dtype=np.result_type(a.dtype, b.dtype))
    if op == "Transpose":
        perm = node.attributes.get("perm")
        return np.transpose(arrays[0], None if perm is None else list(perm.value))
    if op == "Reshape" and len(arrays) == 2 and not (arrays[1] == 0).any():
        return arrays[0].reshape(arrays[1].astype(np.int64))
    if op in ("Unsqueeze", "Squeeze") and len(arrays) == 2:
        axes = tuple(int(a) for a in arrays[1].reshape(-1))
        return np.expand_dims(arrays[0], axes) if op == "Unsqueeze" \
            else np.squeeze(arrays[0], axes)
    return None
