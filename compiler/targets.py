"""Target runtimes a compiled model is lowered for, and what each one accepts.

    --target-runtime ort       dynamic shapes allowed (NonZero, data-dependent sizes)
    --target-runtime tensorrt  shape-computable graphs only, TensorRT 10 operators

`TENSORRT_OPS` is a conservative default-domain operator list for TensorRT 10 (see its
docstring), kept here so a test can check every
tensorrt lowering without TensorRT installed. `check_ops` adds the restrictions that
matter to planer's lowerings: no NonZero (data-dependent output shape: needs an output
allocator and breaks CUDA-graph capture), no ScatterND reduction (TensorRT's scatter
layer has none), TopK with a constant K and sorted output, constant axes for
Squeeze/Unsqueeze/Slice/Reduce*, and no custom domains (com.microsoft kernels are ORT's).
Nothing here was verified against a real TensorRT build (none is available here).
"""

from __future__ import annotations

import onnx_ir as ir

from planer.compiler.irutil import const_array

TARGETS = ("ort", "tensorrt")

TENSORRT_OPS = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh",
    "AveragePool", "BatchNormalization", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat",
    "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum",
    "DepthToSpace", "DequantizeLinear", "Div", "Dropout", "Einsum", "Elu", "Equal", "Erf",
    "Exp", "Expand", "EyeLike", "Flatten", "Floor", "Gather", "GatherElements", "GatherND",
    "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual",
    "GridSample", "GRU", "HardSigmoid", "Identity", "If", "ImageScaler",
    "InstanceNormalization", "IsNaN", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual",
    "Log", "LogSoftmax", "Loop", "LpNormalization", "LpPool", "LRN", "LSTM", "MatMul", "Max",
    "MaxPool", "Mean", "Min", "Mul", "Neg", "NonMaxSuppression", "NonZero", "Not", "Or", "Pad",
    "ParametricSoftplus", "Pow", "PRelu", "QuantizeLinear", "RandomUniform",
    "RandomUniformLike", "Range", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
    "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare",
    "Relu", "Reshape", "Resize", "ReverseSequence", "RNN", "Round", "ScaledTanh", "Scan",
    "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape", "Sigmoid", "Sign", "Sin",
    "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt",
    "Squeeze", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose",
    "Trilu", "Unsqueeze", "Upsample", "Where", "Xor",
})
"""A conservative subset of what TensorRT 10's ONNX parser imports: the operators the
onnx-tensorrt support matrix (docs/operators.md) marks supported since TensorRT 8.4, plus
the opset-17+ LayerNormalization, Trilu, CastLike and GridSample. Operators added in later
10.x releases are left out on purpose: a false "unsupported" only narrows a lowering."""

# Supported by the parser, but not shape-computable: planer's tensorrt lowerings avoid them.
TENSORRT_DATA_DEPENDENT = frozenset({"NonZero", "Unique", "Compress"})

_CONSTANT_INPUTS = {  # op -> input positions TensorRT needs as initializers/constants
    "TopK": (1,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "Slice": (3,),
    "ReduceSum": (1,),
    "ReduceMax": (1,),
    "ReduceMean": (1,),
}


def check_ops(model: ir.Model, target: str) -> list[str]:
    """Lists why `model` would not run on `target` (empty when it fits).

    Every node of the main graph and its subgraphs is checked; each problem is one
    sentence naming the node.

    Raises:
        ValueError: `target` is not a known runtime.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target runtime {target!r}; use one of {', '.join(TARGETS)}")
    if target == "ort":
        return []
    problems = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        problems.extend(_tensorrt_problems(node))
    return problems


def _tensorrt_problems(node: ir.Node) -> list[str]:
    where = f"{node.op_type} node {node.name!r}"
    if node.domain not in ("", "ai.onnx"):
        return [f"{where} is in domain {node.domain!r}, which TensorRT does not import."]
    if node.op_type not in TENSORRT_OPS:
        return [f"{where} is not among TensorRT 10's ONNX operators."]
    if node.op_type in TENSORRT_DATA_DEPENDENT:
        return [f"{where} has a data-dependent output shape (not shape-computable)."]
    problems = []
    reduction = node.attributes.get("reduction")
    if node.op_type == "ScatterND" and reduction is not None and reduction.value != "none":
        problems.append(f"{where} uses reduction={reduction.value!r}; TensorRT has none.")
    if node.op_type == "TopK":
        sorted_attr = node.attributes.get("sorted")
        if sorted_attr is not None and sorted_attr.value == 0:
            problems.append(f"{where} asks for unsorted output; TensorRT needs sorted=1.")
        k = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if k is not None and int(k.reshape(-1)[0]) >= 3840:
            problems.append(f"{where} has K={int(k.reshape(-1)[0])}; TensorRT needs K < 3840.")
    for position in _CONSTANT_INPUTS.get(node.op_type, ()):
        if position < len(node.inputs) and node.inputs[position] is not None \
                and const_array(node.inputs[position]) is None:
            problems.append(f"{where} input {position} must be a constant for TensorRT.")
    return problems
