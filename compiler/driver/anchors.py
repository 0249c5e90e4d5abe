"""Compiles the anchor plans a latency model is re-anchored on, cached by what decides them.

    anchor plans (every layer alike: all units, ¼ of the heads, ¼ of the FFN width;
                  float, and both blocks INT8 where INT8 was profiled)
      ─ key: the model's bytes and its folder's files, the plan, planer's emission version,
             batch, sequence length, threads, and the ORT-kernel spelling this compile uses
      ─ compiled once per key into <cache>/anchors/<key>/ (atomically: a folder renamed in)
      ─ timed afresh by every compile, interleaved with the original (`time_anchors`:
        20 rounds, then 10 more at a time while a ratio is uncertain, 40 at most)

Compiling six whole plans takes minutes on a small shared machine, and what they compile
to depends only on the key; how fast they run now does not, so only the models are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from planer.compiler import emit
from planer.compiler.cache import cache_dir
from planer.compiler.calibration import ModelInputInfo, random_feeds
from planer.compiler.driver.pipeline import compile_plan
from planer.compiler.plan import Int8Plan, LayerPlan, Plan
from planer.compiler.spec import ModelSpec
from planer.cost_model.int8_cost import INT8_MODE
from planer.cost_model.kernels import KernelTimings
from planer.cost_model.profile_int8 import int8_kind
from planer.cost_model.timing import SessionOptions, Timing, make_session, time_interleaved

_CHUNK = 1 << 20

# Interleaved rounds timing the original and the anchor plans: at least, at most. Past the
# least, timing goes on in steps of ANCHOR_STEP rounds while some anchor's ratio to the
# original is known to worse than ANCHOR_SPREAD (relative standard error of its median).
ANCHOR_ROUNDS = (20, 40)
ANCHOR_STEP = 10
ANCHOR_SPREAD = 0.01


def anchor_plans(spec: ModelSpec, int8: Mapping[str, Any]) -> dict[str, Plan]:
    """The whole plans `profile_model` times to anchor the curves (latency.anchor).

    Every layer alike: all units, a quarter of the heads, a quarter of the FFN width
    (on the profiled grid); the same three again with both blocks in INT8 where INT8
    was profiled.
    """
    def every_layer(heads_share: float, ffn_share: float, blocks: str | None) -> Plan:
        layers = []
        for la in spec.layers:
            step = max(1, la.ffn.width // 16)
            layers.append(LayerPlan(
                heads=max(1, round(la.attention.heads * heads_share)),
                ffn=max(step, step * round(la.ffn.width * ffn_share / step)),
                int8=Int8Plan(blocks, INT8_MODE) if blocks else None))
        return Plan(tuple(layers))

    shapes = {"neutral": (1.0, 1.0), "fewer_heads": (0.25, 1.0), "narrower": (1.0, 0.25)}
    plans = {name: every_layer(h, f, None) for name, (h, f) in shapes.items()}
    plans["neutral"] = Plan.neutral(spec)  # exactly, whatever the grid
    if int8_kind("attn", INT8_MODE) in int8 and int8_kind("ffn", INT8_MODE) in int8:
        plans.update({f"int8_{name}": every_layer(h, f, "both")
                      for name, (h, f) in shapes.items()})
    return plans


def compile_anchors(
    model_path: Path, plans: Mapping[str, Plan], *, hidden: int, batch: int, seq_len: int,
    threads: int, ort_kernels: str, kernels: KernelTimings,
) -> dict[str, Path]:
    """Returns each anchor plan's compiled model, compiling those not cached yet.

    `kernels` decides (and keeps, for the compile's later plans) the ORT-kernel spelling
    the anchors are compiled with, so they run as the search's plans will.
    """
    spelling = kernel_spelling(ort_kernels, kernels, hidden=hidden, tokens=batch * seq_len,
                               threads=threads)
    base = {"model": model_digest(model_path), "emission": emit.EMISSION_VERSION,
            "batch": batch, "seq_len": seq_len, "threads": threads,
            "ort_kernels": ort_kernels, "spelling": spelling}
    paths = {}
    for name, plan in plans.items():
        key = hashlib.sha256(json.dumps({**base, "plan": plan.to_dict()}, sort_keys=True)
                             .encode()).hexdigest()[:24]
        folder = cache_dir("anchors") / key
        if not (folder / emit.MODEL_NAME).exists():
            _compile_into(folder, model_path, plan, batch=batch, seq_len=seq_len,
                          threads=threads, ort_kernels=ort_kernels, kernels=kernels)
        paths[name] = folder / emit.MODEL_NAME
    return paths


def kernel_spelling(ort_kernels: str, kernels: KernelTimings, *, hidden: int, tokens: int,
                    threads: int) -> Any:
    """Returns the ORT-kernel spelling a compile emits.

    `ort_kernels` itself, or under "auto" whether the residual LayerNorm is unfused
    (timed once per shape by `kernels`).
    """
    if ort_kernels == "auto":
        return kernels.skip_layernorm(hidden, tokens, threads).unfuse
    return ort_kernels


def _compile_into(folder: Path, model_path: Path, plan: Plan, *, batch: int, seq_len: int,
                  threads: int, ort_kernels: str, kernels: KernelTimings) -> None:
    """Compiles `plan` beside `folder` and renames the result in (a reader never sees half)."""
    scratch = Path(tempfile.mkdtemp(prefix=".compiling-", dir=folder.parent))
    try:
        compile_plan(model_path, scratch / "out", plan_data=plan.to_dict(), batch=batch,
                     seq_len=seq_len, threads=threads, ort_kernels=ort_kernels,
                     kernels=kernels)
        try:
            os.replace(scratch / "out", folder)
        except OSError:  # another planer cached the same anchor first: keep theirs
            if not (folder / emit.MODEL_NAME).exists():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def model_digest(model_path: Path) -> str:
    """Hashes the model file and names, sizes and times of the files beside it.

    The files beside it include its external data; a change to any of them compiles the
    anchors again rather than trusting a stale copy.
    """
    digest = hashlib.sha256()
    with model_path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    for other in sorted(model_path.parent.iterdir()):
        if other.is_file() and other != model_path:
            stat = other.stat()
            digest.update(f"{other.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def open_sessions(models: dict[str, Path], *, batch: int, seq_len: int, threads: int,
              vocab: int | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Opens a session per model and draws one set of random inputs for all of them."""
    opts = SessionOptions(threads=threads)
    sessions = {name: make_session(path, opts) for name, path in models.items()}
    infos = model_input_infos_from_session(sessions[next(iter(sessions))])
    return sessions, random_feeds(infos, batch=batch, seq_len=seq_len, vocab_size=vocab, seed=0)


def time_anchors(
    models: dict[str, Path], *, batch: int, seq_len: int, threads: int, vocab: int | None,
) -> dict[str, Timing]:
    """Times the original ("dense") and the anchors interleaved, until their ratios settle.

    ANCHOR_ROUNDS[0] rounds first, then ANCHOR_STEP more at a time (other round orders)
    until every ratio's spread is under ANCHOR_SPREAD or ANCHOR_ROUNDS[1] rounds are in:
    a quiet machine is done in half the rounds a busy one takes.
    """
    sessions, feeds = open_sessions(models, batch=batch, seq_len=seq_len, threads=threads,
                                    vocab=vocab)
    least, most = ANCHOR_ROUNDS
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    step = 0
    while True:
        chunk = time_interleaved(sessions, feeds, warmup=3 if step == 0 else 0,
                                 repeats=least if step == 0 else ANCHOR_STEP, seed=step)
        for name, timing in chunk.items():
            samples[name].extend(timing.samples)
        step += 1
        timings = {name: Timing.from_samples(name, s) for name, s in samples.items()}
        if len(samples["dense"]) >= most or ratio_spread(timings, "dense") <= ANCHOR_SPREAD:
            return timings


def ratio_spread(timings: Mapping[str, Timing], baseline: str) -> float:
    """The largest relative standard error of a median per-round ratio to `baseline`.

    Per session, the per-round ratios' median absolute deviation, scaled to a standard
    deviation (1.4826) and to the standard error of a median (1.2533 / sqrt(rounds)),
    over the median ratio.
    """
    base = np.asarray(timings[baseline].samples, np.float64)
    worst = 0.0
    for name, timing in timings.items():
        if name == baseline:
            continue
        ratio = np.asarray(timing.samples, np.float64) / base
        median = float(np.median(ratio))
        mad = float(np.median(np.abs(ratio - median)))
        worst = max(worst, 1.4826 * 1.2533 * mad / np.sqrt(ratio.size) / median)
    return worst


def model_input_infos_from_session(session: ort.InferenceSession) -> list[ModelInputInfo]:
    """Describes a session's inputs for `random_feeds`."""
    dtypes = {"tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(float)": "float32"}
    return [ModelInputInfo(i.name, np.dtype(dtypes.get(i.type, "float32")), tuple(i.shape))
            for i in session.get_inputs()]
