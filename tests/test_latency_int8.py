"""INT8 block variants in the profile store and the latency model (no timing assertions)."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from planer.compiler.plan import Int8Plan, LayerPlan, Plan
from planer.cost_model import profile_int8
from planer.cost_model.latency import fit_latency_model
from planer.cost_model.profile import BlockShape, Measurement, ProfileStore
from planer.cost_model.profile_int8 import int8_kind, measure_pairs, profile_int8_blocks

SHAPE = BlockShape(batch=1, tokens=8, hidden=32, head_size=8, threads=1)


def _linear(kind: str, units: range, per_unit: float) -> list[Measurement]:
    return [Measurement(kind, u, per_unit * u) for u in units]


def test_mixed_plan_reads_the_int8_curve_of_each_quantized_block() -> None:
    dense = Plan(tuple(LayerPlan(heads=4, ffn=64) for _ in range(3)))
    model = fit_latency_model(
        _linear("attn", range(1, 5), 1.0), _linear("ffn", range(16, 65, 16), 0.1), 50.0, dense,
        int8={"attn_int8_dynamic": _linear("attn_int8_dynamic", range(1, 5), 0.5),
              "ffn_int8_dynamic": _linear("ffn_int8_dynamic", range(16, 65, 16), 0.025),
              "ffn_int8_static": _linear("ffn_int8_static", range(16, 65, 16), 0.05)})
    assert model.overhead_ms == pytest.approx(50.0 - 3 * (4.0 + 6.4))
    mixed = Plan((LayerPlan(2, 64, int8=Int8Plan("attn", "dynamic")),   # 1.0 + 6.4
                  LayerPlan(4, 32, int8=Int8Plan("both", "dynamic")),   # 2.0 + 0.8
                  LayerPlan(4, 64, int8=Int8Plan("ffn", "static"))))    # 4.0 + 3.2
    assert model.predict(mixed) == pytest.approx(model.overhead_ms + 7.4 + 2.8 + 7.2)
    with pytest.raises(ValueError, match="no static INT8 attn measurements"):
        model.predict(Plan((LayerPlan(4, 64, int8=Int8Plan("attn", "static")),) * 3))


def test_int8_kinds_are_named_and_checked() -> None:
    assert int8_kind("ffn", "static") == "ffn_int8_static"
    with pytest.raises(ValueError):
        int8_kind("moe", "dynamic")


def test_pairs_time_the_block_the_quantize_pass_emits(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    sessions: dict[str, str] = {}
    real = profile_int8.make_session

    def spy(model: object, opts: object) -> object:
        if not isinstance(model, onnx.ModelProto):  # the quantized file
            ops = {n.op_type for n in onnx.load(str(model)).graph.node}
            sessions[str(model)] = ",".join(sorted(ops))
        return real(model, opts)  # type: ignore[arg-type]

    monkeypatch.setattr(profile_int8, "make_session", spy)
    got = measure_pairs("ffn", "dynamic", SHAPE, [16], repeats=2)
    assert [(m.kind, m.units) for m in got] == [("ffn", 16), ("ffn_int8_dynamic", 16)]
    assert all(m.median_ms > 0 for m in got)
    assert [ops.count("MatMulInteger") for ops in sessions.values()] == [1]
    assert "MatMul," not in next(iter(sessions.values()))  # both projections quantized


def test_store_reuses_int8_measurements(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    store = ProfileStore(1, path=tmp_path / "latency.sqlite")
    calls: list[tuple[str, str, list[int]]] = []

    def fake(kind: str, mode: str, shape: BlockShape, units: list[int],
             **_: object) -> list[Measurement]:
        calls.append((kind, mode, list(units)))
        return [m for u in units for m in (Measurement(kind, u, 2.0 * u),
                                           Measurement(int8_kind(kind, mode), u, 1.0 * u))]

    monkeypatch.setattr(profile_int8, "measure_pairs", fake)
    first = profile_int8_blocks(SHAPE, [0, 1, 2], [16], store=store)
    assert first["attn_int8_dynamic"] == [Measurement("attn_int8_dynamic", 0, 0.0),
                                          Measurement("attn_int8_dynamic", 1, 1.0),
                                          Measurement("attn_int8_dynamic", 2, 2.0)]
    assert calls == [("attn", "dynamic", [1, 2]), ("ffn", "dynamic", [16])]
    assert store.load("attn", SHAPE)[0] == Measurement("attn", 1, 2.0)  # float twin stored
    profile_int8_blocks(SHAPE, [1, 2, 3], [16], store=store, modes=("dynamic",))
    assert calls[2:] == [("attn", "dynamic", [3])]  # only the new head count
    profile_int8_blocks(SHAPE, [1], [16], store=store, modes=("static",))
    assert calls[3:] == [("attn", "static", [1]), ("ffn", "static", [16])]


def test_real_profile_fills_the_store_and_reports_progress(tmp_path: Path) -> None:
    store = ProfileStore(1, path=tmp_path / "latency.sqlite")
    lines: list[str] = []
    got = profile_int8_blocks(SHAPE, [0, 2], [16], store=store, modes=("dynamic", "static"),
                              repeats=2, progress=lines.append)
    assert sorted(got) == ["attn_int8_dynamic", "attn_int8_static", "ffn_int8_dynamic",
                           "ffn_int8_static"]
    assert all(m.median_ms > 0 for ms in got.values() for m in ms if m.units)
    assert [m.units for m in store.load("ffn_int8_static", SHAPE)] == [16]
    assert lines and "INT8 block variants" in lines[0]
