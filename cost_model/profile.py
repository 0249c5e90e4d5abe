"""Profiles block variants on the target runtime and stores every measurement in SQLite.

A block variant is one attention block with h heads (the form head pruning emits:
MatMul ─ Add ─ Reshape[0,0,h,d] ─ Transpose ...) or one FFN block with f channels
(MatMul ─ Add ─ erf-GELU as exporters spell it, five elementwise ops ─ MatMul ─ Add:
what channel pruning leaves; the ORT-kernels stage later fuses that GELU into BiasGelu,
which these variants do not model), at the deployment batch and sequence length. A
model with gated FFNs (SwiGLU) is timed on gated variants instead (kind "ffn_gated":
gate and up MatMuls, SiLU, the gating Mul, down MatMul), since its FFN does half as
much work again as an ungated one of the same width. All
variants of a shape are timed in interleaved rounds in one process (cost_model.timing),
so machine drift hits them alike. Measurements live in
`<cache>/profiles/latency.sqlite`, keyed by the device fingerprint (CPU model, cores,
threads, provider, library versions) and by planer's emission version
(compiler.emit.EMISSION_VERSION), and are reused by later compiles of the same emission;
`refresh=True` measures again.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from planer.compiler import emit
from planer.compiler.cache import cache_dir
from planer.compiler.progress import Bar, NullProgress, ProgressLike, as_progress
from planer.cost_model.timing import (
    SessionOptions,
    device_fingerprint,
    fingerprint_key,
    make_session,
    time_interleaved,
)

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS measurement (
    device TEXT NOT NULL, kind TEXT NOT NULL, batch INTEGER NOT NULL, tokens INTEGER NOT NULL,
    hidden INTEGER NOT NULL, head_size INTEGER NOT NULL, units INTEGER NOT NULL,
    threads INTEGER NOT NULL, emission INTEGER NOT NULL, median_ms REAL NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (device, kind, batch, tokens, hidden, head_size, units, threads, emission)
);
CREATE TABLE IF NOT EXISTS device (key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL);
"""


@dataclasses.dataclass(frozen=True)
class BlockShape:
    """The deployment shape a block is profiled at."""

    batch: int
    tokens: int
    hidden: int
    head_size: int
    threads: int


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One block variant's median latency."""

    kind: str  # "attn" or "ffn"
    units: int  # heads or channels
    median_ms: float


class ProfileStore:
    """The SQLite store of block measurements for one device and emission version."""

    def __init__(self, threads: int, path: Path | None = None):
        self.path = path or cache_dir("profiles") / "latency.sqlite"
        self.fingerprint = device_fingerprint(SessionOptions(threads=threads))
        self.device = fingerprint_key(self.fingerprint)
        self.emission = emit.EMISSION_VERSION
        self.db = sqlite3.connect(self.path)
        _drop_unversioned(self.db)
        self.db.executescript(SCHEMA)
        self.db.execute("INSERT OR REPLACE INTO device VALUES (?, ?)",
                        (self.device, repr(sorted(self.fingerprint.items()))))
        self.db.commit()

    def load(self, kind: str, shape: BlockShape) -> list[Measurement]:
        rows = self.db.execute(
            "SELECT units, median_ms FROM measurement WHERE device=? AND kind=? AND batch=? "
            "AND tokens=? AND hidden=? AND head_size=? AND threads=? AND emission=? "
            "ORDER BY units",
            (self.device, kind, shape.batch, shape.tokens, shape.hidden, shape.head_size,
             shape.threads, self.emission),
        ).fetchall()
        return [Measurement(kind, int(u), float(ms)) for u, ms in rows]

    def save(self, shape: BlockShape, measurements: Sequence[Measurement]) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO measurement (device, kind, batch, tokens, hidden, "
            "head_size, units, threads, emission, median_ms, created) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            [(self.device, m.kind, shape.batch, shape.tokens, shape.hidden, shape.head_size,
              m.units, shape.threads, self.emission, m.median_ms, time.time())
             for m in measurements],
        )
        self.db.commit()


def _drop_unversioned(db: sqlite3.Connection) -> None:
    """Drops a store written before rows carried the emission version.

    Its rows do not say which emitted form they timed, so none can be trusted again.
    """
    columns = {row[1] for row in db.execute("PRAGMA table_info(measurement)")}
    if columns and "emission" not in columns:
        logger.info("dropping latency measurements stored without an emission version")
        db.execute("DROP TABLE measurement")
        db.commit()


def profile_blocks(
    shape: BlockShape, heads: Sequence[int], channels: Sequence[int], *,
    store: ProfileStore, refresh: bool = False, repeats: int = 15,
    progress: ProgressLike | NullProgress | None = None, gated: bool = False,
) -> dict[str, list[Measurement]]:
    """Measures attention at each head count and FFN at each width (stored ones reused).

    `progress` (a `planer.compiler.progress.Progress`, or any status callable) gets one
    bar counting timed runs: each of `repeats` rounds runs every variant not yet stored.
    `gated` times gated FFN variants (stored as kind "ffn_gated", returned as "ffn").
    """
    ffn_kind = "ffn_gated" if gated else "ffn"
    wanted = {"attn": sorted(set(heads)), ffn_kind: sorted(set(channels))}
    stored = {kind: {} if refresh else {m.units: m for m in store.load(kind, shape)}
              for kind in wanted}
    missing = {kind: [u for u in units if u not in stored[kind] and u > 0]
               for kind, units in wanted.items()}
    label = (f"timing {len(missing['attn'])} attention + {len(missing[ffn_kind])} FFN block "
             f"variants ({repeats} rounds)")
    total = sum(len(units) for units in missing.values()) * repeats
    if total:
        with as_progress(progress).bar(label, total) as bar:
            for kind, units in missing.items():
                if units:
                    stored[kind].update(_measure_and_save(kind, shape, units, store=store,
                                                          repeats=repeats, bar=bar))
    result: dict[str, list[Measurement]] = {}
    for kind, units in wanted.items():
        stored[kind][0] = Measurement(kind, 0, 0.0)  # a dropped block does no work
        name = "ffn" if kind == ffn_kind else kind
        result[name] = [dataclasses.replace(stored[kind][u], kind=name) for u in units]
    return result


def _measure_and_save(kind: str, shape: BlockShape, units: Sequence[int], *,
                      store: ProfileStore, repeats: int, bar: Bar) -> dict[int, Measurement]:
    def advance(_done: int, _total: int) -> None:
        bar.advance(len(units))  # one round ran every variant once

    measured = _measure(kind, shape, units, repeats=repeats, progress=advance)
    store.save(shape, measured)
    return {m.units: m for m in measured}


def _measure(kind: str, shape: BlockShape, units: Sequence[int], *, repeats: int,
             progress: Callable[[int, int], None] | None) -> list[Measurement]:
    def build(shape: BlockShape, units: int) -> onnx.ModelProto:
        if kind == "attn":
            return attention_block(shape, units)
        return ffn_block(shape, units, gated=kind == "ffn_gated")

    opts = SessionOptions(threads=shape.threads)
    sessions = {str(u): make_session(build(shape, u), opts) for u in units}
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((shape.batch, shape.tokens, shape.hidden)).astype(np.float32)}
    if kind == "attn":
        feeds["mask"] = np.zeros((shape.batch, 1, 1, shape.tokens), np.float32)
    timings = time_interleaved(sessions, feeds, warmup=3, repeats=repeats, progress=progress)
    return [Measurement(kind, u, timings[str(u)].median_ms) for u in units]


def attention_block(shape: BlockShape, heads: int) -> onnx.ModelProto:
    """Builds one canonical attention block with `heads` heads (what head_pruning emits)."""
    d, width, inner = shape.head_size, shape.hidden, heads * shape.head_size
    rng = np.random.default_rng(heads)
    inits, nodes = [], []

    def weight(name: str, *dims: int) -> str:
        inits.append(numpy_helper.from_array(
            (rng.standard_normal(dims) * 0.05).astype(np.float32), name))
        return name

    inits.append(numpy_helper.from_array(np.array([0, 0, heads, d], np.int64), "split"))
    inits.append(numpy_helper.from_array(np.array([0, 0, inner], np.int64), "merge"))
    inits.append(numpy_helper.from_array(np.array(d**-0.5, np.float32), "scale"))
    for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [
            helper.make_node("MatMul", ["x", weight(f"w{name}", width, inner)], [f"{name}0"]),
            helper.make_node("Add", [f"{name}0", weight(f"b{name}", inner)], [f"{name}1"]),
            helper.make_node("Reshape", [f"{name}1", "split"], [f"{name}2"]),
            helper.make_node("Transpose", [f"{name}2"], [name], perm=perm),
        ]
    nodes += [
        helper.make_node("MatMul", ["q", "k"], ["s0"]),
        helper.make_node("Mul", ["s0", "scale"], ["s1"]),
        helper.make_node("Add", ["s1", "mask"], ["s2"]),
        helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["c0"]),
        helper.make_node("Transpose", ["c0"], ["c1"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["c1", "merge"], ["c2"]),
        helper.make_node("MatMul", ["c2", weight("wo", inner, width)], ["o0"]),
        helper.make_node("Add", ["o0", weight("bo", width)], ["y"]),
    ]
    inputs = [_input("x", shape.batch, shape.tokens, width),
              _input("mask", shape.batch, 1, 1, shape.tokens)]
    return _model(nodes, inputs, inits, width, shape)


def ffn_block(shape: BlockShape, channels: int, *, gated: bool = False) -> onnx.ModelProto:
    """Builds one FFN block with `channels` channels and erf-GELU (as exporters spell it).

    `gated` builds a SwiGLU block instead, as Llama exports spell it.
    """
    if gated:
        return _gated_ffn_block(shape, channels)
    rng = np.random.default_rng(channels)
    width = shape.hidden
    inits = [
        numpy_helper.from_array((rng.standard_normal((width, channels)) * 0.05)
                                .astype(np.float32), "w1"),
        numpy_helper.from_array(np.zeros(channels, np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((channels, width)) * 0.05)
                                .astype(np.float32), "w2"),
        numpy_helper.from_array(np.zeros(width, np.float32), "b2"),
        numpy_helper.from_array(np.array(2**0.5, np.float32), "sqrt2"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h"]),
        helper.make_node("Div", ["h", "sqrt2"], ["g0"]),
        helper.make_node("Erf", ["g0"], ["g1"]),
        helper.make_node("Add", ["g1", "one"], ["g2"]),
        helper.make_node("Mul", ["h", "g2"], ["g3"]),
        helper.make_node("Mul", ["g3", "half"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["y0"]),
        helper.make_node("Add", ["y0", "b2"], ["y"]),
    ]
    return _model(nodes, [_input("x", shape.batch, shape.tokens, width)], inits, width, shape)


def _gated_ffn_block(shape: BlockShape, channels: int) -> onnx.ModelProto:
    """Builds x ─ MatMul(gate) ─ SiLU ─ Mul(x·up) ─ MatMul(down) ─ y (Llama's SwiGLU, no biases)."""
    rng = np.random.default_rng(channels)
    width = shape.hidden
    inits = [numpy_helper.from_array((rng.standard_normal(dims) * 0.05).astype(np.float32), name)
             for name, dims in (("wg", (width, channels)), ("wu", (width, channels)),
                                ("wd", (channels, width)))]
    nodes = [
        helper.make_node("MatMul", ["x", "wg"], ["g"]),
        helper.make_node("Sigmoid", ["g"], ["g1"]),
        helper.make_node("Mul", ["g", "g1"], ["g2"]),
        helper.make_node("MatMul", ["x", "wu"], ["u"]),
        helper.make_node("Mul", ["g2", "u"], ["a"]),
        helper.make_node("MatMul", ["a", "wd"], ["y"]),
    ]
    return _model(nodes, [_input("x", shape.batch, shape.tokens, width)], inits, width, shape)


def _input(name: str, *dims: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims))


def _model(nodes: list, inputs: list, inits: list, width: int,
           shape: BlockShape) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "block", inputs,
                              [_input("y", shape.batch, shape.tokens, width)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
