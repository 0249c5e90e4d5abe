"""Benchmarks head/channel pruning on all-MiniLM-L6-v2: latency, fidelity and probe accuracy.

Every compiled model is timed against the dense original in the same process, in
interleaved rounds (cost_model.timing), ORT CPU with all graph optimizations; the
figures are medians of per-round ratios. Quality is the probe recipe of
shared/data/README.md (benchmarks/probe.py) plus held-out calibration fidelity.

    python -m benchmarks.bench_prune [--ratios 0.8 0.65 0.5 0.35] [--threads 1] [--out F]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.probe import DATA, evaluate
from planer.compiler.driver.pipeline import compile_plan
from planer.cost_model.timing import (
    SessionOptions,
    device_fingerprint,
    make_session,
    ratios,
    time_interleaved,
)
from planer.fixtures.build import minilm_path, minilm_tokenizer_dir


def feeds(batch: int, seq_len: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(1000, 20000, (batch, seq_len)).astype(np.int64),
            "attention_mask": np.ones((batch, seq_len), np.int64),
            "token_type_ids": np.zeros((batch, seq_len), np.int64)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.65, 0.5, 0.35])
    parser.add_argument("--uniform", action="store_true",
                        help="also time the uniform 6-heads/768-channels plan")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-probe", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    dense = minilm_path("dynamo")
    tokenizer = minilm_tokenizer_dir()
    work = Path(tempfile.mkdtemp(prefix="planer-bench-"))
    models: dict[str, Path] = {"dense": dense}
    rows: dict[str, dict] = {"dense": {"flops_ratio": 1.0}}
    if args.uniform:
        plan = {"layers": [{"heads": 6, "ffn": 768}] * 6}
        result = compile_plan(dense, work / "uniform", plan_data=plan, batch=args.batch,
                              seq_len=args.seq_len)
        models["uniform 6h/768"] = result.model_path
        rows["uniform 6h/768"] = {"flops_ratio": result.report["flops_ratio"]}
    for ratio in args.ratios:
        started = time.perf_counter()
        result = compile_plan(dense, work / f"r{ratio}", target_flops=ratio,
                              calibration=DATA / "sst2" / "train.tsv", tokenizer=tokenizer,
                              batch=args.batch, seq_len=args.seq_len)
        name = f"flops {ratio}"
        models[name] = result.model_path
        rows[name] = {"flops_ratio": result.report["flops_ratio"],
                      "compile_s": round(time.perf_counter() - started, 1),
                      "pooled_cosine": result.report["fidelity"]["pooled_cosine"]["mean"],
                      "token_cosine": result.report["fidelity"]["token_cosine"]["mean"],
                      "plan": [(la["heads"], la["ffn"]) for la in result.plan.to_dict()["layers"]]}
    opts = SessionOptions(threads=args.threads)
    sessions = {name: make_session(path, opts) for name, path in models.items()}
    timings = time_interleaved(sessions, feeds(args.batch, args.seq_len), warmup=5,
                               repeats=args.repeats)
    latency = ratios(timings, "dense")
    for name in models:
        rows[name]["median_ms"] = round(timings[name].median_ms, 2)
        rows[name]["latency_ratio"] = round(latency[name], 3)
        if not args.no_probe:
            rows[name].update(evaluate(models[name], tokenizer))
        print(json.dumps({"model": name, **rows[name]}), flush=True)
    fingerprint = device_fingerprint(opts)
    summary = {"date": time.strftime("%Y-%m-%d"),
               "machine": f"{fingerprint['cpu']}, {fingerprint['logical_cores']} cores, "
                          f"onnxruntime {fingerprint['onnxruntime']}",
               "threads": args.threads, "batch": args.batch,
               "seq_len": args.seq_len, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
