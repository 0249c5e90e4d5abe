"""Removal costs on a decoder with a massive activation: outlier tokens do not set the scale.

The tiny Llama (hidden 64, 4 heads, FFN 128, 2 layers) gets what SmolLM2-135M grows from
layer 12 on: layer 0's FFN channel 0 fires only on token 1 (placed first in every
sequence, like a BOS token) and writes a value ~1000x the usual residual norm into one
residual channel. Layer 1 then adds to a residual whose mean energy is that token's.
Costs divided by the mean residual energy made every layer-1 unit look ~10^5 cheaper and
an 80% FLOPs allocation removed layer 1's FFN whole; with the outlier token's energy
capped (and its own change taken relative to its own residual) they stay where they are
without the massive token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from planer.compiler.driver.pipeline import read_model
from planer.passes.prune_fit import allocate, capture_layers, importance, token_weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, SEQ, SINK, CHANNEL, MASSIVE = 1000, 32, 1, 5, 0


def _llama(tmp: Path, *, massive: bool) -> Path:
    """Exports the tiny Llama (TorchScript), with or without layer 0's massive write."""
    from planer.fixtures.decoders import export_lm, lm_wrapper

    config = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
        num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, CHANNEL] = 0.0  # only the sink token has residual channel CHANNEL
        emb[SINK] = 0.0
        emb[SINK, CHANNEL] = 1.0
        layer0 = model.model.layers[0]
        layer0.self_attn.o_proj.weight[CHANNEL] = 0.0  # attention leaves that channel alone
        mlp = layer0.mlp
        for proj in (mlp.gate_proj, mlp.up_proj):  # FFN channel 0 reads CHANNEL only
            proj.weight[0] = 0.0
            proj.weight[0, CHANNEL] = 5.0
        mlp.down_proj.weight[:, 0] = 0.0
        if massive:  # act ≈ 40·40 on the sink token: residual channel MASSIVE ≈ 160
            mlp.down_proj.weight[MASSIVE, 0] = 0.1
    path = tmp / f"llama_{'massive' if massive else 'plain'}.onnx"
    export_lm(lm_wrapper(model), "torchscript", path)
    return path


def _feeds() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    feeds = []
    for _ in range(4):
        ids = rng.integers(2, VOCAB, size=(4, SEQ))
        ids[:, 0] = SINK
        feeds.append({"input_ids": ids.astype(np.int64),
                      "attention_mask": np.ones((4, SEQ), np.int64)})
    return feeds


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("massive")
    result = {}
    for massive in (False, True):
        model, spec = read_model(_llama(tmp, massive=massive))
        result[massive] = (spec, capture_layers(model, spec, _feeds()))
    return result


def test_the_fixture_grows_a_massive_activation_in_layer_1(captured: dict[str, Any]) -> None:
    _, acts = captured[True]
    energy = [np.sum(a.attn_residual.astype(np.float64) ** 2, axis=1) for a in acts]
    assert energy[0].max() < 100 * np.median(energy[0])
    assert np.mean(energy[1]) > 1000 * np.median(energy[1])  # a few tokens dominate the mean


def test_layer_1_costs_do_not_collapse_under_the_massive_token(captured: dict[str, Any]) -> None:
    plain = importance(captured[False][0], captured[False][1])
    massive = importance(captured[True][0], captured[True][1])
    # The sink token's own perturbations are divided by its huge residual and the other
    # 31 of 32 tokens count as before (uncapped, the mean energy grew ~10^4 times).
    for kind in ("heads", "channels"):
        ratio = np.mean(getattr(massive, kind)[1]) / np.mean(getattr(plain, kind)[1])
        assert 0.3 < ratio < 3.0, (kind, ratio)
    # The channel that writes the massive value is layer 0's most expensive one.
    assert int(np.argmax(massive.channels[0])) == 0


def test_an_80_percent_flops_allocation_keeps_layer_1(captured: dict[str, Any]) -> None:
    spec, acts = captured[True]
    kept = allocate(spec, importance(spec, acts), 0.8, batch=1, seq_len=SEQ)
    plain_spec, plain_acts = captured[False]
    plain = allocate(plain_spec, importance(plain_spec, plain_acts), 0.8, batch=1, seq_len=SEQ)
    # Mean-energy costs kept (2 heads, 0 channels) of layer 1 here; without the massive
    # write both rules keep (4, ~30).
    assert kept[1][0] == 4 and kept[1][1] >= 16, kept
    assert abs(kept[1][1] - plain[1][1]) <= 8, (kept, plain)


def test_token_weights_cap_only_outlier_tokens() -> None:
    # Energies 1, 1, 2, 100 (median 1.5, cap 30): the last is 100/30 caps, so it counts
    # 0.3 as much and enters the mean as 30.
    residual = np.sqrt(np.array([[1.0], [1.0], [2.0], [100.0]]))
    mean = (1 + 1 + 2 + 30) / 4
    np.testing.assert_allclose(token_weights(residual),
                               [1 / (4 * mean), 1 / (4 * mean), 1 / (4 * mean),
                                0.3 / (4 * mean)], rtol=1e-12)
    # Without outliers the weights are the plain mean's: E‖c‖² / E‖r‖², as before.
    plain = np.array([[3.0, 4.0], [0.0, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(token_weights(plain), np.full(3, 1 / (3 * 28 / 3)), rtol=1e-12)
