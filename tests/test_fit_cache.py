"""What a second compile reads back (fit_cache, round_cache) and its phase clock (no timing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from planer.compiler.calibration import CalibrationSet, build_calibration, model_input_infos
from planer.compiler.driver import fit_cache, report, round_cache
from planer.compiler.driver.compilation import Fitting
from planer.compiler.driver.pipeline import CompileResult, compile_plan, read_model
from planer.compiler.driver.planning import activations, measure_quality
from planer.compiler.plan import LayerPlan, MoePlan, Plan
from planer.fixtures.build import fixture_path
from planer.passes.prune_fit import capture_layers


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANER_CACHE_DIR", str(tmp_path / "cache"))


def _calib(model, spec, seed: int) -> CalibrationSet:
    return build_calibration(None, model_input_infos(model), vocab_size=spec.vocab_size,
                             seq_len=16, max_samples=16, seed=seed)


def test_activations_are_read_back_exactly_and_missed_on_other_data_model_or_version(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model, spec = read_model(fixture_path("bert", "dynamo"))
    calib = _calib(model, spec, seed=0)
    said: list[str] = []
    first = activations(Fitting(calib), model, spec, said.append)
    assert said == ["capturing calibration activations"]
    said.clear()
    again = activations(Fitting(calib), model, spec, said.append)
    assert said == ["reusing the calibration activations (cached)"]
    for a, b in zip(first, again, strict=True):
        for field in ("ctx", "attn_residual", "act", "ffn_residual"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert [a.act.shape for a in again] == [a.act.shape for a in capture_layers(
        model, spec, calib.batches)]

    said.clear()  # other calibration data
    activations(Fitting(_calib(model, spec, seed=1)), model, spec, said.append)
    assert said == ["capturing calibration activations"]
    said.clear()  # another model (other weights) on the same data
    other, other_spec = read_model(fixture_path("bert-relu"))
    activations(Fitting(_calib(other, other_spec, seed=0)), other, other_spec, said.append)
    assert said == ["capturing calibration activations"]
    said.clear()  # a new capture version
    monkeypatch.setattr(fit_cache, "ACTIVATIONS_VERSION", fit_cache.ACTIVATIONS_VERSION + 1)
    activations(Fitting(calib), model, spec, said.append)
    assert said == ["capturing calibration activations"]


def test_an_unreadable_activation_cache_is_captured_again(tmp_path: Path) -> None:
    model, spec = read_model(fixture_path("bert", "dynamo"))
    calib = _calib(model, spec, seed=0)
    activations(Fitting(calib), model, spec, lambda _m: None)
    (stored,) = (tmp_path / "cache" / "activations").glob("*.npz")
    stored.write_bytes(b"not an npz")
    said: list[str] = []
    acts = activations(Fitting(calib), model, spec, said.append)
    assert said == ["capturing calibration activations"]
    assert len(acts) == len(spec.layers)


def test_whole_plan_losses_are_measured_once_per_model_data_and_plan(tmp_path: Path) -> None:
    src = fixture_path("bert", "dynamo")
    model, spec = read_model(src)
    calib = _calib(model, spec, seed=0)
    compiled: list[Plan] = []

    def measure_plan(plan: Plan) -> Path:
        compiled.append(plan)
        return compile_plan(src, tmp_path / f"plan{len(compiled)}", plan_data=plan.to_dict(),
                            seq_len=16).model_path

    def fit(int8: bool = False):
        return measure_quality(model, spec, Fitting(calib), batch=1,
                               passes=frozenset({"prune"}), int8=int8,
                               measure_plan=measure_plan, progress=lambda _m: None)

    narrow = Plan(tuple(LayerPlan(heads=la.attention.heads, ffn=la.ffn.width // 2)
                        for la in spec.layers))
    first = fit().measured_loss(narrow)
    assert compiled == [narrow] and first > 0
    assert fit().measured_loss(narrow) == first  # a second compile reads it back
    assert compiled == [narrow]
    fit().measured_loss(Plan.neutral(spec))  # another plan is measured
    assert compiled == [narrow, Plan.neutral(spec)]
    fit(int8=True).measured_loss(narrow)  # other settings: another quality cache, measured
    assert compiled == [narrow, Plan.neutral(spec), narrow]


def test_phases_nest_without_counting_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = iter([0.0, 1.0, 3.0, 7.0, 10.0, 12.0, 13.0, 20.0])
    monkeypatch.setattr(report.time, "perf_counter", lambda: next(ticks))
    clock = report.PhaseClock()  # 0
    with clock.phase("outer"), clock.phase("inner"):  # outer 1 .. 10, inner 3 .. 7
        pass
    with clock.phase("inner"):  # 12 .. 13, added to the first
        pass
    assert clock.to_dict() == {"outer": 5.0, "inner": 5.0, "other": 10.0, "total": 20.0}


def _fake_compile(calls: list[Path]):
    def compile_into(folder: Path) -> CompileResult:
        calls.append(folder)
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(b"model")
        (folder / "report.json").write_text(json.dumps({"n": len(calls)}))
        return CompileResult(folder / "model.onnx", Plan(()), {"n": len(calls)})

    return compile_into


def test_round_plans_are_compiled_once_per_key_and_copied_after(tmp_path: Path) -> None:
    calls: list[Path] = []
    plan = Plan((LayerPlan(heads=2, ffn=64),))
    key = {"model": "m", "calibration": "c", "spelling": True}
    first, cached = round_cache.compile_round(plan, tmp_path / "r0", key=key,
                                              compile_into=_fake_compile(calls))
    assert not cached and calls == [tmp_path / "r0"]
    again, cached = round_cache.compile_round(plan, tmp_path / "r1", key=key,
                                              compile_into=_fake_compile(calls))
    assert cached and len(calls) == 1
    assert again.model_path == tmp_path / "r1" / "model.onnx"
    assert again.model_path.read_bytes() == b"model" and again.report == {"n": 1}
    for other in ({**key, "calibration": "d"}, {**key, "spelling": False}):
        round_cache.compile_round(plan, tmp_path / f"o{len(calls)}", key=other,
                                  compile_into=_fake_compile(calls))
    round_cache.compile_round(Plan((LayerPlan(heads=1, ffn=64),)), tmp_path / "p", key=key,
                              compile_into=_fake_compile(calls))
    assert len(calls) == 4  # other calibration, other spelling, other plan


def test_moe_plans_are_not_kept_and_old_rounds_are_evicted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    moe = Plan((LayerPlan(heads=2, ffn=64, moe=MoePlan(8, top_k=2)),))
    for k in range(2):
        _, cached = round_cache.compile_round(moe, tmp_path / f"m{k}", key={},
                                              compile_into=_fake_compile(calls))
        assert not cached
    assert len(calls) == 2
    monkeypatch.setattr(round_cache, "ROUNDS_KEPT", 2)
    for heads in (1, 2, 3):
        round_cache.compile_round(Plan((LayerPlan(heads=heads, ffn=64),)),
                                  tmp_path / f"h{heads}", key={},
                                  compile_into=_fake_compile(calls))
    assert len(list((tmp_path / "cache" / "rounds").iterdir())) == 2


def test_old_rounds_past_the_byte_budget_are_evicted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    for heads in (1, 2, 3):
        round_cache.compile_round(Plan((LayerPlan(heads=heads, ffn=64),)),
                                  tmp_path / f"h{heads}", key={},
                                  compile_into=_fake_compile(calls))
    rounds = tmp_path / "cache" / "rounds"
    one = round_cache._size(next(rounds.iterdir()))
    monkeypatch.setattr(round_cache, "ROUNDS_BYTES", one + one // 2)  # room for one and a half
    round_cache.compile_round(Plan((LayerPlan(heads=4, ffn=64),)), tmp_path / "h4", key={},
                              compile_into=_fake_compile(calls))
    assert len(list(rounds.iterdir())) == 1  # the newest stays
