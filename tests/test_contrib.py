"""Fused ORT contrib ops: each expansion matches ORT's kernel, and what cannot be expanded
is refused by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from planer.compiler.contrib import expand_contrib_ops
from planer.compiler.errors import UnsupportedModelError
from tests.conftest import run_ort

MS = "com.microsoft"
B, S, D, H = 2, 6, 8, 2
RANK1 = ["b"]


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           outputs: list[str], inits: dict[str, np.ndarray], opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", inputs,
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, RANK1 if o == "count" else
                                       ["b", "s", D]) for o in outputs],
        [numpy_helper.from_array(a, n) for n, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid(MS, 1)])
    model.ir_version = 8
    return model


def _x(name: str = "x", shape: tuple = ("b", "s", D)) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _mask(name: str, shape: list, dtype: int = TensorProto.INT32) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _expanded_matches(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], tmp_path: Path,
                      *, atol: float = 1e-5) -> ir.Model:
    """Expands `proto` and checks the result against ORT running the fused kernels."""
    fused = tmp_path / "fused.onnx"
    onnx.save(proto, fused)
    model = ir.serde.deserialize_model(proto)
    assert expand_contrib_ops(model) >= 1
    assert not [n.op_type for n in model.graph if n.domain == MS]
    expanded = tmp_path / "expanded.onnx"
    ir.save(model, str(expanded))
    onnx.checker.check_model(str(expanded))
    for want, got in zip(run_ort(fused, feeds), run_ort(expanded, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=atol)
    return model


def test_skip_layernorm_keeps_the_sum_output(tmp_path: Path) -> None:
    inits = {"g": _rand(D, seed=1) + 1, "be": _rand(D, seed=2), "bias": _rand(D, seed=3)}
    node = helper.make_node("SkipLayerNormalization", ["x", "r", "g", "be", "bias"],
                            ["y", "", "", "sum"], name="sln", domain=MS, epsilon=1e-5)
    proto = _model([node], [_x(), _x("r")], ["y", "sum"], inits)
    model = _expanded_matches(proto, {"x": _rand(B, S, D, seed=4), "r": _rand(B, S, D, seed=5)},
                              tmp_path)
    ops = [n.op_type for n in model.graph]
    assert ops == ["Add", "Add", "LayerNormalization"]  # bias, residual, norm


def test_skip_simplified_and_simplified_layernorm(tmp_path: Path) -> None:
    inits = {"g": _rand(D, seed=1) + 1}
    nodes = [helper.make_node("SkipSimplifiedLayerNormalization", ["x", "r", "g"], ["y"],
                              name="ssln", domain=MS, epsilon=1e-6),
             helper.make_node("SimplifiedLayerNormalization", ["y", "g"], ["z"], name="sln",
                              axis=-1, epsilon=1e-6)]
    proto = _model(nodes, [_x(), _x("r")], ["z"], inits)
    _expanded_matches(proto, {"x": _rand(B, S, D, seed=4), "r": _rand(B, S, D, seed=5)},
                      tmp_path)


def test_fast_gelu_quick_gelu_and_fused_matmul(tmp_path: Path) -> None:
    inits = {"bias": _rand(D, seed=1), "w": _rand(D, D, seed=2)}
    nodes = [helper.make_node("FastGelu", ["x", "bias"], ["f"], name="fg", domain=MS),
             helper.make_node("QuickGelu", ["f"], ["q"], name="qg", domain=MS, alpha=1.5),
             helper.make_node("FusedMatMul", ["q", "w"], ["y"], name="fmm", domain=MS,
                              transB=1, alpha=0.25)]
    proto = _model(nodes, [_x()], ["y"], inits)
    _expanded_matches(proto, {"x": _rand(B, S, D, seed=4)}, tmp_path)


def test_layernorm_below_opset_17_is_spelled_out(tmp_path: Path) -> None:
    # ORT's optimizer writes LayerNormalization into opset-14 models; the checker rejects it.
    inits = {"g": _rand(D, seed=1) + 1, "be": _rand(D, seed=2)}
    node = helper.make_node("LayerNormalization", ["x", "g", "be"], ["y"], name="ln",
                            axis=-1, epsilon=1e-5)
    proto = _model([node], [_x()], ["y"], inits, opset=14)
    fused = tmp_path / "fused.onnx"
    onnx.save(proto, fused)
    model = ir.serde.deserialize_model(proto)
    assert expand_contrib_ops(model) == 1
    ir.save(model, str(tmp_path / "x.onnx"))
    onnx.checker.check_model(str(tmp_path / "x.onnx"))
    feeds = {"x": _rand(B, S, D, seed=3)}
    np.testing.assert_allclose(run_ort(tmp_path / "x.onnx", feeds)[0], run_ort(fused, feeds)[0],
                               rtol=0, atol=1e-5)


def test_embed_layernorm_with_mask_index(tmp_path: Path) -> None:
    inits = {"word": _rand(50, D, seed=1), "pos": _rand(16, D, seed=2), "seg": _rand(2, D, seed=3),
             "g": _rand(D, seed=4) + 1, "be": _rand(D, seed=5)}
    node = helper.make_node("EmbedLayerNormalization",
                            ["ids", "types", "word", "pos", "seg", "g", "be", "mask"],
                            ["y", "mask_index", "sum"], name="eln", domain=MS, epsilon=1e-12)
    cast = helper.make_node("Cast", ["mask_index"], ["count"], to=TensorProto.FLOAT)
    proto = _model([node, cast], [_mask("ids", ["b", "s"]), _mask("types", ["b", "s"]),
                                  _mask("mask", ["b", "s"])], ["y", "count", "sum"], inits)
    mask = np.ones((B, S), np.int32)
    mask[1, 4:] = 0
    feeds = {"ids": np.arange(B * S, dtype=np.int32).reshape(B, S) % 50,
             "types": (np.arange(B * S).reshape(B, S) % 2).astype(np.int32), "mask": mask}
    _expanded_matches(proto, feeds, tmp_path)


def _attention_inputs(unidirectional: int = 0) -> tuple[list, dict[str, np.ndarray]]:
    inits = {"w": _rand(D, 3 * D, seed=1) * 0.5, "bias": _rand(3 * D, seed=2)}
    node = helper.make_node("Attention", ["x", "w", "bias", "mask", "", "extra"], ["y"],
                            name="att", domain=MS, num_heads=H, unidirectional=unidirectional)
    return [node], inits


@pytest.mark.parametrize("mask_rank", [1, 2, 3])
def test_attention_masks(mask_rank: int, tmp_path: Path) -> None:
    nodes, inits = _attention_inputs()
    shapes = {1: ["b"], 2: ["b", "s"], 3: ["b", "s", "s"]}
    proto = _model(nodes, [_x(), _mask("mask", shapes[mask_rank]),
                           _x("extra", ("b_or_1", 1, "s", "s"))], ["y"], inits)
    rng = np.random.default_rng(0)
    masks = {1: np.array([S, 4], np.int32),
             2: np.array([[1] * S, [1] * 4 + [0] * (S - 4)], np.int32),
             3: (rng.random((B, S, S)) > 0.3).astype(np.int32)}
    if mask_rank == 3:
        masks[3][:, :, 0] = 1  # no row fully masked
    feeds = {"x": _rand(B, S, D, seed=4), "mask": masks[mask_rank],
             "extra": _rand(1, 1, S, S, seed=5)}
    model = _expanded_matches(proto, feeds, tmp_path)
    assert [n.op_type for n in model.graph].count("MatMul") == 5  # q, k, v, scores, context


def test_causal_attention(tmp_path: Path) -> None:
    nodes, inits = _attention_inputs(unidirectional=1)
    nodes[0].input[:] = ["x", "w", "bias"]
    proto = _model(nodes, [_x()], ["y"], inits)
    _expanded_matches(proto, {"x": _rand(B, S, D, seed=4)}, tmp_path)


@pytest.mark.parametrize("mask_rank", [1, 2])
def test_multihead_attention(mask_rank: int, tmp_path: Path) -> None:
    inits = {"bias": _rand(3 * D, seed=2)}
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v", "bias", "mask"], ["y"],
                            name="mha", domain=MS, num_heads=H)
    proto = _model([node], [_x("q"), _x("k"), _x("v"),
                            _mask("mask", ["b"] if mask_rank == 1 else ["b", "s"])],
                   ["y"], inits)
    mask = np.array([S, 3], np.int32) if mask_rank == 1 else \
        np.array([[1] * S, [1] * 3 + [0] * (S - 3)], np.int32)
    feeds = {"q": _rand(B, S, D, seed=3), "k": _rand(B, S, D, seed=4),
             "v": _rand(B, S, D, seed=5), "mask": mask}
    _expanded_matches(proto, feeds, tmp_path)


# ---------------------------------------------------------------- refusals


def _refusal(proto: onnx.ModelProto) -> str:
    with pytest.raises(UnsupportedModelError) as info:
        expand_contrib_ops(ir.serde.deserialize_model(proto))
    return str(info.value)


def test_attention_with_past_state_is_refused_by_name() -> None:
    inits = {"w": _rand(D, 3 * D), "bias": _rand(3 * D)}
    node = helper.make_node("Attention", ["x", "w", "bias", "", "past"], ["y", "present"],
                            name="layer3_attn", domain=MS, num_heads=H)
    proto = _model([node], [_x(), _x("past", (2, "b", H, "p", D // H))], ["y", "present"],
                   inits)
    message = _refusal(proto)
    assert "com.microsoft.Attention node 'layer3_attn'" in message
    assert "past key/value state" in message


def test_attention_with_unequal_widths_is_refused_by_name() -> None:
    inits = {"w": _rand(D, 2 * D + 4), "bias": _rand(2 * D + 4)}
    node = helper.make_node("Attention", ["x", "w", "bias"], ["y"], name="odd", domain=MS,
                            num_heads=H, qkv_hidden_sizes=[D, D, 4])
    message = _refusal(_model([node], [_x()], ["y"], inits))
    assert "com.microsoft.Attention node 'odd'" in message and "[8, 8, 4]" in message


def test_packed_multihead_attention_is_refused_by_name() -> None:
    node = helper.make_node("MultiHeadAttention", ["qkv"], ["y"], name="packed", domain=MS,
                            num_heads=H)
    qkv = helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["b", "s", H, 3, D // H])
    message = _refusal(_model([node], [qkv], ["y"], {}))
    assert "com.microsoft.MultiHeadAttention node 'packed'" in message
    assert "packed into one tensor" in message


@pytest.mark.parametrize("op_type", ["GroupQueryAttention", "RotaryEmbedding", "PackedAttention"])
def test_unexpandable_kernels_are_refused_by_name(op_type: str) -> None:
    node = helper.make_node(op_type, ["x"], ["y"], name=f"my_{op_type}", domain=MS)
    message = _refusal(_model([node], [_x()], ["y"], {}))
    assert f"com.microsoft.{op_type} node 'my_{op_type}'" in message
    assert "before ORT's transformer optimizer" in message


def test_skip_layernorm_statistics_output_is_refused() -> None:
    inits = {"g": _rand(D) + 1}
    node = helper.make_node("SkipLayerNormalization", ["x", "r", "g"], ["y", "mean"],
                            name="stats", domain=MS)
    message = _refusal(_model([node], [_x(), _x("r")], ["y", "mean"], inits))
    assert "com.microsoft.SkipLayerNormalization node 'stats'" in message
