"""The measured quality model (cost_model.quality) and the search over MoE and skim variants."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from planer.compiler.calibration import build_calibration, model_input_infos
from planer.compiler.driver.pipeline import compile_plan, read_model
from planer.compiler.plan import LayerPlan, MoePlan, Plan
from planer.cost_model import variants
from planer.cost_model.quality import (
    KINDS,
    Curve,
    LayerLoss,
    MeasuredQuality,
    Probe,
    fit_weights,
    measure_layers,
)
from planer.cost_model.search import search
from planer.fixtures.build import fixture_path
from planer.passes.importance import magnitude_channel_scores, top_indices
from planer.passes.moe_fit import fit_layers
from planer.passes.prune_fit import Importance, capture_layers, importance
from tests.conftest import text_feeds
from tests.test_search import _model, _scores


def _feeds(vocab: int) -> list[dict[str, np.ndarray]]:
    return [text_feeds(batch=2, seq_len=16, vocab=vocab, seed=s, pad_last=3) for s in (0, 1)]


def test_probe_measures_a_single_change_as_the_compiled_model_does(tmp_path: Path) -> None:
    path = fixture_path("bert", "dynamo")
    model, spec = read_model(path)
    probe = Probe(model, spec, _feeds(spec.vocab_size))
    assert probe.model_loss(path) == pytest.approx(0.0, abs=1e-6)  # δ = 0 is the source
    assert probe.loss(0, 1, lambda k: np.zeros((1, 1, 1), np.float32)) == pytest.approx(0.0)
    ffn = spec.layers[1].ffn
    keep = np.asarray(top_indices(magnitude_channel_scores(ffn), ffn.width // 4))
    plan = Plan(tuple(dataclasses.replace(la, ffn=ffn.width // 4) if i == 1 else la
                      for i, la in enumerate(Plan.neutral(spec).layers)))
    # No calibration: kept by magnitude, the rows sliced, as the delta below does.
    compiled = compile_plan(path, tmp_path / "out", plan_data=plan.to_dict(), ort_kernels="off")
    w2 = ffn.w2.w().astype(np.float64)

    def sliced(k: int) -> np.ndarray:
        act = probe.layer_tensors(1, k)["act"].astype(np.float64)
        return act[..., keep] @ w2[keep] - act @ w2

    measured = probe.loss(1, 1, sliced)
    assert measured > 1e-5
    assert probe.model_loss(compiled.model_path) == pytest.approx(measured, rel=2e-2)


def test_measured_curves_start_at_zero_and_grow() -> None:
    model, spec = read_model(fixture_path("bert-relu", "dynamo"))
    calib = build_calibration(None, model_input_infos(model), vocab_size=spec.vocab_size,
                              seq_len=16, max_samples=24, seed=0)
    acts = capture_layers(model, spec, calib.batches)
    fits = fit_layers(model, spec, calib, {la.index: 8 for la in spec.layers}, steps=50)
    probe = Probe(model, spec, calib.batches[:1])
    plans = (MoePlan(8, top_k=2), MoePlan(8, top_k=8))
    layers = measure_layers(probe, spec, importance(spec, acts), acts, batch=1, int8=True,
                            moe=fits, moe_plans=plans)
    for layer in layers:
        for curve in (layer.attn, layer.ffn):
            assert curve.loss[0] == 0.0 and list(curve.loss) == sorted(curve.loss)
            assert curve.loss[-1] > 0  # everything removed is visible at the output
        assert layer.int8_attn is not None and layer.int8_attn >= 0
        assert layer.moe[plans[1]] == pytest.approx(0.0, abs=1e-9)  # every expert runs
        assert layer.moe[plans[0]] > 0


def test_fit_weights_recovers_per_kind_scales() -> None:
    rng = np.random.default_rng(0)
    true = {"prune": 2.0, "int8": 0.5}
    rows = []
    for _ in range(6):
        parts = {"prune": float(rng.uniform(0.01, 0.1)), "int8": float(rng.uniform(0.01, 0.1)),
                 "moe": 0.0, "skim": 0.0}
        rows.append((parts, sum(true[k] * parts[k] for k in true)))
    weights = fit_weights(rows, prior=1e-8)
    assert weights["prune"] == pytest.approx(2.0, rel=1e-3)
    assert weights["int8"] == pytest.approx(0.5, rel=1e-3)
    assert weights["moe"] == weights["skim"] == 1.0  # no plan says anything about them
    assert set(weights) == set(KINDS)


def _measured(spec, scores: Importance, *, moe_loss: float, skim_loss: float
              ) -> MeasuredQuality:
    """Steep pruning curves; MoE and skim at the given measured losses."""
    layers = []
    for i, la in enumerate(spec.layers):
        h, f = la.attention.heads, la.ffn.width
        attn = Curve((h, 0), (0.0, float(scores.heads[i].sum())), (0.0, 1.0))
        ffn = Curve((f, 0), (0.0, float(scores.channels[i].sum())), (0.0, 1.0))
        layers.append(LayerLoss(attn, ffn, None, None, {MoePlan(8, top_k=2): moe_loss}))
    skim = {(1, 0.5): skim_loss}
    return MeasuredQuality(scores, tuple(layers), skim, dict.fromkeys(KINDS, 1.0))


def test_search_takes_moe_and_skim_only_where_passes_allow() -> None:
    _, spec = read_model(fixture_path("bert", "dynamo"))
    latency = _model(spec, attn_int8=1.0, ffn_int8=1.0)
    scores = _scores(spec)
    dense_ms = latency.predict(Plan.neutral(spec))
    target = latency.overhead_ms + 0.8 * (dense_ms - latency.overhead_ms)
    cheap_moe = _measured(spec, scores, moe_loss=1e-4, skim_loss=1.0)
    moe = search(spec, cheap_moe, latency, target, kinds=frozenset({"prune", "moe"}))
    assert any(la.moe is not None for la in moe.plan.layers)
    assert variants.predict(latency, spec, moe.plan) <= target + 1e-6
    pruned = search(spec, cheap_moe, latency, target, kinds=frozenset({"prune"}))
    assert all(la.moe is None for la in pruned.plan.layers)
    assert pruned.loss > moe.loss
    cheap_skim = _measured(spec, scores, moe_loss=1e-4, skim_loss=1e-4)
    skim = search(spec, cheap_skim, latency, target,
                  kinds=frozenset({"prune", "moe", "skim"}))
    assert skim.placement == (1, 0.5)
    assert [la.skim_keep for la in skim.plan.layers] == [None, 0.5]
    assert all(la.moe is None for la in skim.plan.layers)  # never both in one plan
    assert variants.predict(latency, spec, skim.plan) <= target + 1e-6
    no_skim = search(spec, cheap_skim, latency, target, kinds=frozenset({"prune", "moe"}))
    assert no_skim.placement is None


def test_variant_latency_counts_skimmed_tokens_and_experts() -> None:
    _, spec = read_model(fixture_path("bert", "dynamo"))
    latency = _model(spec, attn_int8=1.0, ffn_int8=1.0)
    neutral = Plan.neutral(spec)
    assert variants.predict(latency, spec, neutral) == pytest.approx(latency.predict(neutral))
    layers = list(neutral.layers)
    layers[1] = LayerPlan(heads=layers[1].heads, ffn=layers[1].ffn, skim_keep=0.5)
    assert variants.predict(latency, spec, Plan(tuple(layers))) < latency.predict(neutral)
    width = spec.layers[0].ffn.width
    assert variants.moe_ms(latency, width, spec.hidden, MoePlan(8, top_k=2)) < \
        variants.moe_ms(latency, width, spec.hidden, MoePlan(8, top_k=6))


def test_measurements_are_cached_per_model_data_and_settings(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from planer.compiler.driver.compilation import Fitting
    from planer.compiler.driver.planning import measure_quality

    monkeypatch.setenv("PLANER_CACHE_DIR", str(tmp_path))
    model, spec = read_model(fixture_path("bert", "dynamo"))
    calib = build_calibration(None, model_input_infos(model), vocab_size=spec.vocab_size,
                              seq_len=16, max_samples=16, seed=0)

    def never(plan: Plan) -> Path:
        raise AssertionError("nothing is compiled without skim")

    def measure(int8: bool, said: list[str]) -> MeasuredQuality:
        return measure_quality(model, spec, Fitting(calib), batch=1,
                               passes=frozenset({"prune"}), int8=int8, measure_plan=never,
                               progress=said.append).quality

    first_said: list[str] = []
    first = measure(True, first_said)
    assert not any("cached" in line for line in first_said)
    said: list[str] = []
    again = measure(True, said)
    assert "reusing the quality model's measurements (cached)" in said
    assert again.layers == first.layers
    other: list[str] = []
    assert measure(False, other).layers[0].int8_attn is None  # other settings, measured anew
    assert "reusing the quality model's measurements (cached)" not in other
    assert "reusing the calibration activations (cached)" in other  # the same model and data


def test_latency_search_weighs_moe_and_skim_when_passes_allow(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    import planer
    from tests.test_report_html import _word_calibration

    monkeypatch.setenv("PLANER_CACHE_DIR", str(tmp_path / "cache"))
    text, vocab = _word_calibration(tmp_path)
    try:
        result = planer.compile(fixture_path("bert-relu"), out=tmp_path / "out",
                                target_latency="70%", seq_len=32, calibration=text,
                                tokenizer=vocab, passes=("prune", "moe", "skim"))
    except planer.TargetUnreachableError as exc:  # a busy machine: the search still ran
        result = exc.result
    search_report = result.report["search"]
    assert search_report["kinds"] == ["moe", "prune", "skim"]
    assert [(s["layer"], s["keep"]) for s in search_report["skim_considered"]] == \
        [(1, 0.5), (1, 0.75)]
    for layer in search_report["layers"]:
        assert [m["top_k"] for m in layer["measured"]["moe"]] == [2, 4]
    assert len(search_report["corrections"]) >= 1  # whole plans measured for the weights


def test_cli_passes_reach_the_latency_search(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from planer.compiler.driver.cli import main
    from tests.test_latency import _fake_latency_compile

    seen = _fake_latency_compile(monkeypatch)
    code = main(["compile", str(fixture_path("bert", "dynamo")), "--target-latency", "50%",
                 "--passes", "prune,skim", "-o", str(tmp_path / "out")])
    assert code == 2  # the fake stops there
    assert seen["passes"] == frozenset({"prune", "skim"})
