"""Tests for cost_model.timing: structure and bookkeeping, never absolute speed.

Exact checks (samples, stopping rule, round order, ratios) run on fake sessions and a
fake clock; real ONNX Runtime sessions are only checked for shape of the result and one
sanity check with a huge FLOP factor.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from planer.cost_model import timing
from planer.cost_model.timing import (
    SessionOptions,
    Timing,
    device_fingerprint,
    fingerprint_key,
    make_session,
    ratios,
    time_interleaved,
)


def matmul_model(rows: int, width: int) -> onnx.ModelProto:
    """y[rows, width] = x[rows, width] @ w[width, width]: 2*rows*width^2 FLOPs."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="MatMul")],
        f"matmul_{rows}x{width}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, width])],
        initializer=[w],
    )
    # onnx 1.23 writes IR 14 by default, newer than some ORT builds accept.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def feed(rows: int, width: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((rows, width)).astype(np.float32)}


class FakeClock:
    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


class FakeSession:
    """Advances the fake clock by `cost_ns` times the round's drift factor per run."""

    def __init__(
        self, name: str, clock: FakeClock, cost_ns: int, log: list[str], drift: list[int]
    ) -> None:
        self.name = name
        self.clock = clock
        self.cost_ns = cost_ns
        self.log = log
        self.drift = drift
        self.calls = 0

    def run(self, output_names: Any, input_feed: Mapping[str, Any]) -> list[Any]:
        self.log.append(self.name)
        factor = self.drift[self.calls % len(self.drift)]
        self.calls += 1
        self.clock.ns += self.cost_ns * factor
        return [input_feed]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(timing, "_clock_ns", fake)
    return fake


def fakes(
    clock: FakeClock, costs_ms: Mapping[str, int], drift: list[int] | None = None
) -> tuple[dict[str, FakeSession], list[str]]:
    log: list[str] = []
    sessions = {
        name: FakeSession(name, clock, ms * 1_000_000, log, drift or [1])
        for name, ms in costs_ms.items()
    }
    return sessions, log


# --- round order ---------------------------------------------------------------------


def test_round_orders_are_seeded_permutations() -> None:
    names = ["a", "b", "c", "d"]
    first = list(itertools.islice(timing._shuffled_rounds(names, seed=7), 20))
    again = list(itertools.islice(timing._shuffled_rounds(names, seed=7), 20))
    other = list(itertools.islice(timing._shuffled_rounds(names, seed=8), 20))
    assert first == again
    assert first != other
    assert all(sorted(order) == names for order in first)
    assert len(set(first)) > 1  # the order actually changes between rounds


def test_round_orders_ignore_dict_order() -> None:
    forward = itertools.islice(timing._shuffled_rounds(["a", "b", "c"], seed=3), 10)
    backward = itertools.islice(timing._shuffled_rounds(["c", "b", "a"], seed=3), 10)
    assert list(forward) == list(backward)


def test_sessions_run_in_the_seeded_order_warmup_included(clock: FakeClock) -> None:
    sessions, log = fakes(clock, {"a": 1, "b": 2, "c": 3})
    time_interleaved(sessions, {}, warmup=2, repeats=5, seed=11)
    expected = itertools.islice(timing._shuffled_rounds(list(sessions), seed=11), 7)
    assert log == [name for order in expected for name in order]


# --- time_interleaved on a fake clock ------------------------------------------------


def test_samples_are_the_clocked_run_times(clock: FakeClock) -> None:
    sessions, _ = fakes(clock, {"fast": 1, "slow": 3}, drift=[1, 2, 1, 5])
    result = time_interleaved(sessions, {}, warmup=0, repeats=4)
    assert list(result) == ["fast", "slow"]
    assert result["fast"].samples == (1.0, 2.0, 1.0, 5.0)
    assert result["slow"].samples == (3.0, 6.0, 3.0, 15.0)
    assert result["fast"].median_ms == 1.5


def test_warmup_rounds_are_not_recorded(clock: FakeClock) -> None:
    sessions, _ = fakes(clock, {"a": 1}, drift=[100, 100, 1])
    result = time_interleaved(sessions, {}, warmup=2, repeats=3)
    assert result["a"].samples == (1.0, 100.0, 100.0)
    assert sessions["a"].calls == 5


def test_min_seconds_extends_measuring(clock: FakeClock) -> None:
    # 2 ms per round, so 20 ms of measuring takes 10 rounds, more than the 3 asked for.
    sessions, _ = fakes(clock, {"a": 1, "b": 1})
    result = time_interleaved(sessions, {}, warmup=1, repeats=3, min_seconds=0.02)
    assert len(result["a"].samples) == len(result["b"].samples) == 10


def test_progress_reports_each_round(clock: FakeClock) -> None:
    sessions, _ = fakes(clock, {"a": 1})
    calls: list[tuple[int, int]] = []
    time_interleaved(sessions, {}, warmup=1, repeats=3, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_ratios_pair_rounds_so_drift_cancels(clock: FakeClock) -> None:
    # Every round is slowed by a different factor; per-round ratios stay exactly 2.
    sessions, _ = fakes(clock, {"base": 1, "double": 2}, drift=[1, 7, 3, 11, 2])
    result = time_interleaved(sessions, {}, warmup=0, repeats=5)
    assert ratios(result, "base") == {"base": 1.0, "double": 2.0}


def test_ratios_is_the_median_of_per_round_ratios_not_the_ratio_of_medians() -> None:
    base = Timing.from_samples("base", [1.0, 2.0, 3.0])
    other = Timing.from_samples("other", [3.0, 1.0, 2.0])
    # per-round ratios 3, 1/2, 2/3 -> median 2/3; the medians alone would say 2 / 2 = 1.
    assert other.median_ms / base.median_ms == 1.0
    assert ratios({"base": base, "other": other}, "base")["other"] == pytest.approx(
        2 / 3, abs=1e-12
    )


def test_ratios_reject_unpaired_timings() -> None:
    base = Timing.from_samples("base", [1.0, 2.0])
    other = Timing.from_samples("other", [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="one time_interleaved call"):
        ratios({"base": base, "other": other}, "base")
    with pytest.raises(KeyError, match="nope"):
        ratios({"base": base}, "nope")


def test_per_session_feeds_must_name_every_session(clock: FakeClock) -> None:
    sessions, _ = fakes(clock, {"a": 1, "b": 1})
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        time_interleaved(sessions, {"a": {"x": np.zeros(1)}})


def test_feeds_cannot_mix_shared_and_per_session(clock: FakeClock) -> None:
    sessions, _ = fakes(clock, {"a": 1, "b": 1})
    with pytest.raises(TypeError, match="not a mix"):
        time_interleaved(sessions, {"a": {"x": np.zeros(1)}, "x": np.zeros(1)})


def test_bad_counts_are_rejected(clock: FakeClock) -> None:
    sessions, _ = fakes(clock, {"a": 1})
    with pytest.raises(ValueError, match="repeats >= 1"):
        time_interleaved(sessions, {}, repeats=0)
    with pytest.raises(ValueError, match="no sessions"):
        time_interleaved({}, {})


# --- real ONNX Runtime sessions ------------------------------------------------------


def test_time_interleaved_with_a_shared_feed() -> None:
    model = matmul_model(4, 64)
    opts = SessionOptions()
    sessions = {"a": make_session(model, opts), "b": make_session(model, opts)}
    result = time_interleaved(sessions, feed(4, 64), warmup=1, repeats=6)
    assert list(result) == ["a", "b"]
    for name, t in result.items():
        assert t.name == name
        assert len(t.samples) == 6
        assert t.median_ms > 0
        assert t.p10_ms <= t.median_ms <= t.p90_ms
    assert ratios(result, "a")["a"] == 1.0


def test_much_bigger_matmul_is_slower() -> None:
    # A sanity check of the plumbing, not a performance assertion: the big MatMul does
    # 131072x the FLOPs (~134 MFLOP vs ~1 kFLOP). Per-run overhead (~20 us) caps the
    # measured ratio far below that (40-60x here), still far beyond any noise.
    opts = SessionOptions()
    sessions = {
        "tiny": make_session(matmul_model(8, 8), opts),
        "big": make_session(matmul_model(256, 512), opts),
    }
    feeds = {"tiny": feed(8, 8), "big": feed(256, 512)}
    result = time_interleaved(sessions, feeds, warmup=1, repeats=5)
    assert all(len(t.samples) == 5 for t in result.values())
    assert ratios(result, "tiny")["big"] > 2


def test_make_session_honors_options() -> None:
    session = make_session(matmul_model(2, 8), SessionOptions(threads=2, optimization="basic"))
    so = session.get_session_options()
    assert so.intra_op_num_threads == 2
    assert so.inter_op_num_threads == 1
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session.get_providers() == ["CPUExecutionProvider"]


def test_make_session_accepts_path_bytes_and_proto(tmp_path: Path) -> None:
    model = matmul_model(2, 8)
    path = tmp_path / "m.onnx"
    onnx.save_model(model, path)
    outputs = [
        make_session(source, SessionOptions()).run(None, feed(2, 8))[0]
        for source in (model, model.SerializeToString(), path, str(path))
    ]
    for out in outputs[1:]:
        np.testing.assert_array_equal(out, outputs[0])  # same model, same kernel: exact


def test_make_session_refuses_a_proto_with_external_data(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save_model(
        matmul_model(2, 8),
        path,
        save_as_external_data=True,
        size_threshold=0,
        location="m.onnx.data",
    )
    proto = onnx.load_model(path, load_external_data=False)
    with pytest.raises(ValueError, match="pass the path instead"):
        make_session(proto, SessionOptions())
    make_session(path, SessionOptions())  # the path resolves the external data


def test_session_options_are_validated() -> None:
    with pytest.raises(ValueError, match="threads"):
        SessionOptions(threads=0)
    with pytest.raises(ValueError, match="optimization"):
        SessionOptions(optimization="max")
    with pytest.raises(ValueError, match="not available"):
        make_session(matmul_model(2, 8), SessionOptions(provider="NoSuchExecutionProvider"))


# --- fingerprint ---------------------------------------------------------------------


def test_device_fingerprint_keys_and_stable_key() -> None:
    opts = SessionOptions(threads=2)
    fp = device_fingerprint(opts)
    assert {
        "cpu",
        "logical_cores",
        "usable_cores",
        "threads",
        "optimization",
        "provider",
        "onnxruntime",
        "onnx",
        "numpy",
        "platform",
    } <= set(fp)
    assert all(isinstance(v, str) and v for v in fp.values())
    assert fp["threads"] == "2"
    assert fp["onnxruntime"] == ort.__version__
    key = fingerprint_key(fp)
    assert len(key) == 16 and int(key, 16) >= 0
    assert fingerprint_key(device_fingerprint(opts)) == key
    assert fingerprint_key(dict(reversed(list(fp.items())))) == key
    assert fingerprint_key(device_fingerprint(SessionOptions(threads=1))) != key
