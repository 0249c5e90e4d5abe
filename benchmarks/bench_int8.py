"""INT8 benchmark: where INT8 pays per block on this CPU, and on the whole MiniLM.

    python benchmarks/bench_int8.py blocks [--modes dynamic static] [--threads 1]
    python benchmarks/bench_int8.py model  [--repeats 40]

`blocks` times every attention head count and a few FFN widths of MiniLM's shape
(384 wide, head size 32) float and INT8 through cost_model.profile_int8 (the variant
quantized by passes.quantize, interleaved with its float twin) and prints the median
per-round ratio INT8 / float. `model` builds the bundled all-MiniLM-L6-v2 the way
planer compiles it (canonical attention, ORT kernel choice), then INT8 through
passes.quantize: dynamic everywhere, attention only, FFN only, and static QDQ
calibrated on sst2/train rows; it times them with the original interleaved (batch 1,
128 tokens) and reports the pooled cosine to the original on held-out sst2 rows.
Timings are medians of per-round ratios (cost_model.timing); never asserted in tests.
"""

# ruff: noqa: E402  (the path fix below must precede the `benchmarks` import)

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from planer.compiler.calibration import CalibrationSet, build_calibration, model_input_infos
from planer.compiler.driver.pipeline import read_model
from planer.compiler.driver.prune import magnitude_selection
from planer.compiler.plan import Int8Plan, Plan
from planer.compiler.spec import ModelSpec
from planer.cost_model.profile import BlockShape
from planer.cost_model.profile_int8 import pair_timings
from planer.cost_model.timing import (
    SessionOptions,
    Timing,
    device_fingerprint,
    make_session,
    ratios,
    time_interleaved,
)
from planer.passes.channel_pruning import ChannelPruningConfig, apply_channel_pruning
from planer.passes.head_pruning import HeadPruningConfig, apply_head_pruning
from planer.passes.ort_kernels import OrtKernelsConfig, apply_ort_kernels
from planer.passes.quantize import QuantizeConfig, apply_quantize

DATA = ROOT.parent / "shared" / "data"


def bench_blocks(args: argparse.Namespace) -> dict[str, Any]:
    """INT8 / float per block variant, per mode, at the compile's batch/tokens/threads."""
    shape = BlockShape(batch=args.batch, tokens=args.seq_len, hidden=384, head_size=32,
                       threads=args.threads)
    result: dict[str, Any] = {}
    for kind, units in (("attn", list(range(1, 13))), ("ffn", args.widths)):
        for mode in args.modes:
            timings = pair_timings(kind, mode, shape, units, repeats=args.repeats)
            rows = {}
            for u in units:
                f, q = timings[f"float{u}"], timings[f"int8_{u}"]
                per_round = np.asarray(q.samples) / np.asarray(f.samples)
                rows[u] = {"float_ms": round(f.median_ms, 4), "int8_ms": round(q.median_ms, 4),
                           "ratio": round(float(np.median(per_round)), 3),
                           "ratio_p10_p90": [round(float(x), 3)
                                             for x in np.percentile(per_round, [10, 90])],
                           **_fastest(f, q)}
            result[f"{kind}/{mode}"] = rows
    return result


def _fastest(base: Timing, other: Timing) -> dict[str, Any]:
    """Ratio of the fastest samples: on a crowded machine (other jobs preempting the
    process for whole scheduler slices) the median can be a preempted run, while the
    fastest of many runs is the uncontended time of compute-bound code."""
    fast_base, fast_other = min(base.samples), min(other.samples)
    return {"min_ms": [round(fast_base, 4), round(fast_other, 4)],
            "ratio_of_min": round(fast_other / fast_base, 3)}


# ---------------------------------------------------------------- whole model


VARIANTS: dict[str, dict[str, str] | None] = {
    "neutral": None,
    "dynamic_all": {"blocks": "both", "mode": "dynamic"},
    "dynamic_attn": {"blocks": "attn", "mode": "dynamic"},
    "dynamic_ffn": {"blocks": "ffn", "mode": "dynamic"},
    "static_all": {"blocks": "both", "mode": "static"},
}


def planer_model(src: Path, int8: dict[str, str] | None, calib: CalibrationSet,
                 out: Path) -> tuple[Path, float]:
    """The model as planer compiles the neutral plan (ORT kernels on), then INT8."""
    model, spec = read_model(src)
    sel = magnitude_selection(spec, Plan.neutral(spec))
    apply_head_pruning(model, spec, HeadPruningConfig(sel.heads, sel.head_output))
    apply_channel_pruning(model, spec, ChannelPruningConfig(sel.channels, sel.channel_output))
    apply_ort_kernels(model, OrtKernelsConfig(unfuse_skip_layernorm=True))
    _tidy(model)
    started = time.perf_counter()
    if int8 is not None:
        choice = Int8Plan(**int8)
        apply_quantize(model, spec, QuantizeConfig(dict.fromkeys(range(len(spec.layers)),
                                                                 choice)), calib)
    seconds = time.perf_counter() - started
    ir.external_data.load_to_model(model)
    ir.save(model, out)
    return out, seconds


def _tidy(model: ir.Model) -> None:
    from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

    RemoveUnusedNodesPass()(model)
    TopologicalSortPass()(model)


def pooled_cosine(original: Path, other: Path, batches: list[dict[str, np.ndarray]]) -> dict:
    """Cosine of mask-mean-pooled hidden states, per held-out text: mean and 5th pct."""
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                for p in (original, other)]
    names = {i.name for i in sessions[0].get_inputs()}
    cos = []
    for feed in batches:
        feed = {k: v for k, v in feed.items() if k in names}
        mask = feed["attention_mask"][..., None].astype(np.float64)
        a, b = ((s.run(None, feed)[0].astype(np.float64) * mask).sum(1) for s in sessions)
        cos.extend((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    return {"mean": round(float(np.mean(cos)), 5), "p5": round(float(np.percentile(cos, 5)), 5),
            "texts": len(cos)}


def calibration(spec: ModelSpec, model_src: Path) -> CalibrationSet:
    from planer.fixtures.build import minilm_tokenizer_dir

    model, _ = read_model(model_src)
    return build_calibration(DATA / "sst2" / "train.tsv", model_input_infos(model),
                             tokenizer=minilm_tokenizer_dir(), vocab_size=spec.vocab_size,
                             seq_len=128, seed=0)


def bench_model(args: argparse.Namespace) -> dict[str, Any]:
    from planer.compiler.driver.cli import resolve_model

    src = resolve_model(None)
    _, spec = read_model(src)
    calib = calibration(spec, src)
    out = Path(tempfile.mkdtemp(prefix="planer-bench-int8-"))
    paths: dict[str, Path] = {"original": src}
    result: dict[str, Any] = {"calibration": calib.source, "quantize_seconds": {},
                              "pooled_cosine": {}}
    for name, int8 in VARIANTS.items():
        paths[name], seconds = planer_model(src, int8, calib, out / f"{name}.onnx")
        result["quantize_seconds"][name] = round(seconds, 2)
        result["pooled_cosine"][name] = pooled_cosine(src, paths[name], calib.holdout)
    opts = SessionOptions(threads=args.threads)
    sessions = {name: make_session(path, opts) for name, path in paths.items()}
    row = {k: v[:1] for k, v in calib.holdout[0].items()}
    feed = {i.name: row[i.name] for i in sessions["original"].get_inputs()}
    timings = time_interleaved(sessions, feed, warmup=5, repeats=args.repeats,
                               min_seconds=args.min_seconds)
    result["median_ms"] = {k: round(t.median_ms, 3) for k, t in timings.items()}
    result["fastest"] = {k: _fastest(timings["original"], t) for k, t in timings.items()}
    result["ratio_to_original"] = {k: round(v, 3) for k, v in ratios(timings, "original").items()}
    result["ratio_to_neutral"] = {k: round(v, 3) for k, v in ratios(timings, "neutral").items()}
    result["rounds"] = len(timings["original"].samples)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["blocks", "model"])
    parser.add_argument("--modes", nargs="+", default=["dynamic", "static"])
    parser.add_argument("--widths", type=int, nargs="+", default=[384, 768, 1152, 1536])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--min-seconds", type=float, default=0.0)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    result = bench_blocks(args) if args.what == "blocks" else bench_model(args)
    result["device"] = device_fingerprint(SessionOptions(threads=args.threads))
    result["command"] = "python benchmarks/bench_int8.py " + " ".join(argv or sys.argv[1:])
    # The machine is shared: a 1-minute load average far above the core count means the
    # medians include preempted runs (see `fastest`).
    result["load_average_1min"] = {"before": load_before[0], "after": os.getloadavg()[0]}
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
