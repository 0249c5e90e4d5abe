"""Quantized inputs: weight-only int8 is read as the float weights it holds; quantized
activations are refused with a sentence naming the node."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from planer.compiler.driver.cli import main
from planer.compiler.driver.pipeline import compile_plan
from planer.compiler.errors import UnsupportedModelError
from planer.compiler.loading import load_model
from planer.compiler.support import prepare
from planer.fixtures.build import example_inputs
from planer.fixtures.fused import fused_bert_path
from planer.fixtures.quantized import quantized_path
from tests.conftest import run_ort


def _prepared(src: Path, folder: Path) -> tuple[Path, dict[str, int]]:
    model = load_model(src)
    counts = prepare(model)
    folder.mkdir(parents=True, exist_ok=True)
    ir.save(model, str(folder / "model.onnx"))
    return folder / "model.onnx", counts


def _refusal(src: Path | onnx.ModelProto) -> str:
    model = ir.serde.deserialize_model(src) if isinstance(src, onnx.ModelProto) \
        else load_model(src)
    with pytest.raises(UnsupportedModelError) as info:
        prepare(model)
    return str(info.value)


def _first(path: Path, op_type: str, *, activation: bool = False) -> str:
    proto = onnx.load(str(path))
    constants = {t.name for t in proto.graph.initializer}
    constants |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    return next(n.name for n in proto.graph.node if n.op_type == op_type
                and not (activation and n.input[0] in constants))


@pytest.mark.parametrize("kind", ["cast-mul", "dq"])
def test_weight_only_int8_reads_as_its_float_weights(kind: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    src = quantized_path(kind)
    ops = {n.op_type for n in onnx.load(str(src)).graph.node}
    assert ("Cast" if kind == "cast-mul" else "DequantizeLinear") in ops
    path, counts = _prepared(src, tmp_path / "read")
    assert counts["dequantized_weights"] == 12  # Q, K, V, O, W1, W2 of two layers
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(la["heads"], la["ffn"]) for la in data["layers"]] == [(4, 128)] * 2
    neutral = compile_plan(path, tmp_path / "neutral", ort_kernels="on")
    feeds = example_inputs("bert", batch=2, seq=32, seed=3)
    feeds["attention_mask"][-1, 20:] = 0
    for want, got in zip(run_ort(src, feeds), run_ort(neutral.model_path, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    half = compile_plan(path, tmp_path / "half", target_flops=0.5)
    assert half.report["flops_ratio"] <= 0.5


def test_dynamic_quantization_is_refused_naming_matmulinteger() -> None:
    src = quantized_path("dynamic")
    message = _refusal(src)
    assert f"ai.onnx.MatMulInteger node '{_first(src, 'MatMulInteger')}'" in message
    assert "dynamic quantization" in message
    assert "compile the float model, then quantize" in message


def test_static_qdq_is_refused_naming_the_activation_quantizer() -> None:
    src = quantized_path("qdq")
    message = _refusal(src)
    name = _first(src, "QuantizeLinear", activation=True)
    assert f"ai.onnx.QuantizeLinear node '{name}'" in message
    assert "activations are quantized" in message


def test_quantized_attention_kernel_is_refused_by_name(tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = tmp_path / "qattention.onnx"
    quantize_dynamic(str(fused_bert_path("attention")), str(target),
                     weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": TensorProto.FLOAT})
    proto = onnx.load(str(target))
    assert "QAttention" in {n.op_type for n in proto.graph.node}
    keep = [n for n in proto.graph.node if n.op_type not in ("MatMulInteger",)]
    del proto.graph.node[:]
    proto.graph.node.extend(keep)  # with MatMulInteger gone, QAttention is named first
    message = _refusal(proto)
    assert f"com.microsoft.QAttention node '{_first(target, 'QAttention')}'" in message


def test_four_bit_weights_are_refused_by_name() -> None:
    k, n, block = 16, 8, 16
    inits = [numpy_helper.from_array(np.zeros((n, 1, block // 2), np.uint8), "w4"),
             numpy_helper.from_array(np.ones(n, np.float32), "scales")]
    node = helper.make_node("MatMulNBits", ["x", "w4", "scales"], ["y"], name="fc_4bit",
                            domain="com.microsoft", K=k, N=n, bits=4, block_size=block)
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    message = _refusal(proto)
    assert "com.microsoft.MatMulNBits node 'fc_4bit'" in message and "4-bit" in message
