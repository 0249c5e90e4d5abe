"""Where measurements are kept: per compile (kernel timings) and per emission (latency store).

No timing is asserted: the measuring functions are replaced by counters, so these tests
check only when planer measures again and when it reuses a stored number.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from planer.compiler import emit
from planer.cost_model import kernels, profile
from planer.cost_model.kernels import KernelChoice, KernelTimings, MoeLoweringChoice
from planer.cost_model.profile import BlockShape, Measurement, ProfileStore, profile_blocks
from planer.cost_model.timing import SessionOptions, device_fingerprint, fingerprint_key

SHAPE = BlockShape(batch=1, tokens=16, hidden=64, head_size=16, threads=1)


def test_kernel_timings_are_kept_per_object_not_per_process(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []

    def skip(width: int, tokens: int, threads: int, *, repeats: int) -> KernelChoice:
        calls.append(("skip", width, tokens, threads))
        return KernelChoice(fused_us=2.0, unfused_us=1.0)

    def moe(*args: object, repeats: int) -> MoeLoweringChoice:
        calls.append(("moe", *args))
        return MoeLoweringChoice(dense_us=3.0, gather_us=2.0, kernel_us=1.0)

    monkeypatch.setattr(kernels, "skip_layernorm_costs", skip)
    monkeypatch.setattr(kernels, "moe_lowering_costs", moe)
    timings = KernelTimings()
    assert timings.skip_layernorm(64, 16, 1).unfuse
    assert timings.skip_layernorm(64, 16, 1) is timings.skip_layernorm(64, 16, 1)
    timings.skip_layernorm(64, 32, 1)  # another shape is measured
    assert timings.moe_lowering(64, 128, 4, 2, "relu", 16, 1).lowering == "kernel"
    timings.moe_lowering(64, 128, 4, 2, "relu", 16, 1)
    assert [c[0] for c in calls] == ["skip", "skip", "moe"]
    KernelTimings().skip_layernorm(64, 16, 1)  # a fresh object asks for fresh timings
    assert len(calls) == 4


def _count_measurements(monkeypatch: pytest.MonkeyPatch) -> list[Sequence[int]]:
    measured: list[Sequence[int]] = []

    def fake(kind: str, shape: BlockShape, units: Sequence[int], **_: object) -> list:
        measured.append(tuple(units))
        return [Measurement(kind, u, 0.1 * u) for u in units]

    monkeypatch.setattr(profile, "_measure", fake)
    return measured


def test_a_new_emission_version_measures_again(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    measured = _count_measurements(monkeypatch)
    path = tmp_path / "latency.sqlite"
    first = profile_blocks(SHAPE, [1, 2], [32], store=ProfileStore(1, path))
    assert measured == [(1, 2), (32,)]
    again = profile_blocks(SHAPE, [1, 2], [32], store=ProfileStore(1, path))
    assert again == first and len(measured) == 2  # same emission: stored rows reused
    monkeypatch.setattr(emit, "EMISSION_VERSION", emit.EMISSION_VERSION + 1)
    assert ProfileStore(1, path).load("attn", SHAPE) == []
    profile_blocks(SHAPE, [1, 2], [32], store=ProfileStore(1, path))
    assert measured[2:] == [(1, 2), (32,)]  # rows of the old emission were not reused


def test_a_store_written_without_emission_versions_is_not_trusted(tmp_path: Path) -> None:
    path = tmp_path / "latency.sqlite"
    device = fingerprint_key(device_fingerprint(SessionOptions(threads=1)))
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE measurement (device TEXT, kind TEXT, batch INTEGER, "
                "tokens INTEGER, hidden INTEGER, head_size INTEGER, units INTEGER, "
                "threads INTEGER, median_ms REAL, created REAL)")
    old.execute("INSERT INTO measurement VALUES (?,?,?,?,?,?,?,?,?,?)",
                (device, "attn", 1, 16, 64, 16, 2, 1, 9.9, 0.0))
    old.commit()
    old.close()
    store = ProfileStore(1, path)
    assert store.device == device
    assert store.load("attn", SHAPE) == []
    store.save(SHAPE, [Measurement("attn", 2, 1.5)])
    assert store.load("attn", SHAPE) == [Measurement("attn", 2, 1.5)]


def test_a_new_emission_version_measures_int8_variants_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from planer.cost_model import profile_int8

    measured: list[tuple[str, tuple[int, ...]]] = []

    def fake(kind: str, mode: str, shape: BlockShape, units: Sequence[int],
             **_: object) -> list[Measurement]:
        measured.append((kind, tuple(units)))
        return [m for u in units for m in (Measurement(kind, u, 2.0 * u),
                                           Measurement(profile_int8.int8_kind(kind, mode), u, u))]

    monkeypatch.setattr(profile_int8, "measure_pairs", fake)
    path = tmp_path / "latency.sqlite"
    profile_int8.profile_int8_blocks(SHAPE, [1, 2], [32], store=ProfileStore(1, path))
    profile_int8.profile_int8_blocks(SHAPE, [1, 2], [32], store=ProfileStore(1, path))
    assert measured == [("attn", (1, 2)), ("ffn", (32,))]  # same emission: reused
    monkeypatch.setattr(emit, "EMISSION_VERSION", emit.EMISSION_VERSION + 1)
    profile_int8.profile_int8_blocks(SHAPE, [1, 2], [32], store=ProfileStore(1, path))
    assert measured[2:] == [("attn", (1, 2)), ("ffn", (32,))]
