"""Fused ORT graphs as given vs read and compiled neutrally by planer: which runs faster.

    python benchmarks/bench_contrib.py [--rounds 200] [--tokens 128] [--threads 1]
                                       [--out benchmarks/results/contrib-minilm.json]

For each fused all-MiniLM-L6-v2 (ORT's transformer optimizer output; the same weights
written in packed-QKV Attention kernels; in MultiHeadAttention kernels), planer reads it
(compiler.support.prepare spells the fused kernels out), compiles the neutral plan with
the default `--ort-kernels auto`, and the fused input, planer's output and the plain
export are timed interleaved in one process (cost_model.timing: shuffled rounds, median
of per-round ratios to the fused input; ORT CPU, optimization "all", batch 1).
This is the measurement behind compiler/contrib.py's choice to unfuse rather than keep
the fused kernels. Never asserted in tests.
"""

# ruff: noqa: E402  (the path fix below must precede the `benchmarks` import)

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from planer.compiler.driver.pipeline import compile_plan
from planer.compiler.loading import load_model
from planer.compiler.support import prepare
from planer.cost_model.timing import SessionOptions, make_session, ratios, time_interleaved
from planer.fixtures.build import minilm_path
from planer.fixtures.fused import fused_bert_path, optimized_path


def _feeds(tokens: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(1000, 29000, (1, tokens)).astype(np.int64),
            "attention_mask": np.ones((1, tokens), np.int64),
            "token_type_ids": np.zeros((1, tokens), np.int64)}


def _planer_neutral(src: Path, folder: Path, tokens: int, threads: int) -> Path:
    model = load_model(src)
    prepare(model)
    read = folder / "read.onnx"
    ir.save(model, str(read))
    result = compile_plan(read, folder / "out", seq_len=tokens, threads=threads)
    return result.model_path


def measure(name: str, src: Path, *, rounds: int, tokens: int, threads: int) -> dict[str, Any]:
    """Times `src` as given, planer's neutral compile of it, and the plain export."""
    with tempfile.TemporaryDirectory() as tmp:
        compiled = _planer_neutral(src, Path(tmp), tokens, threads)
        opts = SessionOptions(threads=threads)
        sessions = {"fused": make_session(src, opts), "planer": make_session(compiled, opts),
                    "export": make_session(minilm_path("torchscript"), opts)}
        timings = time_interleaved(sessions, _feeds(tokens), warmup=5, repeats=rounds)
    ratio = ratios(timings, "fused")
    return {"model": name, "fused_ms": round(timings["fused"].median_ms, 3),
            "planer_vs_fused": round(ratio["planer"], 4),
            "export_vs_fused": round(ratio["export"], 4), "rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    """Prints one line per fused form and optionally writes them as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    sources = {"ORT optimizer (SkipLayerNorm, BiasGelu)": optimized_path("minilm", "torchscript"),
               "packed-QKV Attention kernels": fused_bert_path("attention", "minilm"),
               "MultiHeadAttention kernels": fused_bert_path("mha", "minilm")}
    results = []
    for name, src in sources.items():
        started = time.perf_counter()
        row = measure(name, src, rounds=args.rounds, tokens=args.tokens, threads=args.threads)
        row["seconds"] = round(time.perf_counter() - started, 1)
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps({"tokens": args.tokens, "threads": args.threads,
                                        "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
