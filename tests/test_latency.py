"""Latency model, profile store and the latency-target search (no timing assertions)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from planer.compiler.driver.anchors import anchor_plans
from planer.compiler.driver.cli import main
from planer.compiler.driver.latency import random_plan
from planer.compiler.driver.pipeline import read_model
from planer.compiler.errors import BadInputError
from planer.compiler.plan import LayerPlan, Plan, parse_plan
from planer.cost_model import profile as profile_mod
from planer.cost_model.latency import BlockCurve, anchor, fit_latency_model, held_out_error
from planer.cost_model.profile import BlockShape, Measurement, ProfileStore, profile_blocks
from planer.cost_model.search import floor_plan, plan_for_latency, predicted_loss
from planer.fixtures.build import fixture_path
from planer.passes.prune_fit import Importance


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANER_CACHE_DIR", str(tmp_path / "cache"))


def _linear(kind: str, units: range, per_unit: float, base: float) -> list[Measurement]:
    return [Measurement(kind, u, base + per_unit * u) for u in units]


def test_curve_interpolates_and_drops_to_zero() -> None:
    curve = BlockCurve.fit(_linear("ffn", range(16, 129, 16), 0.01, 0.2))
    assert curve(0) == 0.0
    assert curve(64) == pytest.approx(0.84)
    assert curve(40) == pytest.approx(0.6)  # between measured points
    assert curve(8) == pytest.approx(0.18)  # between the implicit (0, 0) and the first point


def test_held_out_error_is_zero_on_a_linear_curve_and_positive_on_a_kink() -> None:
    assert held_out_error(_linear("attn", range(1, 13), 0.1, 0.3)) == pytest.approx(0.0)
    kinked = [Measurement("attn", u, 1.0 if u % 2 else 2.0) for u in range(1, 13)]
    assert held_out_error(kinked) > 0.3


def test_overhead_makes_the_dense_prediction_exact() -> None:
    dense = Plan(tuple(LayerPlan(heads=4, ffn=128) for _ in range(2)))
    model = fit_latency_model(_linear("attn", range(1, 5), 0.1, 0.1),
                              _linear("ffn", range(16, 129, 16), 0.01, 0.0), 5.0, dense)
    assert model.predict(dense) == pytest.approx(5.0)
    assert model.predict(floor_plan_like(dense)) == pytest.approx(model.overhead_ms)


def floor_plan_like(plan: Plan) -> Plan:
    return Plan(tuple(LayerPlan(heads=0, ffn=0) for _ in plan.layers))


def test_search_meets_the_predicted_budget_and_prefers_cheap_units() -> None:
    _, spec = read_model(fixture_path("bert", "dynamo"))
    dense = Plan.neutral(spec)
    model = fit_latency_model(_linear("attn", range(1, 5), 0.1, 0.1),
                              _linear("ffn", range(8, 129, 8), 0.01, 0.05), 3.0, dense)
    scores = Importance(heads=[[1.0, 2.0, 3.0, 4.0], [9.0, 9.0, 9.0, 9.0]],
                        channels=[[1.0] * 128, [50.0] * 128])
    scores = Importance(heads=[np.asarray(h) for h in scores.heads],
                        channels=[np.asarray(c) for c in scores.channels])
    plan = plan_for_latency(spec, scores, model, 2.0)
    assert model.predict(plan) <= 2.0
    assert plan.layers[1].ffn > plan.layers[0].ffn  # layer 1's channels cost 50x more
    assert predicted_loss(spec, scores, plan) > 0
    assert predicted_loss(spec, scores, dense) == 0
    assert floor_plan(spec).layers[0] == LayerPlan(heads=0, ffn=0)


def test_profile_store_reuses_measurements(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    calls: list[tuple[str, tuple[int, ...]]] = []

    def fake_measure(kind, shape, units, *, repeats, progress):
        calls.append((kind, tuple(units)))
        return [Measurement(kind, u, 0.01 * u) for u in units]

    monkeypatch.setattr(profile_mod, "_measure", fake_measure)
    shape = BlockShape(batch=1, tokens=8, hidden=64, head_size=16, threads=1)
    store = ProfileStore(1, tmp_path / "p.sqlite")
    first = profile_blocks(shape, [0, 1, 2], [0, 64, 128], store=store)
    again = profile_blocks(shape, [0, 1, 2], [0, 64, 128], store=ProfileStore(1, store.path))
    assert first == again
    assert calls == [("attn", (1, 2)), ("ffn", (64, 128))]  # the second run measured nothing
    profile_blocks(shape, [1], [64], store=store, refresh=True)
    assert calls[-2:] == [("attn", (1,)), ("ffn", (64,))]


def test_block_models_run_and_shrink_with_units() -> None:
    import onnx

    shape = BlockShape(batch=1, tokens=8, hidden=64, head_size=16, threads=1)
    for build, units in ((profile_mod.attention_block, 3), (profile_mod.ffn_block, 32)):
        model = build(shape, units)
        onnx.checker.check_model(model, full_check=True)


def test_unreachable_target_exits_3_and_writes_the_fastest_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(f"w{i % 7} w{i % 5} w{i % 3}" for i in range(40)))
    vocab = tmp_path / "tok"
    vocab.mkdir()
    (vocab / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] +
                                               [f"w{i}" for i in range(8)]) + "\n")
    out = tmp_path / "out"
    code = main(["compile", str(fixture_path("bert", "dynamo")), "--target-latency", "0.001ms",
                 "--seq-len", "16", "--calibration", str(calib), "--tokenizer", str(vocab),
                 "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "out of reach" in err and "fastest model found" in err
    assert (out / "fastest-missed-target.onnx").exists()
    assert not (out / "model.onnx").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["target_met"] is False
    assert report["plan"] == floor_plan(read_model(fixture_path("bert", "dynamo"))[1]).to_dict()
    for key in ("target_ms", "baseline_ms", "measured_ms", "speedup", "predicted_ms"):
        assert key in report


def test_search_tightens_without_collapsing_to_the_floor(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from planer.compiler.driver import latency as loop

    src = fixture_path("bert", "dynamo")
    _, spec = read_model(src)
    model = fit_latency_model(_linear("attn", range(1, 5), 0.1, 0.1),
                              _linear("ffn", range(8, 129, 8), 0.01, 0.05), 4.0,
                              Plan.neutral(spec))
    monkeypatch.setattr(loop, "profile_model", lambda *a, **k: (model, {
        "dense_ms": 4.0, "overhead_ms": model.overhead_ms, "device": "fake"}))
    compiled: list[Plan] = []

    def slower_than_predicted(dense, compiled_path, **kwargs):
        plan = Plan(tuple(LayerPlan(**la) for la in json.loads(
            (compiled_path.parent / "plan.json").read_text())["layers"]))
        compiled.append(plan)
        return model.predict(plan) * 1.05 / 4.0, {}

    monkeypatch.setattr(loop, "measure_ratio", slower_than_predicted)
    calib = tmp_path / "c.txt"
    calib.write_text("\n".join(f"w{i % 5} w{i % 3}" for i in range(30)))
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "w0", "w1",
                                              "w2", "w3", "w4"]) + "\n")
    result = loop.compile_to_latency(src, tmp_path / "out", target_fraction=0.7,
                                     calibration=calib, tokenizer=tok, batch=1, seq_len=16,
                                     threads=1)
    assert result.report["target_met"] is True
    assert result.report["measured_ms"] <= 0.7 * 4.0
    assert len(compiled) >= 2  # the first plan missed by 5% and was tightened
    assert all(plan != floor_plan(spec) for plan in compiled)
    phases = result.report["phases"]  # where the compile's time went, by phase
    assert {"calibration", "activations", "quality_model", "rounds_compile",
            "rounds_measure", "other", "total"} <= set(phases)
    assert sum(v for k, v in phases.items() if k != "total") == pytest.approx(
        phases["total"], abs=0.05)


def _stored_and_true(dense: Plan):
    """A stored model, and the 'true' machine now: every curve slower by its own factor."""
    int8 = {"attn_int8_dynamic": _linear("attn_int8_dynamic", range(1, 5), 0.05, 0.05),
            "ffn_int8_dynamic": _linear("ffn_int8_dynamic", range(8, 129, 8), 0.004, 0.02)}
    attn, ffn = _linear("attn", range(1, 5), 0.1, 0.1), _linear("ffn", range(8, 129, 8), 0.01, 0.05)
    stored = fit_latency_model(attn, ffn, 4.0, dense, int8=int8)
    factors = {"attn": 1.7, "ffn": 1.4, "attn_int8_dynamic": 2.0, "ffn_int8_dynamic": 1.2}

    def slower(points: list[Measurement]) -> list[Measurement]:
        return [Measurement(m.kind, m.units, m.median_ms * factors[m.kind]) for m in points]

    true = dataclasses.replace(
        fit_latency_model(slower(attn), slower(ffn), 4.0, dense,
                          int8={k: slower(v) for k, v in int8.items()}), overhead_ms=0.9)
    return stored, true


def test_anchoring_recovers_todays_speed_from_whole_anchor_plans() -> None:
    _, spec = read_model(fixture_path("bert", "dynamo"))
    int8 = {"attn_int8_dynamic": [], "ffn_int8_dynamic": []}
    plans = anchor_plans(spec, int8)
    assert sorted(plans) == ["fewer_heads", "int8_fewer_heads", "int8_narrower", "int8_neutral",
                             "narrower", "neutral"]
    assert plans["neutral"] == Plan.neutral(spec)
    stored, true = _stored_and_true(plans["neutral"])
    anchored = anchor(stored, [(p, true.predict(p)) for p in plans.values()])
    assert anchored.scales == pytest.approx({"attn": 1.7, "ffn": 1.4, "attn_int8_dynamic": 2.0,
                                             "ffn_int8_dynamic": 1.2})
    assert anchored.overhead_ms == pytest.approx(0.9)
    rng = np.random.default_rng(0)
    for _ in range(5):  # plans no anchor saw, mixing pruning and INT8 per layer
        plan = random_plan(spec, rng)
        assert anchored.predict(plan) == pytest.approx(true.predict(plan))
        assert stored.predict(plan) != pytest.approx(true.predict(plan))


def test_anchoring_keeps_the_stored_model_when_anchors_are_noise() -> None:
    _, spec = read_model(fixture_path("bert", "dynamo"))
    stored, _ = _stored_and_true(Plan.neutral(spec))
    plans = anchor_plans(spec, {})
    assert sorted(plans) == ["fewer_heads", "narrower", "neutral"]
    # Smaller plans measured slower than the full one: no physical fit.
    noise = [(plans["neutral"], 2.0), (plans["fewer_heads"], 3.0), (plans["narrower"], 3.0)]
    assert anchor(stored, noise) is stored
    # An overhead extrapolated below 0 is refitted at 0, keeping the scales.
    below = [(p, stored.blocks_ms(p) - 0.05) for p in plans.values()]
    clamped = anchor(stored, below)
    assert clamped.overhead_ms == 0.0 and set(clamped.scales) == {"attn", "ffn"}


def test_random_validation_plans_fit_the_model() -> None:
    _, spec = read_model(fixture_path("bert", "dynamo"))
    rng = np.random.default_rng(1)
    plans = [random_plan(spec, rng) for _ in range(20)]
    assert any(la.int8 is not None for p in plans for la in p.layers)
    for plan in plans:
        assert parse_plan(plan.to_dict(), spec) == plan  # a plan compile accepts as written


def _fake_latency_compile(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    from planer.compiler.driver import latency as loop

    seen: dict[str, object] = {}

    def fake(model_path, out_dir, **kwargs):
        seen.update(kwargs)
        raise BadInputError("stopped by the test.")

    monkeypatch.setattr(loop, "compile_to_latency", fake)
    return seen


def test_target_throughput_is_a_per_batch_latency(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    seen = _fake_latency_compile(monkeypatch)
    model = str(fixture_path("bert", "dynamo"))
    code = main(["compile", model, "--target-throughput", "400/s", "--batch", "8",
                 "-o", str(tmp_path / "out")])
    assert code == 2 and "stopped by the test" in capsys.readouterr().err
    assert seen["target_ms"] == pytest.approx(20.0)  # 8 inputs per batch at 400/s
    assert seen["batch"] == 8 and seen["target_fraction"] is None


@pytest.mark.parametrize(("extra", "message"), [
    (["--batch", "4"], "needs --batch 8 or more"),
    (["--batch", "8", "--target-latency", "50%"], "one of --target-latency or"),
])
def test_target_throughput_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str], extra: list[str],
                                    message: str) -> None:
    seen = _fake_latency_compile(monkeypatch)
    code = main(["compile", str(fixture_path("bert", "dynamo")), "--target-throughput", "100",
                 *extra, "-o", str(tmp_path / "out")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not seen  # refused before any compile


@pytest.mark.parametrize(("given", "passes"), [
    ([], {"prune", "int8"}),  # the default weighs INT8
    (["--passes", "prune"], {"prune"}),  # prune-only: the search leaves INT8 out
])
def test_passes_name_int8_for_the_latency_search(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 given: list[str], passes: set[str]) -> None:
    seen = _fake_latency_compile(monkeypatch)
    code = main(["compile", str(fixture_path("bert", "dynamo")), "--target-latency", "50%",
                 *given, "-o", str(tmp_path / "out")])
    assert code == 2  # the fake stops there
    assert seen["passes"] == frozenset(passes)


def test_int8_alone_cannot_meet_a_flops_target(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["compile", str(fixture_path("bert", "dynamo")), "--target-flops", "0.5",
                 "--passes", "int8", "-o", str(tmp_path / "out")])
    assert code == 2
    assert "INT8 does not change FLOPs" in capsys.readouterr().err


def test_anchor_models_are_compiled_once_per_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from planer.compiler import emit
    from planer.compiler.driver import anchors as anchors_mod
    from planer.cost_model.kernels import KernelTimings

    compiled: list[dict] = []
    real = anchors_mod.compile_plan

    def spy(model_path, out_dir, **kwargs):
        compiled.append(kwargs["plan_data"])
        return real(model_path, out_dir, **kwargs)

    monkeypatch.setattr(anchors_mod, "compile_plan", spy)
    src = fixture_path("bert", "dynamo")
    _, spec = read_model(src)
    plans = anchor_plans(spec, {})

    def run() -> dict[str, Path]:
        return anchors_mod.compile_anchors(src, plans, hidden=spec.hidden, batch=1, seq_len=8,
                                           threads=1, ort_kernels="off",
                                           kernels=KernelTimings())

    first = run()
    assert len(compiled) == 3 and all(path.exists() for path in first.values())
    assert run() == first and len(compiled) == 3  # cached: nothing compiled again
    monkeypatch.setattr(emit, "EMISSION_VERSION", emit.EMISSION_VERSION + 1)
    assert run() != first and len(compiled) == 6  # another emission compiles afresh


def test_profile_report_scores_whole_mixed_plans(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from planer.compiler.driver import latency as loop

    real = loop.validate_latency_model
    monkeypatch.setattr(loop, "validate_latency_model",
                        lambda *a, **k: real(*a, **{**k, "samples": 2, "repeats": 2}))
    code = main(["profile", str(fixture_path("bert", "dynamo")), "--seq-len", "8", "--report"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "held-out MAPE on 2 whole compiled models (latency ratios to the original)" in printed
    assert printed.count("predicted ") == 2 and "measured " in printed


def test_next_budget_steps_between_a_plan_that_missed_and_one_too_fast() -> None:
    from planer.compiler.driver.latency import CLOSE_ENOUGH, Round, next_budget

    def measured(budget: float, predicted: float, ms: float) -> Round:
        return Round(budget, predicted, ms, Plan(()), Path("."), None, {})  # type: ignore[arg-type]

    missed = measured(41.7, 41.66, 45.4)
    assert next_budget([missed], 41.7) == pytest.approx(41.7 * 41.7 / 45.4)  # last round alone
    fast = measured(38.3, 38.1, 38.3)
    # From the fast round alone the budget would climb back to 41.6, next to the plan that
    # missed; between the two it aims at the middle of the window a round stops in.
    aim = (1 + CLOSE_ENOUGH) / 2 * 41.7
    between = next_budget([missed, fast], 41.7)
    assert 38.1 < between < 41.66
    assert between == pytest.approx(38.1 + (aim - 38.3) / (45.4 - 38.3) * (41.66 - 38.1))
    floor = measured(0.0, 30.0, 20.0)  # the floor far under the target: come back up
    assert next_budget([floor], 41.7) == pytest.approx(30.0 * 41.7 / 20.0)


def test_a_second_compile_copies_its_rounds_and_reads_its_quality_fit_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from planer.compiler.driver import latency as loop

    src = fixture_path("bert", "dynamo")
    _, spec = read_model(src)
    model = fit_latency_model(_linear("attn", range(1, 5), 0.1, 0.1),
                              _linear("ffn", range(8, 129, 8), 0.01, 0.05), 4.0,
                              Plan.neutral(spec))
    monkeypatch.setattr(loop, "profile_model", lambda *a, **k: (model, {
        "dense_ms": 4.0, "overhead_ms": model.overhead_ms, "device": "fake"}))
    monkeypatch.setattr(loop, "measure_ratio", lambda dense, path, **kw: (0.9, {}))
    calib = tmp_path / "c.txt"
    calib.write_text("\n".join(f"w{i % 5} w{i % 3}" for i in range(30)))
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "w0", "w1",
                                              "w2", "w3", "w4"]) + "\n")
    compiles: list[Path] = []
    real_compile = loop.compile_plan

    def counted(model_path: Path, out_dir: Path, **kwargs):
        compiles.append(out_dir)
        return real_compile(model_path, out_dir, **kwargs)

    monkeypatch.setattr(loop, "compile_plan", counted)

    def compile_once(out: str, fraction: float = 0.93) -> dict:
        return loop.compile_to_latency(src, tmp_path / out, target_fraction=fraction,
                                       calibration=calib, tokenizer=tok, batch=1,
                                       seq_len=16, threads=1).report

    first = compile_once("a")
    assert compiles and "quality_plans_compile" in first["phases"]
    compiles.clear()
    second = compile_once("b")
    assert compiles == []  # every plan was compiled by the first
    assert [r["compiled_before"] for r in second["rounds"]] == [True] * len(second["rounds"])
    assert second["plan"] == first["plan"]
    assert second["search"]["corrections"] == first["search"]["corrections"]
    assert json.loads((tmp_path / "b" / "plan.json").read_text()) == first["plan"]
    # A target 2% lower (the dense timing moved): the plans measured for the quality
    # model's weights are near enough to stand in, so none is compiled for it.
    moved = compile_once("c", fraction=0.93 * 0.98)
    assert "quality_plans_compile" not in moved["phases"]
    assert [c["plan"] for c in moved["search"]["corrections"]] == \
        [c["plan"] for c in first["search"]["corrections"]]


def test_anchor_timing_stops_early_only_when_every_ratio_is_settled(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from planer.compiler.driver import anchors
    from planer.cost_model.timing import Timing

    rng = np.random.default_rng(0)
    noise = {"dense": 0.0, "steady": 0.001, "jumpy": 0.0}

    def fake_timing(sessions, feeds, *, warmup, repeats, seed):
        dense = 10 + 5 * rng.random(repeats)  # the machine's speed drifts: ratios divide it out

        def samples(name: str) -> list[float]:
            if name == "dense":
                return list(dense)
            return list(dense * (0.5 + noise[name] * rng.standard_normal(repeats)))

        return {name: Timing.from_samples(name, samples(name)) for name in sessions}

    monkeypatch.setattr(anchors, "open_sessions", lambda models, **kw: (dict(models), {}))
    monkeypatch.setattr(anchors, "time_interleaved", fake_timing)
    models = {"dense": Path("d"), "steady": Path("s")}
    settled = anchors.time_anchors(models, batch=1, seq_len=8, threads=1, vocab=None)
    assert len(settled["dense"].samples) == anchors.ANCHOR_ROUNDS[0]
    noise["jumpy"] = 0.2
    jumpy = anchors.time_anchors({**models, "jumpy": Path("j")}, batch=1, seq_len=8,
                                 threads=1, vocab=None)
    assert len(jumpy["dense"].samples) == anchors.ANCHOR_ROUNDS[1]
    assert anchors.ratio_spread(jumpy, "dense") > anchors.ANCHOR_SPREAD
    assert anchors.ratio_spread(settled, "dense") < anchors.ANCHOR_SPREAD
