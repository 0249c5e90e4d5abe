"""Data multiplexing on the bundled MiniLM: throughput against the original, then quality.

    speed    original vs what `planer compile --mux N` emits (N = 2, 4; weights do not
             change speed, so the untrained graph is timed), batch 32, 128 tokens,
             2 threads, ORT CPU, interleaved in one process: throughput ratio = median
             per-round latency ratio original / mux
    quality  `planer compile --mux N --recover T` for each budget (sst2/train calibration,
             balanced SST-2 + AG News training text as benchmarks.bench_recover), scored
             by benchmarks.quality (STS-B dev, pooled cosine, neighbours@10); next to it
             pruning alone (`--target-flops R`) at the same throughput, timed the same way

    python -m benchmarks.bench_mux speed [--repeats 30]
    python -m benchmarks.bench_mux quality --mux 2 --budgets 300 1200 [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from planer.compiler.calibration import model_input_infos, random_feeds
from planer.compiler.driver.cli import resolve_model
from planer.compiler.driver.compilation import Compilation, CompileOptions
from planer.compiler.driver.pipeline import finish_graph, read_model
from planer.compiler.driver.prune import magnitude_selection
from planer.compiler.driver.stages import Mux, OrtKernels, Prune, run_stages
from planer.compiler.plan import Plan
from planer.cost_model.timing import SessionOptions, make_session, ratios, time_interleaved

BATCH, SEQ, THREADS = 32, 128, 2


def untrained_mux(source: Path, n: int, out: Path) -> Path:
    """Writes what `compile --mux n` emits before training (the neutral plan, ORT kernels)."""
    model, spec = read_model(source)
    options = CompileOptions(mux=n, recover_steps=1, batch=BATCH, seq_len=SEQ, threads=THREADS)
    c = Compilation(source, options, model, Plan.neutral(spec), spec)
    c.selection = magnitude_selection(spec, c.plan)
    run_stages([Prune(), Mux(), OrtKernels()], c)
    finish_graph(model)
    ir.save(model, out)
    return out


def throughput(models: dict[str, Path], *, repeats: int) -> dict[str, Any]:
    """Times the models interleaved; returns per-model median ms and throughput vs original."""
    opts = SessionOptions(threads=THREADS)
    sessions = {name: make_session(path, opts) for name, path in models.items()}
    model, _ = read_model(models["original"])
    feeds = random_feeds(model_input_infos(model), batch=BATCH, seq_len=SEQ, vocab_size=30522,
                         seed=0)
    timings = time_interleaved(sessions, feeds, warmup=3, repeats=repeats)
    ratio = ratios(timings, "original")
    return {name: {"median_ms": round(t.median_ms, 2),
                   "throughput_x": round(1.0 / ratio[name], 3)} for name, t in timings.items()}


def speed(repeats: int) -> dict[str, Any]:
    source = resolve_model(None)
    with tempfile.TemporaryDirectory() as tmp:
        models = {"original": source}
        for n in (2, 4):
            models[f"mux{n}"] = untrained_mux(source, n, Path(tmp) / f"mux{n}.onnx")
        result = throughput(models, repeats=repeats)
    return {"batch": BATCH, "seq_len": SEQ, "threads": THREADS, "repeats": repeats,
            "models": result}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--repeats", type=int, default=30)
    s.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.mode == "speed":
        result = speed(args.repeats)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
