"""Canonicalization: every rewrite is exact, and old opsets' spellings read as one form."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from planer.compiler.canonicalize import canonicalize
from planer.compiler.driver.pipeline import compile_plan, read_model
from planer.fixtures.build import build_torch_model, example_inputs
from tests.conftest import run_ort


@pytest.fixture(scope="module")
def bert_opset14(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TorchScript export at opset 14: LayerNorm comes out decomposed."""
    path = tmp_path_factory.mktemp("op14") / "model.onnx"
    feeds = example_inputs("bert", batch=2, seq=8)
    args = tuple(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask",
                                                        "token_type_ids"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(build_torch_model("bert"), args, str(path), dynamo=False,
                          opset_version=14,
                          input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=["last_hidden_state"],
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in
                                        ("input_ids", "attention_mask", "token_type_ids",
                                         "last_hidden_state")})
    return path


def test_opset14_export_reads_and_neutral_plan_is_exact(bert_opset14: Path,
                                                         tmp_path: Path) -> None:
    ops = {n.op_type for n in onnx.load(str(bert_opset14)).graph.node}
    assert "LayerNormalization" not in ops and "ReduceMean" in ops
    _, spec = read_model(bert_opset14)
    assert [(la.attention.heads, la.ffn.width) for la in spec.layers] == [(4, 128)] * 2
    result = compile_plan(bert_opset14, tmp_path / "out", plan_data={"layers": [
        {"heads": 2, "ffn": 64}, {"heads": 4, "ffn": 128}]})
    neutral = compile_plan(bert_opset14, tmp_path / "n", plan_data=None)
    feeds = example_inputs("bert", batch=2, seq=24, seed=4)
    feeds["attention_mask"][0, 20:] = 0
    for a, b in zip(run_ort(bert_opset14, feeds), run_ort(neutral.model_path, feeds),
                    strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-4)
    assert np.isfinite(run_ort(result.model_path, feeds)[0]).all()


def _decomposed_layernorm_model(opset: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("axes", np.array([-1], np.int64)), ("two", np.array(2.0, np.float32)),
        ("eps", np.array(1e-5, np.float32)),
        ("gamma", rng.standard_normal(8).astype(np.float32)),
        ("beta", rng.standard_normal(8).astype(np.float32))]]
    nodes = [
        helper.make_node("ReduceMean", ["x", "axes"] if opset >= 18 else ["x"], ["m"],
                         **({} if opset >= 18 else {"axes": [-1]})),
        helper.make_node("Sub", ["x", "m"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"] if opset >= 18 else ["sq"], ["var"],
                         **({} if opset >= 18 else {"axes": [-1]})),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Div", ["d", "sd"], ["n"]),
        helper.make_node("Mul", ["n", "gamma"], ["g"]),
        helper.make_node("Add", ["g", "beta"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("opset", [17, 18])
def test_decomposed_layernorm_is_fused_exactly(opset: int, tmp_path: Path) -> None:
    proto = _decomposed_layernorm_model(opset)
    model = canonicalize(ir.serde.deserialize_model(proto))
    assert [n.op_type for n in model.graph] == ["LayerNormalization"]
    path = tmp_path / "fused.onnx"
    ir.save(model, path)
    x = {"x": np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)}
    original = tmp_path / "original.onnx"
    onnx.save(proto, original)
    np.testing.assert_allclose(run_ort(path, x)[0], run_ort(original, x)[0], rtol=0, atol=1e-5)


def test_gemm_becomes_matmul_add_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, alpha=0.5, beta=2.0)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.ones(6, np.float32), "b")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = canonicalize(ir.serde.deserialize_model(proto))
    assert [n.op_type for n in model.graph] == ["MatMul", "Add"]
    ir.save(model, tmp_path / "c.onnx")
    onnx.save(proto, tmp_path / "o.onnx")
    x = {"x": rng.standard_normal((3, 4)).astype(np.float32)}
    expected = run_ort(tmp_path / "o.onnx", x)[0]
    np.testing.assert_allclose(run_ort(tmp_path / "c.onnx", x)[0], expected, rtol=0, atol=1e-6)
