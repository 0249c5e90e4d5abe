"""ORT kernel steering (passes.ort_kernels): same outputs, ORT's slow fusion really blocked."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx_ir.passes.common import RemoveUnusedNodesPass

from planer.compiler.driver.pipeline import compile_plan, read_canonical, read_model
from planer.compiler.irutil import PROVENANCE_PASS
from planer.cost_model.kernels import skip_layernorm_costs
from planer.fixtures.build import example_inputs, fixture_path, minilm_path
from planer.passes.ort_kernels import OrtKernelsConfig, apply_ort_kernels
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
               if any(p.key == PROVENANCE_PASS and p.value == "ort_kernels"
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
