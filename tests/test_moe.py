"""FFN -> MoE: exactness of the neutral split, lowerings against an independent reference,
padding, planted-sparsity router recall, and the TensorRT operator contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass
from scipy.special import erf

from planer.compiler.calibration import build_calibration, model_input_infos
from planer.compiler.driver.pipeline import read_model
from planer.compiler.errors import PreconditionError, UnsupportedModelError
from planer.compiler.plan import MoePlan
from planer.compiler.targets import check_ops
from planer.cost_model.kernels import standalone_ffn, standalone_ffn_spec
from planer.passes.ffn_to_moe import (
    FfnToMoeConfig,
    MoeLayer,
    apply_ffn_to_moe,
    config_from_fits,
    kernel_fits,
    rewrite_ffn,
)
from planer.passes.moe_fit import (
    Router,
    choose_moe_plans,
    cluster_experts,
    contiguous_experts,
    fit_layers,
    select,
)
from tests.conftest import run_ort, text_feeds

ORT_LOWERINGS = ["gather", "scatter", "tensorrt"]


def _fixture(family: str) -> Path:
    from planer.fixtures.build import fixture_path

    return fixture_path(family, "dynamo")


def _random_router(d: int, e: int, seed: int, hidden: int = 16) -> Router:
    rng = np.random.default_rng(seed)
    return Router(rng.standard_normal((d, hidden)).astype(np.float32),
                  rng.standard_normal(hidden).astype(np.float32),
                  rng.standard_normal((hidden, e)).astype(np.float32),
                  rng.standard_normal(e).astype(np.float32))


def _config(lowering: str, layers: dict[int, MoeLayer], fuse: bool = True) -> FfnToMoeConfig:
    if lowering == "tensorrt":
        return FfnToMoeConfig(layers, target="tensorrt")
    return FfnToMoeConfig(layers, target="ort", lowering=lowering, fuse_activation=fuse)


def _save(model: ir.Model, path: Path) -> Path:
    RemoveUnusedNodesPass()(model)
    TopologicalSortPass()(model)
    ir.external_data.load_to_model(model)
    ir.save(model, path)
    return path


def _moe_fixture(tmp_path: Path, family: str, lowering: str, *, experts: int = 4,
                 top_k: int | None = None, tau: float | None = None,
                 capacity: int = 256, fuse: bool = True) -> Path:
    model, spec = read_model(_fixture(family))
    layers = {
        la.index: MoeLayer(cluster_experts(la.ffn.w1.w(), experts, seed=la.index),
                           _random_router(spec.hidden, experts, la.index),
                           top_k=top_k, tau=tau, capacity=capacity)
        for la in spec.layers
    }
    assert apply_ffn_to_moe(model, spec, _config(lowering, layers, fuse)) == len(spec.layers)
    return _save(model, tmp_path / f"{family}_{lowering}_{fuse}.onnx")


# ---------------------------------------------------------------- neutral split


@pytest.mark.parametrize("family", ["bert", "bert-relu"])
@pytest.mark.parametrize("lowering", [*ORT_LOWERINGS, "kernel"])
@pytest.mark.parametrize("fuse", [True, False])
def test_all_experts_reproduce_the_dense_model(family: str, lowering: str, fuse: bool,
                                               tmp_path: Path) -> None:
    if lowering == "kernel" and family == "bert":
        pytest.skip("com.microsoft.MoE's gelu is the tanh approximation: not exact for erf")
    path = _moe_fixture(tmp_path, family, lowering, top_k=4, fuse=fuse)
    feeds = text_feeds(batch=2, seq_len=16, vocab=1000, pad_last=5)
    (expected,) = run_ort(_fixture(family), feeds)
    (actual,) = run_ort(path, feeds)
    real = feeds["attention_mask"].astype(bool)
    # Regrouped sums: float tolerance on real tokens; padding rows carry b2 only.
    np.testing.assert_allclose(actual[real], expected[real], rtol=0, atol=1e-5)
    full = text_feeds(batch=1, seq_len=16, vocab=1000, seed=1)
    np.testing.assert_allclose(run_ort(path, full)[0], run_ort(_fixture(family), full)[0],
                               rtol=0, atol=1e-5)


def test_tau_one_keeps_every_expert(tmp_path: Path) -> None:
    path = _moe_fixture(tmp_path, "bert", "gather", tau=1.0)
    feeds = text_feeds(batch=1, seq_len=12, vocab=1000)
    np.testing.assert_allclose(run_ort(path, feeds)[0], run_ort(_fixture("bert"), feeds)[0],
                               rtol=0, atol=1e-5)


# ---------------------------------------------------------------- padding and batching


@pytest.mark.parametrize("lowering", ORT_LOWERINGS)
def test_dynamic_k_batched_with_padding_matches_batch_one(lowering: str,
                                                          tmp_path: Path) -> None:
    path = _moe_fixture(tmp_path, "bert", lowering, tau=0.3)
    lengths = [16, 9, 4]
    batch = text_feeds(batch=3, seq_len=16, vocab=1000, seed=3)
    for row, n in enumerate(lengths):
        batch["attention_mask"][row, n:] = 0
        batch["input_ids"][row, n:] = 0
    (together,) = run_ort(path, batch, threads=2)
    for row, n in enumerate(lengths):
        single = {k: v[row:row + 1, :n] for k, v in batch.items()}
        (alone,) = run_ort(path, single)
        np.testing.assert_allclose(together[row, :n], alone[0], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- lowerings vs reference


def _act(name: str, h: np.ndarray) -> np.ndarray:
    if name == "relu":
        return np.maximum(h, 0)
    if name == "gelu_tanh":
        return 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    return 0.5 * h * (1 + erf(h / np.sqrt(2)))


def _one_ffn(rng: np.random.Generator, act: str, d: int = 16, f: int = 32) -> tuple:
    w1 = rng.standard_normal((d, f)).astype(np.float32) / 4
    b1 = rng.standard_normal(f).astype(np.float32) / 4
    w2 = rng.standard_normal((f, d)).astype(np.float32) / 4
    b2 = rng.standard_normal(d).astype(np.float32)
    return standalone_ffn(w1, b1, w2, b2, act), (w1, b1, w2, b2)


def _reference(x_TD: np.ndarray, real: np.ndarray, weights: tuple, act: str,
               moe: MoeLayer) -> np.ndarray:
    """Independent numpy MoE: per-token selection, optional per-expert capacity by score."""
    w1, b1, w2, b2 = weights
    scores = moe.router(x_TD)
    chosen = select(scores, top_k=moe.top_k, tau=moe.tau) & real[:, None]
    out = np.zeros_like(x_TD, dtype=np.float64)
    for e, group in enumerate(moe.experts):
        rows = np.flatnonzero(chosen[:, e])
        if moe.capacity is not None and rows.size > moe.capacity:
            # Highest scores win; equal scores go to the lower token index (TopK's rule).
            rows = np.sort(rows[np.argsort(-scores[rows, e], kind="stable")[:moe.capacity]])
        h = x_TD[rows] @ w1[:, group] + b1[group]
        out[rows] += _act(act, h) @ w2[group]
    return out + b2


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("lowering", [*ORT_LOWERINGS, "kernel"])
@pytest.mark.parametrize("rule", [{"top_k": 2}, {"tau": 0.4}])
def test_lowering_matches_reference(act: str, lowering: str, rule: dict,
                                    tmp_path: Path) -> None:
    if lowering == "kernel" and not kernel_fits(act, rule.get("top_k")):
        pytest.skip("the kernel lowering takes static top-k with relu/tanh-GELU only")
    rng = np.random.default_rng(7)
    proto, weights = _one_ffn(rng, act)
    model = ir.from_proto(proto)
    ffn = standalone_ffn_spec(model, act)
    # Capacity 5 < the ~8 tokens an expert is asked for: the tensorrt lowering drops some.
    capacity = 5 if lowering == "tensorrt" else None
    moe = MoeLayer(cluster_experts(weights[0], 4), _random_router(16, 4, 1), capacity=capacity,
                   **rule)
    assert rewrite_ffn(model, ffn, moe, _config(lowering, {0: moe})) == lowering
    path = _save(model, tmp_path / "moe.onnx")
    x = rng.standard_normal((2, 9, 16)).astype(np.float32)
    mask = np.ones((2, 9), np.int64)
    mask[1, 6:] = 0
    (y, _) = run_ort(path, {"x": x, "attention_mask": mask})
    expected = _reference(x.reshape(-1, 16), mask.reshape(-1).astype(bool), weights, act, moe)
    real = mask.reshape(-1).astype(bool)
    np.testing.assert_allclose(y.reshape(-1, 16)[real], expected[real], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- TensorRT contract


def test_tensorrt_lowering_uses_only_tensorrt_operators(tmp_path: Path) -> None:
    trt = onnx.load(str(_moe_fixture(tmp_path, "bert", "tensorrt", tau=0.3, capacity=24)))
    assert check_ops(ir.from_proto(trt), "tensorrt") == []
    onnx.checker.check_model(trt, full_check=True)
    scatter = ir.load(_moe_fixture(tmp_path, "bert", "scatter", top_k=2))
    assert any("NonZero" in p for p in check_ops(scatter, "tensorrt"))
    gather = ir.load(_moe_fixture(tmp_path, "bert", "gather", top_k=2))
    assert any("TopK" in p and "constant" in p for p in check_ops(gather, "tensorrt"))
    assert check_ops(gather, "ort") == []


def test_check_ops_flags_scatter_reduction_and_dynamic_topk() -> None:
    graph = helper.make_graph(
        [helper.make_node("ScatterND", ["d", "i", "u"], ["o"], name="s", reduction="add"),
         helper.make_node("TopK", ["d2", "k"], ["v", "ix"], name="t")],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 2]) for n in ("d", "u")]
        + [helper.make_tensor_value_info("i", TensorProto.INT64, [4, 1]),
           helper.make_tensor_value_info("d2", TensorProto.FLOAT, [4]),
           helper.make_tensor_value_info("k", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("o", "v")])
    problems = check_ops(ir.from_proto(helper.make_model(graph)), "tensorrt")
    assert any("reduction='add'" in p for p in problems)
    assert any("TopK" in p and "constant" in p for p in problems)


# ---------------------------------------------------------------- fitting


def _plant_sparse_relu(model: ir.Model, spec, seed: int = 0) -> None:
    """Makes every neuron of a group fire on one direction of x: sparse, expert-shaped."""
    rng = np.random.default_rng(seed)
    for layer in spec.layers:
        ffn = layer.ffn
        d, f = ffn.w1.w().shape
        directions = rng.standard_normal((8, d))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        group = np.repeat(np.arange(8), f // 8)
        rng.shuffle(group)  # planted experts are not contiguous channels
        w1 = directions[group].T + 0.05 * rng.standard_normal((d, f))
        ffn.w1.weight.const_value = ir.tensor(w1.astype(np.float32))
        ffn.w1.bias.const_value = ir.tensor(np.full(f, -1.6, np.float32))


def test_router_recall_on_planted_sparse_relu() -> None:
    model, spec = read_model(_fixture("bert-relu"))
    _plant_sparse_relu(model, spec)
    calib = build_calibration(None, model_input_infos(model), vocab_size=1000, seq_len=32,
                              max_samples=160, seed=0)
    fitted = fit_layers(model, spec, calib, {0: 8, 1: 8}, steps=600, router_hidden=64)
    for fit in fitted.values():
        q = fit.quality(MoePlan(8, top_k=2))
        assert q.sparsity > 0.7
        assert q.router_recall >= 0.9, q
        assert q.experts_per_token == pytest.approx(2.0)
    plans, quality = choose_moe_plans(spec, fitted, target_flops=0.0, max_error=0.2)
    assert plans and all(q.reconstruction_error <= 0.2 for q in quality.values())
    config = config_from_fits(fitted, {0: MoePlan(8, top_k=2), 1: MoePlan(8, tau=0.5)},
                              target="tensorrt", tokens=64)
    assert config.layers[0].capacity == 20  # ceil(1.25 * 64 * 2 / 8)
    assert apply_ffn_to_moe(model, spec, config) == 2
    assert check_ops(model, "tensorrt") == []


def test_experts_must_partition_the_width() -> None:
    model, spec = read_model(_fixture("bert"))
    groups = contiguous_experts(spec.layers[0].ffn.width, 4).copy()
    groups[0, 0] = groups[1, 0]
    moe = MoeLayer(groups, _random_router(spec.hidden, 4, 0), top_k=1)
    with pytest.raises(PreconditionError, match="partition"):
        apply_ffn_to_moe(model, spec, FfnToMoeConfig({0: moe}))


def test_balanced_clustering_gives_equal_groups() -> None:
    rng = np.random.default_rng(0)
    groups = cluster_experts(rng.standard_normal((16, 64)).astype(np.float32), 8)
    assert groups.shape == (8, 8)
    assert np.array_equal(np.sort(groups.reshape(-1)), np.arange(64))


def test_second_run_refuses_instead_of_resplitting(tmp_path: Path) -> None:
    # The finder skips the MoE pass's own nodes, so an expert is never mistaken for an
    # FFN and split again: reading the output back fails with a sentence saying why.
    path = _moe_fixture(tmp_path, "bert", "gather", top_k=2, fuse=False)
    with pytest.raises(UnsupportedModelError, match="already split into experts by planer"):
        read_model(path)
