"""Benchmarks `--target-latency` on all-MiniLM-L6-v2: targets met, speedups, probe accuracy.

For each fraction of the measured dense latency, planer compiles to that target (its
own compile-measure-tighten loop); then every compiled model is timed again against
the dense model in one process, interleaved, to check the target independently, and
scored with the probe of shared/data/README.md.

    python -m benchmarks.bench_latency [--fractions 0.8 0.6 0.5 0.4] [--out F]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_prune import feeds
from benchmarks.probe import DATA, evaluate
from planer.compiler.driver.latency import compile_to_latency
from planer.cost_model.timing import (
    SessionOptions,
    device_fingerprint,
    make_session,
    ratios,
    time_interleaved,
)
from planer.fixtures.build import minilm_path, minilm_tokenizer_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.8, 0.6, 0.5, 0.4])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--no-probe", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    dense, tokenizer = minilm_path("dynamo"), minilm_tokenizer_dir()
    work = Path(tempfile.mkdtemp(prefix="planer-latency-"))
    models, rows = {"dense": dense}, {"dense": {}}
    for fraction in args.fractions:
        started = time.perf_counter()
        result = compile_to_latency(
            dense, work / f"t{fraction}", target_fraction=fraction,
            calibration=DATA / "sst2" / "train.tsv", tokenizer=tokenizer, batch=1,
            seq_len=128, threads=args.threads)
        report = result.report
        name = f"target {fraction:.0%}"
        models[name] = result.model_path
        rows[name] = {"fraction": fraction, "target_ms": report["target_ms"],
                      "planer_measured_ms": report["measured_ms"],
                      "predicted_ms": report["predicted_ms"], "rounds": len(report["rounds"]),
                      "flops_ratio": report["flops_ratio"],
                      "compile_s": round(time.perf_counter() - started, 1),
                      "pooled_cosine": report["fidelity"]["pooled_cosine"]["mean"],
                      "plan": [(la["heads"], la["ffn"]) for la in report["plan"]["layers"]]}
        print(json.dumps({"model": name, **rows[name]}), flush=True)
    opts = SessionOptions(threads=args.threads)
    timings = time_interleaved({n: make_session(p, opts) for n, p in models.items()},
                               feeds(1, 128), warmup=5, repeats=args.repeats)
    rel = ratios(timings, "dense")
    for name, path in models.items():
        row = rows[name]
        row["median_ms"] = round(timings[name].median_ms, 2)
        row["latency_ratio"] = round(rel[name], 3)
        if "fraction" in row:
            row["ratio_vs_target"] = round(rel[name] / row["fraction"], 3)
        if not args.no_probe:
            row.update(evaluate(path, tokenizer))
        print(json.dumps({"model": name, **row}), flush=True)
    fingerprint = device_fingerprint(opts)
    if args.out:
        args.out.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{fingerprint['cpu']}, {fingerprint['logical_cores']} cores, "
                       f"onnxruntime {fingerprint['onnxruntime']}",
            "threads": args.threads, "batch": 1, "seq_len": 128, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
