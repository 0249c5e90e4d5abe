"""The quality model's probe on a language model: next-token logits compared token by token.

Pooled over the sequence, logits that moved between tokens look unchanged; the probe
compares each real token's logits (centred over the vocabulary) with the source's.
"""

from __future__ import annotations

import numpy as np
import pytest

from planer.compiler.driver.pipeline import read_model
from planer.cost_model.quality import Probe, _cosines, _pooled

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 1000, 16


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Probe:
    from planer.fixtures.decoders import export_lm, lm_wrapper

    config = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
        num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=128)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("probe") / "llama.onnx"
    export_lm(lm_wrapper(transformers.LlamaForCausalLM(config).eval()), "torchscript", path)
    model, spec = read_model(path)
    rng = np.random.default_rng(0)
    mask = np.ones((2, SEQ), np.int64)
    mask[1, 10:] = 0  # right padding: 26 real tokens
    feed = {"input_ids": rng.integers(0, VOCAB, (2, SEQ)).astype(np.int64),
            "attention_mask": mask}
    return Probe(model, spec, [feed])


def test_logits_are_compared_per_real_token_centred(probe: Probe) -> None:
    base = probe.base[0]
    assert base.shape == (26, VOCAB)
    np.testing.assert_allclose(base.mean(axis=1), 0.0, atol=1e-5)
    assert probe.loss(0, 1, lambda k: probe.zeros[k][probe.deltas[0][1]]) == pytest.approx(
        0.0, abs=1e-6)


def test_logits_moved_between_tokens_are_a_loss(probe: Probe) -> None:
    feed = probe.feeds[0]
    logits = probe.tensors[0][probe.output]
    swapped = logits.copy()
    swapped[0, [2, 5]] = logits[0, [5, 2]]  # two tokens' predictions trade places
    pooled = _cosines(_pooled(swapped, feed), _pooled(logits, feed))
    np.testing.assert_allclose(pooled, 1.0, atol=1e-9)  # the sum over tokens is the same
    per_token = _cosines(probe.summary(swapped, feed), probe.base[0])
    assert np.sum(per_token < 0.99) == 2


def test_hidden_states_are_still_pooled(probe: Probe) -> None:
    feed = probe.feeds[0]
    hidden = np.random.default_rng(1).standard_normal((2, SEQ, 64)).astype(np.float32)
    np.testing.assert_allclose(probe.summary(hidden, feed), _pooled(hidden, feed))


def test_a_layer_change_moves_the_per_token_loss(probe: Probe) -> None:
    rng = np.random.default_rng(2)
    shape = probe.zeros[0][probe.deltas[1][1]].shape
    noise = 0.05 * rng.standard_normal(shape).astype(np.float32)
    assert probe.loss(1, 1, lambda k: noise) > 1e-4

