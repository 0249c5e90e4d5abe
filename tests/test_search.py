"""The latency search's knapsack, its INT8 choices and the measured INT8 quality costs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from planer.compiler.capture import ActivationReader
from planer.compiler.driver.pipeline import read_model
from planer.compiler.plan import Int8Plan, LayerPlan, Plan
from planer.cost_model.int8_cost import Int8Costs, int8_pays, measure_int8_costs
from planer.cost_model.latency import LatencyModel, fit_latency_model
from planer.cost_model.profile import Measurement
from planer.cost_model.search import (
    Quality,
    floor_plan,
    plan_for_latency,
    predicted_loss,
    solve_knapsack,
)
from planer.fixtures.build import fixture_path
from planer.passes.prune_fit import Importance, residual_of
from planer.passes.quantize import QuantizeConfig, apply_quantize
from tests.conftest import needs_vnni, text_feeds


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANER_CACHE_DIR", str(tmp_path / "cache"))


def _brute_force(options: list[list[tuple[float, float]]], budget: float) -> float | None:
    fits = [sum(o[0] for o in combo) for combo in itertools.product(*options)]
    losses = [sum(o[1] for o in combo) for combo, ms in
              zip(itertools.product(*options), fits, strict=True) if ms <= budget + 1e-9]
    return min(losses) if losses else None


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_finds_the_brute_force_optimum(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Latencies on the 0.01 ms grid, so rounding up to bins changes nothing.
    options = [[(int(rng.integers(0, 60)) / 100, float(rng.uniform(0, 1))) for _ in range(5)]
               for _ in range(4)]
    budget = float(rng.uniform(0.4, 1.6))
    best = _brute_force(options, budget)
    picks = solve_knapsack(options, budget)
    if best is None:
        assert picks is None
        return
    assert picks is not None
    assert sum(options[i][j][0] for i, j in enumerate(picks)) <= budget + 1e-9
    assert sum(options[i][j][1] for i, j in enumerate(picks)) == pytest.approx(best)


def test_knapsack_beats_greedy_where_greedy_fails() -> None:
    # Greedy by loss per ms saved takes layer 0's cheap-per-ms step and then needs a
    # costly one; the optimum drops layer 1 once.
    options = [[(1.0, 0.0), (0.6, 0.3), (0.0, 2.0)], [(1.0, 0.0), (0.0, 0.9)]]
    picks = solve_knapsack(options, 1.0)
    assert picks == [0, 1]
    assert solve_knapsack(options, -0.1) is None


def _curves(spec_heads: int, width: int, attn_int8: float, ffn_int8: float) -> dict:
    attn = [Measurement("attn", h, 0.1 + 0.1 * h) for h in range(1, spec_heads + 1)]
    ffn = [Measurement("ffn", f, 0.05 + 0.01 * f) for f in range(8, width + 1, 8)]
    int8 = {"attn_int8_dynamic": [Measurement("attn_int8_dynamic", m.units, m.median_ms * attn_int8)
                                  for m in attn],
            "ffn_int8_dynamic": [Measurement("ffn_int8_dynamic", m.units, m.median_ms * ffn_int8)
                                 for m in ffn]}
    return {"attn": attn, "ffn": ffn, "int8": int8}


def _model(spec, attn_int8: float, ffn_int8: float) -> LatencyModel:
    c = _curves(spec.layers[0].attention.heads, spec.layers[0].ffn.width, attn_int8, ffn_int8)
    return fit_latency_model(c["attn"], c["ffn"], 4.0, Plan.neutral(spec), int8=c["int8"])


def _scores(spec, per_unit: float = 0.01) -> Importance:
    return Importance(heads=[np.full(la.attention.heads, per_unit * 4) for la in spec.layers],
                      channels=[np.full(la.ffn.width, per_unit) for la in spec.layers])


def test_search_quantizes_where_int8_is_fast_and_cheap() -> None:
    _, spec = read_model(fixture_path("bert", "dynamo"))
    model = _model(spec, attn_int8=0.6, ffn_int8=0.4)
    quality = Quality(_scores(spec), Int8Costs(attn=(1e-4, 1e-4), ffn=(1e-4, 1e-4)))
    assert int8_pays(model, spec)
    target = model.predict(Plan.neutral(spec)) * 0.7
    plan = plan_for_latency(spec, quality, model, target)
    assert model.predict(plan) <= target
    assert all(la.int8 is not None and "ffn" in la.int8.kinds() for la in plan.layers)
    # Cheap INT8 instead of pruning: the loss is far below pruning alone's.
    pruned_only = plan_for_latency(spec, _scores(spec), model, target)
    assert all(la.int8 is None for la in pruned_only.layers)
    assert predicted_loss(spec, quality, plan) < predicted_loss(spec, quality, pruned_only)


def test_search_keeps_float_where_int8_does_not_pay_or_costs_too_much() -> None:
    _, spec = read_model(fixture_path("bert", "dynamo"))
    slow = _model(spec, attn_int8=1.1, ffn_int8=1.2)
    cheap_costs = Quality(_scores(spec), Int8Costs(attn=(1e-4, 1e-4), ffn=(1e-4, 1e-4)))
    assert not int8_pays(slow, spec)
    target = slow.predict(Plan.neutral(spec)) * 0.7
    plan = plan_for_latency(spec, cheap_costs, slow, target)
    assert all(la.int8 is None for la in plan.layers)
    assert slow.predict(plan) <= target
    fast = _model(spec, attn_int8=0.6, ffn_int8=0.4)
    costly = Quality(_scores(spec), Int8Costs(attn=(50.0, 50.0), ffn=(50.0, 50.0)))
    plan = plan_for_latency(spec, costly, fast, fast.predict(Plan.neutral(spec)) * 0.7)
    assert all(la.int8 is None for la in plan.layers)


def test_passes_without_prune_keep_every_unit() -> None:
    _, spec = read_model(fixture_path("bert", "dynamo"))
    model = _model(spec, attn_int8=0.6, ffn_int8=0.4)
    quality = Quality(_scores(spec), Int8Costs(attn=(1e-4, 1e-4), ffn=(1e-4, 1e-4)))
    target = model.predict(Plan.neutral(spec)) * 0.8
    plan = plan_for_latency(spec, quality, model, target, kinds=frozenset({"moe", "int8"}))
    neutral = Plan.neutral(spec)
    assert [(la.heads, la.ffn) for la in plan.layers] == \
        [(la.heads, la.ffn) for la in neutral.layers]
    assert any(la.int8 is not None for la in plan.layers)  # INT8 alone meets it
    assert model.predict(plan) <= target


def test_search_takes_int8_only_where_passes_name_it() -> None:
    _, spec = read_model(fixture_path("bert", "dynamo"))
    model = _model(spec, attn_int8=0.6, ffn_int8=0.4)
    quality = Quality(_scores(spec), Int8Costs(attn=(1e-4, 1e-4), ffn=(1e-4, 1e-4)))
    target = model.predict(Plan.neutral(spec)) * 0.7
    with_int8 = plan_for_latency(spec, quality, model, target,
                                 kinds=frozenset({"prune", "int8"}))
    assert any(la.int8 is not None for la in with_int8.layers)  # cheap and fast: taken
    prune_only = plan_for_latency(spec, quality, model, target, kinds=frozenset({"prune"}))
    assert all(la.int8 is None for la in prune_only.layers)
    assert model.predict(prune_only) <= target


def test_unreachable_budget_gives_the_floor() -> None:
    _, spec = read_model(fixture_path("bert", "dynamo"))
    model = _model(spec, attn_int8=0.6, ffn_int8=0.4)
    assert plan_for_latency(spec, _scores(spec), model, 0.0) == floor_plan(spec)


@needs_vnni
def test_int8_costs_match_ort_quantizing_one_block() -> None:
    """The numpy replay predicts the block output ORT's quantized model computes."""
    src = fixture_path("bert", "dynamo")
    model, spec = read_model(src)
    feeds = [text_feeds(batch=1, seq_len=16, vocab=spec.vocab_size or 100, seed=s, pad_last=0)
             for s in range(3)]
    costs = measure_int8_costs(model, spec, feeds, batch=1)
    assert all(c > 0 for c in (*costs.attn, *costs.ffn))
    for blocks in ("attn", "ffn"):
        fresh, fresh_spec = read_model(src)
        block = getattr(fresh_spec.layers[1], "attention" if blocks == "attn" else "ffn")
        residual = residual_of(block.out, block.x)
        names = str(block.out.name), str(residual.name)
        before = ActivationReader(fresh, [block.out, residual])
        apply_quantize(fresh, fresh_spec, QuantizeConfig({1: Int8Plan(blocks, "dynamic")}))
        out = {v.name: v for node in fresh.graph for v in node.outputs}[names[0]]
        after = ActivationReader(fresh, [out])
        delta = energy = 0.0
        for feed in feeds:
            a, b = before.run(feed), after.run(feed)
            delta += float(np.sum((b[names[0]] - a[names[0]]).astype(np.float64) ** 2))
            energy += float(np.sum(a[names[1]].astype(np.float64) ** 2))
        assert getattr(costs, blocks)[1] == pytest.approx(delta / energy, rel=0.05)


@pytest.mark.parametrize(("passes", "int8"), [
    (frozenset({"prune", "int8"}), True),
    (frozenset({"prune"}), False),  # prune-only: no INT8 block, no INT8 cost measured
])
def test_target_latency_compiles_an_int8_plan_end_to_end_only_with_int8_in_passes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, passes: frozenset[str],
        int8: bool) -> None:
    from planer.compiler.driver import latency as loop
    from planer.compiler.driver import planning

    measured = planning.measure_quality
    asked: list[bool] = []

    def spy(*args, **kwargs):
        asked.append(kwargs["int8"])
        return measured(*args, **kwargs)

    monkeypatch.setattr(planning, "measure_quality", spy)
    src = fixture_path("bert", "dynamo")
    _, spec = read_model(src)
    model = _model(spec, attn_int8=0.6, ffn_int8=0.3)
    monkeypatch.setattr(loop, "profile_model", lambda *a, **k: (model, {
        "dense_ms": 4.0, "overhead_ms": model.overhead_ms, "device": "fake"}))

    def as_predicted(dense, compiled_path, **kwargs):
        plan = Plan(tuple(LayerPlan(**{**la, "int8": Int8Plan(**la["int8"]) if "int8" in la
                                       else None})
                          for la in json.loads((compiled_path.parent / "plan.json")
                                               .read_text())["layers"]))
        return model.predict(plan) / 4.0, {}

    monkeypatch.setattr(loop, "measure_ratio", as_predicted)
    result = loop.compile_to_latency(src, tmp_path / "out", target_fraction=0.8,
                                     calibration=None, tokenizer=None, batch=1, seq_len=16,
                                     threads=1, max_rounds=1, passes=passes)
    report = result.report
    assert report["target_met"] is True
    assert asked == [int8]  # INT8 costs measured only when the search may use them
    assert any("int8" in la for la in report["plan"]["layers"]) is int8
    assert bool(report.get("int8")) is int8, "the Int8 stage ran against --passes"
    assert (tmp_path / "out" / "model.onnx").exists()
