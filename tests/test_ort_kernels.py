"""ORT kernel steering (passes.ort_kernels): same outputs, ORT's slow fusion really blocked."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_ir.passes.common import RemoveUnusedNodesPass

from planer.compiler.driver.pipeline import compile_plan, read_canonical, read_model
from planer.compiler.names import PROVENANCE_BLOCK, PROVENANCE_PASS, PassName
from planer.cost_model.kernels import skip_layernorm_costs
from planer.fixtures.build import example_inputs, fixture_path, minilm_path
from planer.passes.ort_kernels import GELU_GROUPINGS, OrtKernelsConfig, apply_ort_kernels
from tests.conftest import run_ort


def _ops_after_ort(path: Path, tmp_path: Path) -> collections.Counter[str]:
    """Op types in the graph ORT actually runs (ORT_ENABLE_ALL, its fusions applied)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph
    return collections.Counter(n.op_type for n in graph.node)


def _minilm_feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    mask = np.ones((2, 24), np.int64)
    mask[1, 10:] = 0
    return {"input_ids": rng.integers(1000, 30000, (2, 24)).astype(np.int64),
            "attention_mask": mask, "token_type_ids": np.zeros((2, 24), np.int64)}


@pytest.mark.slow
def test_minilm_gelus_fuse_and_skip_layernorm_fusion_is_blocked(tmp_path: Path) -> None:
    src = minilm_path("dynamo")
    before = _ops_after_ort(src, tmp_path)
    # The premise: ORT fuses the residual LayerNorms of the export but misses its GELU.
    assert before["SkipLayerNormalization"] == 12 and before["Erf"] == 6
    model, _ = read_canonical(src)
    assert apply_ort_kernels(model, OrtKernelsConfig()) == {"residual_sum": 12, "gelu": 6}
    RemoveUnusedNodesPass()(model)
    path = tmp_path / "model.onnx"
    ir.save(model, path)
    after = _ops_after_ort(path, tmp_path)
    assert after["SkipLayerNormalization"] == 0 and after["LayerNormalization"] == 13
    assert after["BiasGelu"] == 6 and after["Erf"] == 0
    feeds = _minilm_feeds()
    for expected, actual in zip(run_ort(src, feeds), run_ort(path, feeds, optimize=True),
                                strict=True):
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("setting", ["on", "off"])
def test_compiled_model_reads_back_with_the_same_layers(setting: str, tmp_path: Path) -> None:
    src = fixture_path("bert", "dynamo")
    result = compile_plan(src, tmp_path / "out", ort_kernels=setting)
    model = onnx.load(str(result.model_path), load_external_data=False)
    steered = [n for n in model.graph.node
               if any(p.key == PROVENANCE_PASS and p.value == PassName.ORT_KERNELS
                      for p in n.metadata_props)]
    assert bool(steered) == (setting == "on")
    _, spec = read_model(src)
    _, again = read_model(result.model_path)
    assert [(la.attention.heads, la.ffn.width, la.ffn.activation) for la in again.layers] == \
        [(la.attention.heads, la.ffn.width, la.ffn.activation) for la in spec.layers]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_fully_padded_sequence_matches_the_original(exporter: str, tmp_path: Path) -> None:
    # A row with no real token is where the exporter's NaN guard acts; planer moves that
    # guard after the context MatMul and must give the same answer.
    src = fixture_path("bert", exporter)
    result = compile_plan(src, tmp_path / "out", ort_kernels="on")
    feeds = example_inputs("bert", batch=3, seq=16, seed=5)
    feeds["attention_mask"][1, 7:] = 0
    feeds["attention_mask"][2, :] = 0
    for expected, actual in zip(run_ort(src, feeds), run_ort(result.model_path, feeds),
                                strict=True):
        assert np.isfinite(expected).all()
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4)


def test_kernel_choice_reports_both_timings() -> None:
    choice = skip_layernorm_costs(64, 16, 1, repeats=5)
    assert choice.fused_us > 0 and choice.unfused_us > 0
    assert choice.unfuse == (choice.unfused_us < choice.fused_us)
    assert set(choice.to_dict()) == {"fused_us", "unfused_us", "unfuse"}


def _model(nodes: list[onnx.NodeProto], inputs: list[str],
           inits: dict[str, np.ndarray]) -> onnx.ModelProto:
    graph = helper.make_graph(
        [*nodes, helper.make_node("Relu", ["y"], ["out"], name="reader")], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, 8]) for n in inputs],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3, 8])],
        [numpy_helper.from_array(a, n) for n, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _erf_gelu_model(grouping: str, *, swapped: bool, bias: bool,
                    bias_read_elsewhere: bool = False) -> onnx.ModelProto:
    """erf-GELU in `grouping`; `swapped` writes every commutative op's operands the other
    way round and scales by Mul(1/√2) instead of Div(√2)."""
    def pair(op: str, a: str, b: str, out: str, **kw: str) -> onnx.NodeProto:
        return helper.make_node(op, [b, a] if swapped else [a, b], [out], **kw)

    nodes = [pair("Add", "h", "b", "x")] if bias else []
    x = "x" if bias else "h"
    nodes += [pair("Mul", x, "inv_sqrt2", "s") if swapped else
              helper.make_node("Div", [x, "sqrt2"], ["s"]),
              helper.make_node("Erf", ["s"], ["e"]), pair("Add", "e", "one", "p")]
    last = {"name": "layer0/ffn/act"}
    nodes += {
        "half_last": [pair("Mul", "p", "half", "q"), pair("Mul", x, "q", "y", **last)],
        "x_first": [pair("Mul", "p", x, "q"), pair("Mul", "q", "half", "y", **last)],
        "half_x": [pair("Mul", x, "half", "q"), pair("Mul", "q", "p", "y", **last)],
    }[grouping]
    # The GELU's last node as planer's FFN emission writes it: its block is the FFN's.
    entry = nodes[-1].metadata_props.add()
    entry.key, entry.value = PROVENANCE_BLOCK, "layer0/ffn"
    if bias_read_elsewhere:
        nodes.append(helper.make_node("Identity", ["x"], ["x_copy"]))
    rng = np.random.default_rng(7)
    # Exporters write these constants 0-d or as [1] tensors; both must match.
    inits = {"b": rng.standard_normal(8).astype(np.float32),
             "sqrt2": np.array(np.sqrt(2.0), np.float32),
             "inv_sqrt2": np.array([1 / np.sqrt(2.0)], np.float32),
             "one": np.array([1.0], np.float32), "half": np.array(0.5, np.float32)}
    model = _model(nodes, ["h"], inits)
    if bias_read_elsewhere:
        model.graph.output.append(helper.make_tensor_value_info("x_copy", TensorProto.FLOAT,
                                                                [2, 3, 8]))
    return model


def _rewrite_and_compare(proto: onnx.ModelProto, config: OrtKernelsConfig,
                         tmp_path: Path) -> tuple[ir.Model, dict[str, int]]:
    model = ir.serde.deserialize_model(proto)
    counts = apply_ort_kernels(model, config)
    onnx.save(proto, tmp_path / "original.onnx")
    ir.save(model, tmp_path / "rewritten.onnx")
    rng = np.random.default_rng(8)
    feeds = {i.name: rng.standard_normal((2, 3, 8)).astype(np.float32)
             for i in proto.graph.input}
    for expected, actual in zip(run_ort(tmp_path / "original.onnx", feeds),
                                run_ort(tmp_path / "rewritten.onnx", feeds), strict=True):
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5)
    return model, counts


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("swapped", [False, True])
@pytest.mark.parametrize("grouping", GELU_GROUPINGS)
def test_every_erf_gelu_spelling_becomes_one_kernel(grouping: str, swapped: bool, bias: bool,
                                                    tmp_path: Path) -> None:
    proto = _erf_gelu_model(grouping, swapped=swapped, bias=bias)
    model, counts = _rewrite_and_compare(proto, OrtKernelsConfig(), tmp_path)
    assert counts == {"gelu": 1, "residual_sum": 0}
    kernel = "BiasGelu" if bias else "Gelu"
    node, reader = list(model.graph)
    assert (node.domain, node.op_type, node.name) == ("com.microsoft", kernel,
                                                      f"layer0/ffn/act/{kernel}")
    assert dict(node.metadata_props) == {PROVENANCE_PASS: PassName.ORT_KERNELS,
                                         PROVENANCE_BLOCK: "layer0/ffn"}
    assert reader.inputs[0] is node.outputs[0]
    assert node.outputs[0].name == f"layer0/ffn/act/{kernel}_out"


def test_a_bias_read_elsewhere_stays_an_add(tmp_path: Path) -> None:
    proto = _erf_gelu_model("half_last", swapped=False, bias=True, bias_read_elsewhere=True)
    model, _ = _rewrite_and_compare(proto, OrtKernelsConfig(), tmp_path)
    assert [n.op_type for n in model.graph] == ["Add", "Gelu", "Identity", "Relu"]


def test_residual_adds_before_layernorm_become_sums(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    inits = {"bias": rng.standard_normal(8).astype(np.float32),
             "gamma": np.ones(8, np.float32), "beta": np.zeros(8, np.float32)}
    nodes = [
        helper.make_node("Add", ["a", "c"], ["r"], name="layer0/residual"),
        helper.make_node("LayerNormalization", ["r", "gamma", "beta"], ["n"]),
        helper.make_node("Add", ["n", "bias"], ["nb"], name="layer0/bias"),  # a bias: kept
        helper.make_node("LayerNormalization", ["nb", "gamma", "beta"], ["y"]),
    ]
    proto = _model(nodes, ["a", "c"], inits)
    model, counts = _rewrite_and_compare(proto, OrtKernelsConfig(fuse_gelu=False), tmp_path)
    assert counts == {"residual_sum": 1, "gelu": 0}
    total = next(iter(model.graph))
    # An exporter's Add carries no block: the Sum gets the rule's group, named under it.
    assert (total.op_type, total.name) == ("Sum", "residual/layer0/residual/Sum")
    assert dict(total.metadata_props) == {PROVENANCE_PASS: PassName.ORT_KERNELS,
                                          PROVENANCE_BLOCK: "residual"}
    assert [n.op_type for n in model.graph] == ["Sum", "LayerNormalization", "Add",
                                                "LayerNormalization", "Relu"]
