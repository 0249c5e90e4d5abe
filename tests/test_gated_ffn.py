"""Gated FFNs (SwiGLU, as in Llama-style decoders) on a tiny Llama: read in both exporters'
forms, neutral plans exact, pruned plans equal to a Llama sliced by hand in torch (gate and
up rows, down columns; Q/K/V rows and O columns with rotary + RMSNorm), a 50% FLOPs compile
verified, and every pass that cannot rewrite a gated FFN yet refused by name."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import pytest

from planer import api
from planer.compiler.blocks import find_unpaired_blocks
from planer.compiler.canonicalize import canonicalize
from planer.compiler.driver.pipeline import compile_plan, read_model
from planer.compiler.errors import UnsupportedModelError
from planer.compiler.gated_ffn import require_gated_support
from planer.compiler.spec import FfnSpec
from planer.compiler.support import prepare
from planer.passes.importance import (
    magnitude_channel_scores,
    magnitude_head_scores,
    top_indices,
)
from tests.conftest import run_ort

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, SEQ, HEADS, HEAD_SIZE, WIDTH = 1000, 32, 4, 16, 128
PRODUCT = "'/model/model/layers.0/mlp/Mul'"  # layer 0's gating Mul in the TorchScript export


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny Llama (hidden 64, 4 heads, FFN 128, 2 layers) and its two exports."""
    from planer.fixtures.decoders import export_lm, lm_wrapper, tiny_llama

    model = tiny_llama(heads=HEADS, width=WIDTH, vocab=VOCAB)
    folder = tmp_path_factory.mktemp("llama")
    paths = {}
    for exporter in ("torchscript", "dynamo"):
        paths[exporter] = folder / f"llama_{exporter}.onnx"
        export_lm(lm_wrapper(model), exporter, paths[exporter])
    return {"model": model, **paths}


def _feeds(seed: int = 0) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(seed).integers(3, VOCAB, size=(2, 20)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _torch_logits(model: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(feeds["input_ids"]),
                    attention_mask=torch.from_numpy(feeds["attention_mask"]), use_cache=False)
    return out.logits.numpy()


def _sliced(model: Any, heads: list[tuple[int, ...]], channels: list[tuple[int, ...]]) -> Any:
    """Prunes a copy of the torch Llama by hand: Q/K/V rows and O columns of the kept heads,
    gate/up rows and down columns of the kept channels."""
    model = copy.deepcopy(model)
    for layer, kept_heads, kept in zip(model.model.layers, heads, channels, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        rows = torch.tensor([h * HEAD_SIZE + i for h in kept_heads for i in range(HEAD_SIZE)],
                            dtype=torch.long)
        for name in ("q_proj", "k_proj", "v_proj"):
            old = getattr(attn, name)
            setattr(attn, name, _linear(old.weight.data[rows]))
        attn.o_proj = _linear(attn.o_proj.weight.data[:, rows])
        index = torch.tensor(kept, dtype=torch.long)
        mlp.gate_proj = _linear(mlp.gate_proj.weight.data[index])
        mlp.up_proj = _linear(mlp.up_proj.weight.data[index])
        mlp.down_proj = _linear(mlp.down_proj.weight.data[:, index])
    return model


def _linear(weight: Any) -> Any:
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight.data = weight.clone()
    return lin


def _plan(heads: int, ffn: int, **extra: Any) -> dict[str, Any]:
    return {"layers": [{"heads": heads, "ffn": ffn, **extra}, {"heads": heads, "ffn": ffn}]}


def test_torchscript_export_is_read_as_gated_layers(llama: dict[str, Any]) -> None:
    _, spec = read_model(llama["torchscript"])
    assert len(spec.layers) == 2
    for layer in spec.layers:
        ffn = layer.ffn
        assert ffn.gate is not None and ffn.activation == "silu" and ffn.width == WIDTH
        assert str(ffn.gate.matmul.name).endswith("mlp/gate_proj/MatMul")
        assert str(ffn.w1.matmul.name).endswith("mlp/up_proj/MatMul")
        assert str(ffn.w2.matmul.name).endswith("mlp/down_proj/MatMul")
        assert ffn.gate.input is ffn.w1.input is ffn.x
        assert set(layer.attention.rotary) == {"q", "k"}
        assert layer.norm == "pre"  # RMSNorm (Pow ... Mul) reads the residual stream
    layer = spec.to_dict()["layers"][0]
    assert layer["gated"] is True
    # Three 64x128 FFN projections and four 64x64 attention ones, no biases.
    assert layer["params"] == 3 * 64 * WIDTH + 4 * 64 * 64


def test_inspect_calls_the_llama_a_causal_decoder(llama: dict[str, Any]) -> None:
    # Separate Q/K/V projections: only running it shows the causal mask.
    summary = api.inspect(llama["torchscript"])
    assert (summary.kind, summary.data["causal"]) == ("decoder", True)
    assert {layer.norm for layer in summary.layers} == {"pre"}


def test_dynamo_export_gated_ffns_are_read(llama: dict[str, Any]) -> None:
    # The dynamo export's rotary K goes through SDPA's Reshape/Transpose/Reshape, which
    # compiler.rotary does not read yet; its FFNs are read all the same.
    model = ir.load(llama["dynamo"])
    prepare(model)
    canonicalize(model)
    ffns = [b for b in find_unpaired_blocks(model.graph) if isinstance(b, FfnSpec)]
    assert len(ffns) == 2
    for ffn in ffns:
        assert ffn.gate is not None and ffn.activation == "silu" and ffn.width == WIDTH
        assert ffn.gate.input is ffn.w1.input
        assert ffn.w2.input is ffn.nodes[-1].outputs[0]  # the gating Mul feeds down


def test_neutral_plan_is_exact(llama: dict[str, Any], tmp_path: Path) -> None:
    result = compile_plan(llama["torchscript"], tmp_path / "out")
    feeds = _feeds()
    (compiled,) = run_ort(result.model_path, feeds)
    np.testing.assert_allclose(compiled, _torch_logits(llama["model"], feeds), rtol=0,
                               atol=1e-4)


@pytest.mark.parametrize(("heads", "ffn"), [(4, 48), (2, 128), (3, 80)])
def test_pruned_plan_matches_a_hand_sliced_llama(llama: dict[str, Any], tmp_path: Path,
                                                 heads: int, ffn: int) -> None:
    _, spec = read_model(llama["torchscript"])
    kept_heads = [top_indices(magnitude_head_scores(la.attention), heads) for la in spec.layers]
    kept = [top_indices(magnitude_channel_scores(la.ffn), ffn) for la in spec.layers]
    result = compile_plan(llama["torchscript"], tmp_path / "out", plan_data=_plan(heads, ffn))
    feeds = _feeds(1)
    (compiled,) = run_ort(result.model_path, feeds)
    expected = _torch_logits(_sliced(llama["model"], kept_heads, kept), feeds)
    np.testing.assert_allclose(compiled, expected, rtol=0, atol=1e-4)
    assert np.abs(compiled - _torch_logits(llama["model"], feeds)).max() > 1e-3  # it pruned
    _, pruned = read_model(result.model_path)
    assert [(la.attention.heads, la.ffn.width) for la in pruned.layers] == [(heads, ffn)] * 2
    assert all(la.ffn.gate is not None and la.ffn.gate.out_features == ffn
               for la in pruned.layers)


def test_magnitude_scores_count_the_gate(llama: dict[str, Any]) -> None:
    _, spec = read_model(llama["torchscript"])
    ffn = spec.layers[0].ffn
    assert ffn.gate is not None
    ungated = np.linalg.norm(ffn.w1.w(), axis=0) * np.linalg.norm(ffn.w2.w(), axis=1)
    np.testing.assert_allclose(magnitude_channel_scores(ffn),
                               ungated * np.linalg.norm(ffn.gate.w(), axis=0), rtol=1e-6)


def test_half_flops_compile_is_verified(llama: dict[str, Any], tmp_path: Path) -> None:
    ids = np.random.default_rng(7).integers(3, VOCAB, size=(48, SEQ)).astype(np.int64)
    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, input_ids=ids, attention_mask=np.ones_like(ids))
    result = compile_plan(llama["torchscript"], tmp_path / "out", target_flops=0.5,
                          calibration=calibration, seq_len=SEQ)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["flops_ratio"] <= 0.5
    # FLOPs count three FFN projections: 2 layers x (attention 1.31 M + FFN 1.57 M) plus
    # the LM head's 4.10 M at 32 tokens.
    assert report["flops_before"] == 2 * (4 * 2 * SEQ * 64 * 64 + 2 * 2 * HEADS * SEQ**2
                                          * HEAD_SIZE + 3 * 2 * SEQ * 64 * WIDTH) \
        + 2 * SEQ * 64 * VOCAB
    assert "max_abs_diff" in report["verification"]  # planer's own check ran and passed
    assert result.model_path.is_file()


@pytest.mark.parametrize(("extra", "says"), [
    ({"moe": {"experts": 4, "top_k": 1}}, "FFN→MoE (plan layer 0 sets moe)"),
    ({"int8": {"blocks": "ffn", "mode": "dynamic"}}, "INT8 of the FFN block (plan layer 0)"),
])
def test_passes_that_cannot_rewrite_a_gated_ffn_refuse_it_by_name(
        llama: dict[str, Any], tmp_path: Path, extra: dict[str, Any], says: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from planer.compiler.driver import pipeline

    def no_fitting(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the refusal must come before calibration")

    monkeypatch.setattr(pipeline, "load_fitting", no_fitting)
    with pytest.raises(UnsupportedModelError) as error:
        compile_plan(llama["torchscript"], tmp_path / "out", plan_data=_plan(4, WIDTH, **extra))
    message = str(error.value)
    assert f"layer 0's FFN is gated (ai.onnx.Mul node {PRODUCT}" in message
    assert says in message and "cannot rewrite gated ones yet" in message


def test_moe_in_a_latency_search_and_mux_are_refused(llama: dict[str, Any]) -> None:
    _, spec = read_model(llama["torchscript"])
    with pytest.raises(UnsupportedModelError, match=r"FFN→MoE \(--passes moe\)"):
        require_gated_support(spec, passes={"prune", "moe"})
    with pytest.raises(UnsupportedModelError, match=r"multiplexing \(--mux\)"):
        require_gated_support(spec, mux=2)
    require_gated_support(spec, passes={"prune"})  # pruning alone is fine


def test_int8_cost_model_refuses_a_gated_ffn(llama: dict[str, Any]) -> None:
    from planer.cost_model.int8_cost import measure_int8_costs

    model, spec = read_model(llama["torchscript"])
    with pytest.raises(UnsupportedModelError, match="INT8's cost model reads act"):
        measure_int8_costs(model, spec, [_feeds()])


def test_recovery_ffn_mirror_replays_the_gated_ffn(llama: dict[str, Any]) -> None:
    from planer.compiler.capture import capture_tokens
    from planer.recovery.mirror import FfnMirror, WeightStore

    model, spec = read_model(llama["torchscript"])
    ffn = spec.layers[1].ffn
    x, out = capture_tokens(model, [ffn.x, ffn.out], [_feeds(2)])
    mirror = FfnMirror(WeightStore(), ffn, set())
    with torch.no_grad():
        got = mirror(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, out, rtol=0, atol=1e-5)


def test_latency_profile_times_the_gate(tmp_path: Path) -> None:
    from planer.cost_model.profile import BlockShape, ProfileStore, ffn_block, profile_blocks

    shape = BlockShape(batch=1, tokens=8, hidden=16, head_size=4, threads=1)
    gated = ffn_block(shape, 32, gated=True)
    assert [n.op_type for n in gated.graph.node].count("MatMul") == 3
    store = ProfileStore(1, path=tmp_path / "latency.sqlite")
    measured = profile_blocks(shape, [1], [32], store=store, repeats=1, gated=True)
    assert [m.kind for m in measured["ffn"]] == ["ffn"]
    assert [m.units for m in store.load("ffn_gated", shape)] == [32]
    assert store.load("ffn", shape) == []  # gated timings never stand in for ungated ones


def test_target_latency_compiles_the_gated_model(llama: dict[str, Any], tmp_path: Path) -> None:
    # The search profiles SwiGLU variants (kind ffn_gated) and keeps gated FFNs float.
    from planer.compiler.driver.cli import main

    ids = np.random.default_rng(7).integers(3, VOCAB, size=(32, SEQ)).astype(np.int64)
    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, input_ids=ids, attention_mask=np.ones_like(ids))
    out = tmp_path / "out"
    code = main(["compile", str(llama["torchscript"]), "--target-latency", "60%", "--batch",
                 "1", "--seq-len", str(SEQ), "--threads", "1", "-o", str(out),
                 "--calibration", str(calibration)])
    assert code in (0, 3)  # 3: this machine's noise kept the target out of reach
    report = json.loads((out / "report.json").read_text())
    assert report["measured_ms"] > 0 and report["target_met"] == (code == 0)
    assert not any("int8" in layer for layer in report["plan"]["layers"])


def _export_llama(tmp_path: Path, hidden_act: str) -> tuple[Any, Path]:
    from planer.fixtures.decoders import export_lm, lm_wrapper

    config = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=HEADS, num_key_value_heads=HEADS,
        intermediate_size=WIDTH, num_hidden_layers=2, vocab_size=VOCAB,
        max_position_embeddings=128, hidden_act=hidden_act)
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path / f"llama_{hidden_act}.onnx"
    export_lm(lm_wrapper(model), "torchscript", path)
    return model, path


def test_geglu_is_read_and_pruned_like_swiglu(tmp_path: Path) -> None:
    model, path = _export_llama(tmp_path, "gelu")
    _, spec = read_model(path)
    assert [(la.ffn.activation, la.ffn.gated) for la in spec.layers] == [("gelu", True)] * 2
    kept = [top_indices(magnitude_channel_scores(la.ffn), 40) for la in spec.layers]
    result = compile_plan(path, tmp_path / "out", plan_data=_plan(HEADS, 40))
    feeds = _feeds(3)
    (compiled,) = run_ort(result.model_path, feeds)
    expected = _torch_logits(_sliced(model, [tuple(range(HEADS))] * 2, kept), feeds)
    np.testing.assert_allclose(compiled, expected, rtol=0, atol=1e-4)


def test_an_unactivated_gate_is_refused_by_name(tmp_path: Path) -> None:
    # A bilinear GLU (no activation on the gate) is not read; the refusal names its Mul.
    _, path = _export_llama(tmp_path, "linear")
    with pytest.raises(UnsupportedModelError) as error:
        read_model(path)
    assert f"its FFN is gated: ai.onnx.Mul node {PRODUCT}" in str(error.value)


def test_moe_under_a_flops_target_is_refused_before_fitting(
        llama: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from planer.compiler.driver import pipeline

    def no_fitting(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the refusal must come before calibration")

    monkeypatch.setattr(pipeline, "load_fitting", no_fitting)
    with pytest.raises(UnsupportedModelError, match=r"FFN→MoE \(--passes moe\)"):
        compile_plan(llama["torchscript"], tmp_path / "out", target_flops=0.5,
                     calibration=tmp_path / "unused.npz", passes=frozenset({"prune", "moe"}))
