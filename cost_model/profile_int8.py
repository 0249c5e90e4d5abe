"""Profiles INT8 block variants beside their float twins, into the same SQLite store.

    float block (profile.attention_block / ffn_block, h heads or f channels)
      ─ projections named ─ passes.quantize.quantize_file (what the quantize pass emits)
      ─ float and INT8 sessions of every missing unit count timed in one interleaved run

Where INT8 pays depends on the CPU (VNNI or AMX integer dot products gain a lot, older
cores little) and on the block's shape, so the search reads it from these measurements
rather than from a rule. Float and INT8 of one shape are timed in the same rounds, so
their ratio is fair on a shared machine; the fresh float medians are stored too.
Kinds in the store: `attn_int8_dynamic`, `attn_int8_static`, `ffn_int8_dynamic`,
`ffn_int8_static` (see `int8_kind`), at the same BlockShape keys as the float kinds.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx

from planer.compiler.plan import INT8_MODES
from planer.compiler.progress import Bar, NullProgress, ProgressLike, as_progress
from planer.cost_model.profile import (
    BlockShape,
    Measurement,
    ProfileStore,
    attention_block,
    ffn_block,
)
from planer.cost_model.timing import SessionOptions, Timing, make_session, time_interleaved
from planer.passes.quantize import quantize_file

BUILDERS: dict[str, Callable[[BlockShape, int], onnx.ModelProto]] = {
    "attn": attention_block, "ffn": ffn_block}


def int8_kind(kind: str, mode: str) -> str:
    """The store's kind for block `kind` ("attn"/"ffn") quantized in `mode`."""
    if kind not in BUILDERS or mode not in INT8_MODES:
        raise ValueError(f"no INT8 variant of {kind!r} in mode {mode!r}")
    return f"{kind}_int8_{mode}"


def profile_int8_blocks(
    shape: BlockShape, heads: Sequence[int], channels: Sequence[int], *,
    store: ProfileStore, modes: Sequence[str] = ("dynamic",), refresh: bool = False,
    repeats: int = 15, progress: ProgressLike | NullProgress | None = None,
) -> dict[str, list[Measurement]]:
    """Measures INT8 attention at each head count and FFN at each width (stored ones reused).

    `progress` gets one bar counting timed runs, as profile.profile_blocks shows it.

    Returns:
        int8 kind -> one Measurement per requested unit count (0 units: 0 ms).
    """
    wanted = [(kind, mode, units) for kind, units in (("attn", sorted(set(heads))),
                                                      ("ffn", sorted(set(channels))))
              for mode in modes]
    stored = {int8_kind(k, m): {} if refresh else
              {x.units: x for x in store.load(int8_kind(k, m), shape)} for k, m, _ in wanted}
    missing = {(k, m): [u for u in units if u not in stored[int8_kind(k, m)] and u > 0]
               for k, m, units in wanted}
    total = 2 * repeats * sum(len(units) for units in missing.values())
    label = f"timing {total // (2 * repeats) if total else 0} INT8 block variants beside float"
    with as_progress(progress).bar(label, total) as bar:
        for (kind, mode), units in missing.items():
            if not units:
                continue
            measured = measure_pairs(kind, mode, shape, units, repeats=repeats,
                                     progress=_rounds(bar, 2 * len(units)))
            store.save(shape, measured)
            name = int8_kind(kind, mode)
            stored[name].update({m.units: m for m in measured if m.kind == name})
    result: dict[str, list[Measurement]] = {}
    for kind, mode, units in wanted:
        name = int8_kind(kind, mode)
        stored[name][0] = Measurement(name, 0, 0.0)  # a dropped block does no work
        result[name] = [stored[name][u] for u in units]
    return result


def _rounds(bar: Bar, runs: int) -> Callable[[int, int], None]:
    def advance(_done: int, _total: int) -> None:
        bar.advance(runs)  # one round ran every session once

    return advance


def measure_pairs(kind: str, mode: str, shape: BlockShape, units: Sequence[int], *,
                  repeats: int = 15,
                  progress: Callable[[int, int], None] | None = None) -> list[Measurement]:
    """Times float and INT8 variants of `kind` at each unit count in one interleaved run.

    Returns:
        A float and an INT8 Measurement per unit count.
    """
    timings = pair_timings(kind, mode, shape, units, repeats=repeats, progress=progress)
    name = int8_kind(kind, mode)
    return [m for u in units for m in (Measurement(kind, u, timings[f"float{u}"].median_ms),
                                       Measurement(name, u, timings[f"int8_{u}"].median_ms))]


def pair_timings(kind: str, mode: str, shape: BlockShape, units: Sequence[int], *,
                 repeats: int = 15, min_seconds: float = 0.0,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, Timing]:
    """Times `float<u>` and `int8_<u>` sessions of every unit count u, interleaved."""
    feeds = _feeds(kind, shape)
    opts = SessionOptions(threads=shape.threads)
    sessions = {}
    with tempfile.TemporaryDirectory(prefix="planer-int8-profile-") as scratch:
        for u in units:
            block = _named(BUILDERS[kind](shape, u))
            source = Path(scratch) / f"{kind}{u}.onnx"
            onnx.save(block, source)
            quantized = quantize_file(source, Path(scratch) / f"{kind}{u}.int8.onnx",
                                      {mode: _weight_matmuls(block)}, feeds=[feeds])
            sessions[f"float{u}"] = make_session(block, opts)
            sessions[f"int8_{u}"] = make_session(quantized, opts)
    return time_interleaved(sessions, feeds, warmup=3, repeats=repeats,
                            min_seconds=min_seconds, progress=progress)


def _named(block: onnx.ModelProto) -> onnx.ModelProto:
    """Names every node (the quantizer selects nodes by name; the builders leave them blank)."""
    for i, node in enumerate(block.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    return block


def _weight_matmuls(block: onnx.ModelProto) -> list[str]:
    """Names the MatMuls with a weight initializer: the block's projections."""
    weights = {t.name for t in block.graph.initializer if len(t.dims) == 2}
    return [n.name for n in block.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def _feeds(kind: str, shape: BlockShape) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((shape.batch, shape.tokens, shape.hidden))
             .astype(np.float32)}
    if kind == "attn":
        feeds["mask"] = np.zeros((shape.batch, 1, 1, shape.tokens), np.float32)
    return feeds

