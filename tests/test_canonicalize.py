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
from planer.compiler.names import PROVENANCE_BLOCK, PROVENANCE_PASS, PassName
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


def _decomposed_layernorm_model(opset: int, *, swapped: bool = False,
                                 axes: int = -1) -> onnx.ModelProto:
    """LayerNorm spelled out; `swapped` writes every commutative op's operands the other
    way round and squares with Mul(d, d) instead of Pow(d, 2)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("axes", np.array([axes], np.int64)), ("two", np.array(2.0, np.float32)),
        ("eps", np.array(1e-5, np.float32)),
        ("gamma", rng.standard_normal(8).astype(np.float32)),
        ("beta", rng.standard_normal(8).astype(np.float32))]]

    def mean(src: str, dst: str) -> onnx.NodeProto:
        # ReduceMean's axes: an attribute up to opset 17, an input from 18.
        if opset >= 18:
            return helper.make_node("ReduceMean", [src, "axes"], [dst])
        return helper.make_node("ReduceMean", [src], [dst], axes=[axes])

    def pair(op: str, a: str, b: str, out: str) -> onnx.NodeProto:
        return helper.make_node(op, [b, a] if swapped else [a, b], [out])

    nodes = [
        mean("x", "m"),
        helper.make_node("Sub", ["x", "m"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["sq"]) if swapped
        else helper.make_node("Pow", ["d", "two"], ["sq"]),
        mean("sq", "var"),
        pair("Add", "var", "eps", "ve"),
        helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Div", ["d", "sd"], ["n"]),
        pair("Mul", "n", "gamma", "g"),
        pair("Add", "g", "beta", "y0"),
        helper.make_node("Relu", ["y0"], ["y"], name="reader"),
    ]
    graph = helper.make_graph(
        nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _same_outputs(original: onnx.ModelProto, rewritten: ir.Model, tmp_path: Path,
                  atol: float) -> None:
    onnx.save(original, tmp_path / "original.onnx")
    ir.save(rewritten, tmp_path / "rewritten.onnx")
    x = {"x": np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(tmp_path / "rewritten.onnx", x)[0],
                               run_ort(tmp_path / "original.onnx", x)[0], rtol=0, atol=atol)


@pytest.mark.parametrize("swapped", [False, True])
@pytest.mark.parametrize("opset", [17, 18])
def test_decomposed_layernorm_is_fused_exactly(opset: int, swapped: bool,
                                               tmp_path: Path) -> None:
    # Opset 17 writes ReduceMean's axes as an attribute (onnxscript's own rule reads only
    # the input form); 18 as an input.
    proto = _decomposed_layernorm_model(opset, swapped=swapped)
    model = canonicalize(ir.serde.deserialize_model(proto))
    norm, reader = list(model.graph)
    assert (norm.op_type, norm.name, reader.op_type) == ("LayerNormalization",
                                                          "y0/LayerNorm", "Relu")
    assert dict(norm.metadata_props) == {PROVENANCE_PASS: PassName.CANONICALIZE}
    assert norm.outputs[0].name == "y0/LayerNorm_out"
    assert norm.attributes["epsilon"].as_float() == pytest.approx(1e-5)
    _same_outputs(proto, model, tmp_path, atol=1e-5)


@pytest.mark.parametrize("opset", [14, 16])
def test_layernorm_stays_decomposed_before_opset_17(opset: int, tmp_path: Path) -> None:
    # LayerNormalization does not exist before opset 17; the chain is left as it is.
    proto = _decomposed_layernorm_model(opset)
    model = canonicalize(ir.serde.deserialize_model(proto))
    assert [n.op_type for n in model.graph] == [n.op_type for n in proto.graph.node]
    _same_outputs(proto, model, tmp_path, atol=0)


def test_layernorm_over_another_axis_is_not_fused() -> None:
    proto = _decomposed_layernorm_model(17, axes=1)
    model = canonicalize(ir.serde.deserialize_model(proto))
    assert "LayerNormalization" not in {n.op_type for n in model.graph}


def _ort_kernel_model() -> onnx.ModelProto:
    """Sum, BiasGelu and Gelu as passes.ort_kernels writes them (with provenance)."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Sum", ["x", "r"], ["s"], name="layer0/res/Sum"),
        helper.make_node("BiasGelu", ["s", "b"], ["g"], name="layer0/ffn/BiasGelu",
                         domain="com.microsoft"),
        helper.make_node("Gelu", ["g"], ["y"], name="layer0/ffn/Gelu", domain="com.microsoft"),
    ]
    for node in nodes:
        block = node.name.rsplit("/", 1)[0]
        helper.set_metadata_props(node, {PROVENANCE_PASS: PassName.ORT_KERNELS,
                                         PROVENANCE_BLOCK: block})
    graph = helper.make_graph(
        nodes, "k", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, 8])
                     for n in ("x", "r")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 8])],
        [numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


def test_ort_kernels_are_spelled_back_in_standard_onnx(tmp_path: Path) -> None:
    proto = _ort_kernel_model()
    model = canonicalize(ir.serde.deserialize_model(proto))
    assert [n.op_type for n in model.graph] == [
        "Add",  # the Sum
        "Add", "Div", "Erf", "Add", "Mul", "Mul",  # BiasGelu: bias, then erf-GELU
        "Div", "Erf", "Add", "Mul", "Mul"]  # Gelu
    assert all(n.domain == "" for n in model.graph)
    # Each node keeps the provenance of the kernel it expands, named after it.
    for node in model.graph:
        kernel = next(k for k in proto.graph.node if node.name.startswith(f"{k.name}/"))
        assert dict(node.metadata_props) == {PROVENANCE_PASS: PassName.ORT_KERNELS,
                                             PROVENANCE_BLOCK: kernel.name.rsplit("/", 1)[0]}
    onnx.save(proto, tmp_path / "original.onnx")
    ir.save(model, tmp_path / "rewritten.onnx")
    rng = np.random.default_rng(4)
    feeds = {n: rng.standard_normal((2, 3, 8)).astype(np.float32) for n in ("x", "r")}
    np.testing.assert_allclose(run_ort(tmp_path / "rewritten.onnx", feeds)[0],
                               run_ort(tmp_path / "original.onnx", feeds)[0],
                               rtol=0, atol=1e-6)


def test_moe_experts_keep_their_kernels() -> None:
    proto = _ort_kernel_model()
    for node in proto.graph.node:
        helper.set_metadata_props(node, {PROVENANCE_PASS: PassName.FFN_TO_MOE})
    model = canonicalize(ir.serde.deserialize_model(proto))
    assert [n.op_type for n in model.graph] == ["Sum", "BiasGelu", "Gelu"]


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
    assert [(n.op_type, n.name) for n in model.graph] == [("MatMul", "gemm0/MatMul"),
                                                          ("Add", "gemm0/Add")]
    assert all(dict(n.metadata_props) == {PROVENANCE_PASS: PassName.CANONICALIZE}
               for n in model.graph)
    ir.save(model, tmp_path / "c.onnx")
    onnx.save(proto, tmp_path / "o.onnx")
    x = {"x": rng.standard_normal((3, 4)).astype(np.float32)}
    expected = run_ort(tmp_path / "o.onnx", x)[0]
    np.testing.assert_allclose(run_ort(tmp_path / "c.onnx", x)[0], expected, rtol=0, atol=1e-6)
