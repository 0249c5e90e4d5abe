"""Measures ONNX Runtime latency of several models fairly, as interleaved rounds.

The machines planer runs on are small and shared (2 cores here), so absolute times
drift by tens of percent between minutes. Planer therefore measures speed only as
ratios of runs interleaved in one process:

    round r:  shuffle(names, seed) ─ run each session once ─ record one sample each
    ratio:    median over r of  samples[name][r] / samples[baseline][r]

Each round runs every session once, in a seeded shuffled order, so slow periods (a
neighbour's job, frequency scaling) hit all sessions alike and cancel in the per-round
ratio; the shuffle keeps a fixed position in the round (e.g. "always right after the
big model") from biasing one session. Only `session.run` is inside the clock.

Never assert on these numbers in unit tests; they belong in benchmarks and reports,
tagged with `device_fingerprint` so numbers from different machines are not mixed.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import os
import platform
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import onnx
import onnxruntime as ort

logger = logging.getLogger(__name__)

# Protobuf refuses to serialize a message of 2 GiB or more.
_PROTOBUF_LIMIT = 2**31 - 1

_OPTIMIZATION_LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

# A module attribute rather than a direct call so tests can drive a fake clock and check
# samples, stopping rules and ratios exactly instead of asserting on real time.
_clock_ns: Callable[[], int] = time.perf_counter_ns


@dataclasses.dataclass(frozen=True)
class SessionOptions:
    """Describes how a session is built, and so which numbers are comparable.

    Attributes:
        threads: ONNX Runtime intra-op threads (>= 1; 0 would let ORT pick, making
            numbers depend on the machine silently).
        optimization: Graph optimization level: "disabled", "basic", "extended", "all".
        provider: Execution provider, e.g. "CPUExecutionProvider".
        allow_spinning: Whether idle intra-op workers busy-wait for work. Off by
            default: with interleaved sessions, one session's spinning workers would
            burn the cores the next session in the round needs. Irrelevant with one
            thread (ORT then runs on the calling thread only).
    """

    threads: int = 1
    optimization: str = "all"
    provider: str = "CPUExecutionProvider"
    allow_spinning: bool = False

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if self.optimization not in _OPTIMIZATION_LEVELS:
            raise ValueError(
                f"optimization must be one of {sorted(_OPTIMIZATION_LEVELS)}, "
                f"got {self.optimization!r}"
            )


@dataclasses.dataclass(frozen=True)
class Timing:
    """Holds one session's latency over the measured rounds, in milliseconds.

    Attributes:
        name: The session's name as passed to `time_interleaved`.
        median_ms: Median latency.
        p10_ms: 10th percentile (linear interpolation).
        p90_ms: 90th percentile (linear interpolation).
        samples: One latency per round, in round order: sample i of every session in
            the same call comes from round i, which `ratios` relies on.
    """

    name: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    samples: tuple[float, ...]

    @classmethod
    def from_samples(cls, name: str, samples: Sequence[float]) -> Timing:
        """Summarizes per-round samples (ms) into a Timing, keeping their order."""
        if not samples:
            raise ValueError(f"{name}: no samples")
        p10, median, p90 = np.percentile(np.asarray(samples, dtype=np.float64), [10, 50, 90])
        return cls(name, float(median), float(p10), float(p90), tuple(float(s) for s in samples))


class Runner(Protocol):
    """The part of `ort.InferenceSession` that timing uses (tests pass fakes)."""

    def run(self, output_names: Any, input_feed: Mapping[str, Any]) -> Any:
        """Runs the model on `input_feed` and returns the requested outputs."""


def make_session(
    model: str | Path | bytes | onnx.ModelProto, opts: SessionOptions
) -> ort.InferenceSession:
    """Builds an ONNX Runtime session configured for fair, repeatable timing.

    The session uses `opts.threads` intra-op threads, one inter-op thread and
    sequential execution, so parallelism comes from one knob that the fingerprint
    records.

    Args:
        model: A path, serialized bytes, or an in-memory ModelProto. A ModelProto with
            external data or of 2 GiB or more must be given as a path instead.
        opts: How to build the session.

    Returns:
        The session.

    Raises:
        ValueError: The provider is unavailable, or a ModelProto cannot be passed in
            memory.
    """
    available = ort.get_available_providers()
    if opts.provider not in available:
        raise ValueError(f"provider {opts.provider!r} is not available; have {available}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = opts.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = _OPTIMIZATION_LEVELS[opts.optimization]
    so.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if opts.allow_spinning else "0"
    )
    source: str | bytes
    if isinstance(model, onnx.ModelProto):
        source = _serialize_in_memory(model)
    elif isinstance(model, bytes):
        source = model
    else:
        source = os.fspath(model)
    return ort.InferenceSession(source, sess_options=so, providers=[opts.provider])


def _serialize_in_memory(model: onnx.ModelProto) -> bytes:
    """Serializes a ModelProto for ORT, refusing models that only load from a path."""
    if any(onnx.external_data_helper.uses_external_data(t) for t in _all_tensors(model.graph)):
        # ORT resolves external data relative to the model's folder, which bytes lack.
        raise ValueError(
            "the model keeps weights in external data; save it and pass the path instead"
        )
    if model.ByteSize() >= _PROTOBUF_LIMIT:
        raise ValueError(
            "the model is 2 GiB or larger and cannot be serialized in memory; save it "
            "with external data and pass the path instead"
        )
    return model.SerializeToString()


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Yields the initializers and tensor attributes of a graph and its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def _shuffled_rounds(names: Sequence[str], seed: int) -> Iterator[tuple[str, ...]]:
    """Yields the run order of each round: seeded shuffles of the sorted names.

    Sorting first makes the orders depend only on the set of names and the seed, not on
    how the caller's dict happened to be built.
    """
    rng = random.Random(seed)
    order = sorted(names)
    while True:
        rng.shuffle(order)
        yield tuple(order)


def _per_session_feeds(
    names: Sequence[str],
    feeds: Mapping[str, Mapping[str, np.ndarray]] | Mapping[str, np.ndarray],
) -> dict[str, Mapping[str, np.ndarray]]:
    """Resolves `feeds` (shared, or one dict per session) to one feed per session."""
    values = list(feeds.values())
    if all(isinstance(v, Mapping) for v in values) and values:
        missing = sorted(set(names) - set(feeds))
        extra = sorted(set(feeds) - set(names))
        if missing or extra:
            raise ValueError(
                f"per-session feeds must name exactly the sessions; "
                f"missing {missing}, unknown {extra}"
            )
        # Every value is a mapping, so `feeds` holds one feed per session.
        per_session = cast("Mapping[str, Mapping[str, np.ndarray]]", feeds)
        return {name: per_session[name] for name in names}
    if any(isinstance(v, Mapping) for v in values):
        raise TypeError(
            "feeds must be one feed dict shared by all sessions (name -> array) or one "
            "feed dict per session (session -> name -> array), not a mix"
        )
    # No value is a mapping, so `feeds` is itself the one feed (name -> array).
    return dict.fromkeys(names, cast("Mapping[str, np.ndarray]", feeds))


def time_interleaved(
    sessions: Mapping[str, Runner],
    feeds: Mapping[str, Mapping[str, np.ndarray]] | Mapping[str, np.ndarray],
    *,
    warmup: int = 3,
    repeats: int = 20,
    min_seconds: float = 0.0,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Timing]:
    """Times several sessions in interleaved rounds and summarizes each one.

    Each round runs every session once, in a seeded shuffled order (see
    `_shuffled_rounds`); `warmup` rounds run first and are not recorded. Measuring
    continues until at least `repeats` rounds are recorded and `min_seconds` have passed
    since the first recorded round began. Only `session.run` is inside the clock, and
    Python's garbage collector is paused while measuring so its pauses do not land in a
    sample.

    Args:
        sessions: Name -> session (anything with ORT's `run(output_names, feed)`).
        feeds: One feed dict shared by all sessions, or one feed dict per session name.
        warmup: Unrecorded rounds first (first-run allocation, caches, page faults).
        repeats: Minimum number of recorded rounds.
        min_seconds: Minimum measured wall time; long enough runs average over the
            machine's slow and fast periods.
        seed: Seeds the round orders.
        progress: Called after each recorded round with (rounds done, `repeats`);
            rounds done exceeds `repeats` while `min_seconds` keeps measuring.

    Returns:
        Name -> Timing, in the order of `sessions`; every Timing has one sample per
        recorded round, in round order.

    Raises:
        ValueError: No sessions, bad counts, or per-session feeds not matching the
            session names.
    """
    names = list(sessions)
    if not names:
        raise ValueError("no sessions to time")
    if warmup < 0 or repeats < 1 or min_seconds < 0:
        raise ValueError(
            f"need warmup >= 0, repeats >= 1, min_seconds >= 0; "
            f"got {warmup}, {repeats}, {min_seconds}"
        )
    per_feed = _per_session_feeds(names, feeds)
    rounds = _shuffled_rounds(names, seed)
    samples_ns: dict[str, list[int]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(warmup):
            for name in next(rounds):
                sessions[name].run(None, per_feed[name])
        start = _clock_ns()
        done = 0
        while done < repeats or _clock_ns() - start < min_seconds * 1e9:
            for name in next(rounds):
                session, feed = sessions[name], per_feed[name]
                t0 = _clock_ns()
                session.run(None, feed)
                samples_ns[name].append(_clock_ns() - t0)
            done += 1
            if progress is not None:
                progress(done, repeats)
    finally:
        if gc_was_enabled:
            gc.enable()
    logger.debug("timed %d sessions over %d rounds", len(names), done)
    return {
        name: Timing.from_samples(name, [ns / 1e6 for ns in samples_ns[name]]) for name in names
    }


def ratios(timings: Mapping[str, Timing], baseline: str) -> dict[str, float]:
    """Computes each session's latency relative to `baseline` (> 1 means slower).

    The result is the median of per-round ratios, samples[name][r] /
    samples[baseline][r], not the ratio of the medians. Runs in one round are
    microseconds to milliseconds apart, so a slow period of the shared machine scales
    both samples of a round alike and divides out of their ratio; the ratio of medians
    would compare medians drawn from different rounds, leaving the drift in. The
    timings must come from one `time_interleaved` call so rounds pair up.

    Args:
        timings: Name -> Timing from one `time_interleaved` call.
        baseline: The name to divide by; its own ratio is 1.0.

    Returns:
        Name -> median per-round latency ratio, in the order of `timings`.

    Raises:
        KeyError: `baseline` is not among the timings.
        ValueError: Sample counts differ, so the rounds cannot be paired.
    """
    if baseline not in timings:
        raise KeyError(f"baseline {baseline!r} not among {sorted(timings)}")
    base = np.asarray(timings[baseline].samples, dtype=np.float64)
    result: dict[str, float] = {}
    for name, timing in timings.items():
        samples = np.asarray(timing.samples, dtype=np.float64)
        if samples.shape != base.shape:
            raise ValueError(
                f"{name} has {samples.size} samples but {baseline} has {base.size}; "
                "ratios need timings from one time_interleaved call"
            )
        result[name] = 1.0 if name == baseline else float(np.median(samples / base))
    return result


def device_fingerprint(opts: SessionOptions) -> dict[str, str]:
    """Describes the machine and software a timing was taken on, as strings.

    Keys: cpu, logical_cores, usable_cores (the process's CPU affinity, which
    containers often narrow), threads, optimization, provider, allow_spinning,
    onnxruntime, onnx, numpy, python, platform.
    """
    logical = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    return {
        "cpu": _cpu_model(),
        "logical_cores": str(logical),
        "usable_cores": str(usable),
        "threads": str(opts.threads),
        "optimization": opts.optimization,
        "provider": opts.provider,
        "allow_spinning": str(opts.allow_spinning),
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def fingerprint_key(fingerprint: Mapping[str, str]) -> str:
    """Hashes a fingerprint to a short stable key (16 hex chars of SHA-256)."""
    canonical = json.dumps(dict(fingerprint), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _cpu_model() -> str:
    """Reads the CPU model name, falling back to `platform.processor()`."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
