"""ModernBERT (packed Q/K/V, rotate-half rotary, fused GLU, sliding-window layers): read from
both exporters' forms, neutral plans exact, pruned plans equal to a ModernBERT sliced by hand
in torch (Wqkv rows of the kept heads in each of Q, K and V, Wo columns; Wi rows of the kept
channels in both halves, Wo columns), a 50% FLOPs compile verified, and a packed layout planer
does not read refused by node.

The fixture (planer.fixtures.families "modernbert"): hidden 64, 4 heads of 16, FFN 128, two
layers, layer 1 attending in a sliding window of 4 tokens each side, so the window mask
matters at the 20 tokens fed here; no biases, as the released models. A variant with biases
exported here covers the packed bias slicing.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from planer.compiler.driver.cli import main
from planer.compiler.driver.pipeline import compile_plan, read_model
from planer.compiler.errors import UnsupportedModelError
from planer.fixtures.build import build_torch_model, fixture_path
from planer.passes.importance import magnitude_channel_scores, top_indices
from tests.conftest import masked_token_feeds, run_ort, run_torch_wrapper

torch = pytest.importorskip("torch")

HEADS, HEAD_SIZE, HIDDEN, WIDTH = 4, 16, 64, 128
PLAN = {"layers": [{"heads": 2, "ffn": 48}, {"heads": 3, "ffn": 80}]}




def _linear(weight: Any, bias: Any) -> Any:
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight.data = weight.clone()
    if bias is not None:
        lin.bias.data = bias.clone()
    return lin


def _sliced_torch(wrapper: Any, heads: list[list[int]], channels: list[list[int]]) -> Any:
    """Prunes a copy of the torch ModernBERT by hand.

    Head h keeps rows g·64 + h·16 .. g·64 + (h+1)·16 of Wqkv for each of Q, K, V (g = 0, 1,
    2) and those columns of Wo; channel j keeps rows j and 128 + j of Wi and column j of Wo.
    """
    model = copy.deepcopy(wrapper)
    for layer, kept_heads, kept in zip(model.model.layers, heads, channels, strict=True):
        attn, mlp = layer.attn, layer.mlp
        inner = [h * HEAD_SIZE + i for h in kept_heads for i in range(HEAD_SIZE)]
        rows = torch.tensor([g * HIDDEN + c for g in range(3) for c in inner])
        cols = torch.tensor(inner)
        wqkv, wo = attn.Wqkv, attn.Wo
        attn.Wqkv = _linear(wqkv.weight.data[rows],
                            None if wqkv.bias is None else wqkv.bias.data[rows])
        attn.Wo = _linear(wo.weight.data[:, cols], None if wo.bias is None else wo.bias.data)
        both = torch.tensor([*kept, *(WIDTH + j for j in kept)])
        index = torch.tensor(kept)
        wi, wo = mlp.Wi, mlp.Wo
        mlp.Wi = _linear(wi.weight.data[both], None if wi.bias is None else wi.bias.data[both])
        mlp.Wo = _linear(wo.weight.data[:, index], None if wo.bias is None else wo.bias.data)
    return model


@pytest.fixture(scope="module")
def modernbert_torch() -> Any:
    return build_torch_model("modernbert")


def _assert_pruned_matches_torch(path: Path, wrapper: Any, tmp_path: Path) -> Path:
    _, spec = read_model(path)
    channels = [top_indices(magnitude_channel_scores(la.ffn), want["ffn"])
                for la, want in zip(spec.layers, PLAN["layers"], strict=True)]
    result = compile_plan(path, tmp_path / "pruned", plan_data=PLAN)
    heads = [la["heads"]["kept"] for la in result.report["layers"]]
    assert [len(k) for k in heads] == [2, 3]
    feeds = masked_token_feeds()
    got = run_ort(result.model_path, feeds)[0]
    want = run_torch_wrapper(_sliced_torch(wrapper, heads, [list(c) for c in channels]), feeds)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert np.abs(got - run_torch_wrapper(wrapper, feeds)).max() > 1e-3  # it pruned
    return result.model_path


# ------------------------------------------------------------- the family fixture


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_inspect_reads_modernbert_layers(exporter: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(fixture_path("modernbert", exporter)), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["supported"] is True and data["kind"] == "encoder"
    assert [(la["heads"], la["head_size"], la["ffn"], la["hidden"], la["rotary"], la["gated"],
             la["activation"], la["norm"], la["supported"]) for la in data["layers"]] == \
        [(HEADS, HEAD_SIZE, WIDTH, HIDDEN, "half", True, "gelu", "pre", True)] * 2
    # Wqkv 64x192, Wo 64x64, Wi 64x256, Wo 128x64, no biases.
    assert [la["params"] for la in data["layers"]] == [64 * 192 + 64 * 64 + 64 * 256 + 128 * 64] * 2


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_packed_qkv_and_fused_glu_are_column_ranges(exporter: str) -> None:
    _, spec = read_model(fixture_path("modernbert", exporter))
    for layer in spec.layers:
        a, f = layer.attention, layer.ffn
        assert a.q.weight is a.k.weight is a.v.weight
        assert [(p.columns.start, p.columns.stop) for p in (a.q, a.k, a.v)] == \
            [(0, 64), (64, 128), (128, 192)]
        assert f.gate is not None and f.gate.matmul is f.w1.matmul
        # ModernBERT's act(input) * gate: the activated (gate) half is Wi's first.
        assert [(p.columns.start, p.columns.stop) for p in (f.gate, f.w1)] == \
            [(0, 128), (128, 256)]
        assert sorted(a.rotary) == ["k", "q"]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_neutral_plan_is_exact(exporter: str, tmp_path: Path) -> None:
    path = fixture_path("modernbert", exporter)
    result = compile_plan(path, tmp_path / "out", ort_kernels="on")
    feeds = masked_token_feeds()
    np.testing.assert_allclose(run_ort(result.model_path, feeds)[0], run_ort(path, feeds)[0],
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_pruned_heads_and_channels_match_a_sliced_torch_model(
        exporter: str, modernbert_torch: Any, tmp_path: Path) -> None:
    path = _assert_pruned_matches_torch(fixture_path("modernbert", exporter), modernbert_torch,
                                        tmp_path)
    # planer's own spelling (separate Q/K/V, Wi kept fused with constant Slices) reads back
    # and recompiles exactly.
    _, back = read_model(path)
    assert [(la.attention.heads, la.ffn.width, sorted(la.attention.rotary),
             la.ffn.gate is not None and la.ffn.gate.matmul is la.ffn.w1.matmul)
            for la in back.layers] == [(2, 48, ["k", "q"], True), (3, 80, ["k", "q"], True)]
    again = compile_plan(path, tmp_path / "again", ort_kernels="on")
    feeds = masked_token_feeds()
    np.testing.assert_allclose(run_ort(again.model_path, feeds)[0], run_ort(path, feeds)[0],
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_half_flops_compile_verifies(exporter: str, tmp_path: Path) -> None:
    result = compile_plan(fixture_path("modernbert", exporter), tmp_path / "out",
                          target_flops=0.5)
    report = result.report
    assert report["flops_ratio"] <= 0.5
    assert report["verification"]["min_cosine"] > 0.5  # written only after ORT ran it
    assert any(la["heads"]["after"] < HEADS for la in report["layers"])
    assert any(la["ffn"]["after"] < WIDTH for la in report["layers"])


def test_ort_optimized_form_is_read_pruned_and_verified(modernbert_torch: Any,
                                                        tmp_path: Path) -> None:
    # ORT's optimizer fuses SkipLayerNormalization and Gelu, and moves K's head Transpose
    # past the whole rotation ([B, S, H, d] with transposed cos/sin: rotary.heads_first).
    # Only the TorchScript export: on the dynamo one (LayerNormalization without a bias
    # input) ORT 1.32's optimizer raises IndexError in fusion_skiplayernorm.
    from planer.fixtures.fused import optimized_path

    path = optimized_path("modernbert", "torchscript")
    _, spec = read_model(path)
    assert [(la.attention.heads, la.attention.head_size, la.ffn.width, la.attention.q.in_features,
             sorted(la.attention.rotary), la.ffn.gated) for la in spec.layers] == \
        [(HEADS, HEAD_SIZE, WIDTH, HIDDEN, ["k", "q"], True)] * 2
    feeds = masked_token_feeds()
    neutral = compile_plan(path, tmp_path / "neutral", ort_kernels="on")
    np.testing.assert_allclose(run_ort(neutral.model_path, feeds)[0], run_ort(path, feeds)[0],
                               rtol=0, atol=1e-4)
    _assert_pruned_matches_torch(path, modernbert_torch, tmp_path)
    half = compile_plan(path, tmp_path / "half", target_flops=0.5).report
    assert half["flops_ratio"] <= 0.5 and half["verification"]["min_cosine"] > 0.5


# ------------------------------------------------------------- variants exported here


def _variant(path: Path, **config: Any) -> Any:
    """Builds the modernbert fixture's torch model with other config values; exports it."""
    from transformers import AutoConfig, AutoModel

    from planer.fixtures.build import _export
    from planer.fixtures.families import (
        FAMILY_SPECS,
        TEXT_INPUTS,
        _export_wrapper,
        _perturb_constant_parameters,
    )

    spec = FAMILY_SPECS["modernbert"]
    torch.manual_seed(0)
    model = AutoModel.from_config(
        AutoConfig.for_model(spec.model_type, **{**spec.config, **config})).eval()
    _perturb_constant_parameters(model)
    wrapper = _export_wrapper(model, TEXT_INPUTS, {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _export(wrapper, TEXT_INPUTS, "torchscript", path)
    return wrapper


def test_biased_variant_slices_packed_biases(tmp_path: Path) -> None:
    wrapper = _variant(tmp_path / "model.onnx", attention_bias=True, mlp_bias=True)
    path = tmp_path / "model.onnx"
    _, spec = read_model(path)
    assert all(la.attention.q.bias is not None and la.ffn.gate is not None
               and la.ffn.gate.bias is la.ffn.w1.bias is not None for la in spec.layers)
    neutral = compile_plan(path, tmp_path / "neutral", ort_kernels="on")
    feeds = masked_token_feeds()
    np.testing.assert_allclose(run_ort(neutral.model_path, feeds)[0], run_ort(path, feeds)[0],
                               rtol=0, atol=1e-4)
    _assert_pruned_matches_torch(path, wrapper, tmp_path)


def test_group_inside_the_heads_is_refused_by_node(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Q/K/V packed per head ([B, S, H, 3, d], unbound on axis -2): a layout planer does not
    # read, named by the node that unpacks it.
    from transformers.models.modernbert import modeling_modernbert as mb

    monkeypatch.setattr(mb.ModernBertAttention, "forward", _per_head_forward(mb))
    _variant(tmp_path / "model.onnx")
    with pytest.raises(UnsupportedModelError) as info:
        read_model(tmp_path / "model.onnx")
    message = str(info.value)
    assert "Split node '" in message and "on an unexpected axis" in message


def _per_head_forward(mb: Any) -> Any:
    """ModernBertAttention.forward with Wqkv's columns read as [H, 3, d] instead of [3, H, d]."""

    def forward(self: Any, hidden_states: Any, position_embeddings: Any = None,
                attention_mask: Any = None, **kwargs: Any) -> Any:
        input_shape = hidden_states.shape[:-1]
        qkv = self.Wqkv(hidden_states).view(*input_shape, -1, 3, self.head_dim)
        query, key, value = (t.transpose(1, 2) for t in qkv.unbind(dim=-2))
        cos, sin = position_embeddings
        query, key = mb.apply_rotary_pos_emb(query, key, cos, sin, unsqueeze_dim=1)
        out, weights = mb.eager_attention_forward(self, query, key, value, attention_mask,
                                                  scaling=self.head_dim**-0.5)
        return self.Wo(out.reshape(*input_shape, -1)), weights

    return forward


def test_pruned_modernbert_golden(golden: Any) -> None:
    # What head and channel pruning emit for packed Q/K/V and the fused GLU (layer 0: heads
    # 1 and 3; channels 0..39, so Wi stays one MatMul split by two constant Slices).
    from planer.passes.channel_pruning import ChannelPruningConfig, apply_channel_pruning
    from planer.passes.head_pruning import HeadPruningConfig, apply_head_pruning
    from tests.goldens import structure

    model, spec = read_model(fixture_path("modernbert", "dynamo"))
    assert apply_head_pruning(model, spec, HeadPruningConfig(keep={0: (1, 3)})) == 1
    assert apply_channel_pruning(model, spec,
                                 ChannelPruningConfig(keep={0: tuple(range(40))})) == 1
    # Only the nodes pruning emitted: the exporter writes the two rotary tables (global and
    # sliding-window) in either order from one fixture build to the next.
    emitted = [line for line in structure(model).splitlines(keepends=True) if "  [" in line]
    golden("pruning_modernbert.txt", "".join(emitted))


def test_layer_dropped_to_nothing_runs(tmp_path: Path) -> None:
    # Layer 1 keeps no head and no channel: its attention and GLU give way to their
    # (absent, so zero) output biases at the residual Adds.
    plan = {"layers": [{"heads": 2, "ffn": 64}, {"heads": 0, "ffn": 0}]}
    result = compile_plan(fixture_path("modernbert", "dynamo"), tmp_path / "out",
                          plan_data=plan)
    assert result.report["flops_ratio"] < 0.4
    (out,) = run_ort(result.model_path, masked_token_feeds(), optimize=True)
    assert np.isfinite(out).all()
