"""Benchmarks `--target-latency` on all-MiniLM-L6-v2: the latency model, then targets met.

    validate: per (batch, threads) setting, the latency model as a compile builds it
              (stored block curves re-anchored on whole models timed now) and as it was
              before (stored curves at their stored milliseconds), scored on random mixed
              plans (heads, FFN width, INT8 blocks per layer) it was not anchored on:
              predicted vs measured latency ratio to the original, interleaved
    targets:  per fraction, planer compiles to that target (its own compile-measure-tighten
              loop, as `planer compile --target-latency P --calibration sst2/train.tsv`),
              then each model is re-measured independently (compiler/driver/latency.
              measure_ratio, 60 interleaved rounds) and scored by benchmarks.quality
              (STS-B dev Spearman, pooled cosine, neighbours@10 on AG News dev)

    python -m benchmarks.bench_latency validate [--settings 1:1 8:2] [--samples 12]
    python -m benchmarks.bench_latency targets [--fractions 0.5 0.33 0.25] [--batch 8]
        [--threads 2] [--no-quality] [--out F]
    python -m benchmarks.bench_latency remeasure OUT... [--batch 8] [--threads 2]
        (OUT folders of `planer compile`, or `.onnx` files: the same re-measure and scores)

Run under `flock /tmp/bench.lock` on a shared machine: other timings would collide.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.probe import DATA
from planer.compiler.driver.latency import (
    block_profile,
    compile_to_latency,
    measure_ratio,
    profile_model,
    validate_latency_model,
)
from planer.compiler.driver.pipeline import read_model
from planer.compiler.plan import Plan
from planer.cost_model.latency import fit_latency_model
from planer.cost_model.timing import SessionOptions, device_fingerprint
from planer.fixtures.build import minilm_path, minilm_tokenizer_dir


def validate(settings: list[str], samples: int, seed: int) -> list[dict[str, Any]]:
    """Scores the anchored and the stored latency model at each `batch:threads` setting."""
    dense = minilm_path("dynamo")
    _, spec = read_model(dense)
    results = []
    for setting in settings:
        batch, threads = (int(x) for x in setting.split(":"))
        anchored, info = profile_model(dense, batch=batch, seq_len=128, threads=threads,
                                       progress=_say)
        measured, int8, _ = block_profile(spec, batch=batch, seq_len=128, threads=threads,
                                            refresh=False, progress=None)
        stored = fit_latency_model(measured["attn"], measured["ffn"], info["neutral_ms"],
                                   Plan.neutral(spec), int8=int8)
        check = validate_latency_model(dense, {"anchored": anchored, "stored": stored},
                                       info["dense_ms"], batch=batch, seq_len=128,
                                       threads=threads, samples=samples, seed=seed,
                                       progress=_say)
        results.append({"batch": batch, "seq_len": 128, "threads": threads,
                        "anchors_ms": info["anchors_ms"], "stored_scale": info["stored_scale"],
                        **check})
        _print_validation(results[-1])
    return results


def _print_validation(result: dict[str, Any]) -> None:
    print(f"\nbatch {result['batch']}, 128 tokens, {result['threads']} thread(s); "
          f"anchors {result['anchors_ms']} ms; stored curves scaled by "
          f"{result['stored_scale']}")
    print("| plan (heads/FFN+INT8 per layer) | measured | anchored model | stored model |")
    print("|---|---:|---:|---:|")
    for row in result["models"]:
        print(f"| {row['plan']} | {row['measured_ratio']:.3f} | {row['anchored_ratio']:.3f} "
              f"| {row['stored_ratio']:.3f} |")
    mape = result["mape"]
    print(f"| MAPE | | {mape['anchored']:.1%} | {mape['stored']:.1%} |", flush=True)


def targets(fractions: list[float], batch: int, threads: int, repeats: int, *,
            quality: bool = True) -> list[dict[str, Any]]:
    """Compiles to each fraction, re-measures it independently and scores its quality."""
    dense, tokenizer = minilm_path("dynamo"), minilm_tokenizer_dir()
    work = Path(tempfile.mkdtemp(prefix="planer-latency-"))
    seconds = {}
    for fraction in fractions:
        started = time.perf_counter()
        compile_to_latency(
            dense, work / f"t{fraction}", target_fraction=fraction,
            calibration=DATA / "sst2" / "train.tsv", tokenizer=tokenizer, batch=batch,
            seq_len=128, threads=threads, progress=_say)
        seconds[work / f"t{fraction}"] = round(time.perf_counter() - started, 1)
    return remeasure(list(seconds), batch, threads, repeats, quality=quality,
                     compile_s=seconds)


def remeasure(outs: list[Path], batch: int, threads: int, repeats: int, *,
              quality: bool = True, compile_s: dict[Path, float] | None = None,
              original: Path | None = None) -> list[dict[str, Any]]:
    """Re-measures compiled OUT folders against the original (interleaved) and scores them.

    The target is read from each report.json (`target_ms` over `baseline_ms`); a compile
    without one (`--plan`, `--target-flops`) has none, and a path to an `.onnx` file (a
    model planer did not write, such as ORT's `quantize_dynamic` output) has no report.
    `original` is the model they were compiled from (default: the bundled MiniLM).
    """
    dense = original or minilm_path("dynamo")
    _, spec = read_model(dense)
    rows = []
    for out in outs:
        model, report = _model_and_report(out)
        ratio, _ = measure_ratio(dense, model, batch=batch, seq_len=128, threads=threads,
                                 vocab=spec.vocab_size, repeats=repeats)
        fraction = _ratio(report, "target_ms")
        rows.append({"out": str(out), "fraction": fraction and round(fraction, 3),
                     "measured_ratio": round(ratio, 4),
                     "vs_target": fraction and round(ratio / fraction, 3),
                     "planer_ratio": _round(_ratio(report, "measured_ms")),
                     "predicted_ratio": _round(_ratio(report, "predicted_ms")),
                     "rounds": len(report.get("rounds", [])),
                     "compile_s": (compile_s or {}).get(out), "path": str(model),
                     "plan": _plan_text(report["plan"]) if "plan" in report else ""})
        print(json.dumps(rows[-1]), flush=True)
    if quality:
        _score(rows, dense)
    _print_targets(rows, batch, threads)
    return rows


def _model_and_report(out: Path) -> tuple[Path, dict[str, Any]]:
    """The model in an OUT folder with its report.json, or an `.onnx` path with no report."""
    if out.suffix == ".onnx":
        return out, {}
    model = next(out / name for name in ("model.onnx", "fastest-missed-target.onnx")
                 if (out / name).exists())
    return model, json.loads((out / "report.json").read_text())


def _ratio(report: dict[str, Any], key: str) -> float | None:
    """`report[key]` over the dense model's `baseline_ms`; None when the compile had no target."""
    if key not in report or "baseline_ms" not in report:
        return None
    return report[key] / report["baseline_ms"]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _score(rows: list[dict[str, Any]], dense: Path) -> None:
    from benchmarks.quality import evaluate

    scores = evaluate(dense, [Path(r["path"]) for r in rows], minilm_tokenizer_dir())
    print(f"original STS-B dev {scores[0]['stsb_dev']}")
    for row, score in zip(rows, scores[1:], strict=True):
        row.update({k: v for k, v in score.items() if k != "model"})


def _print_targets(rows: list[dict[str, Any]], batch: int, threads: int) -> None:
    print(f"\nbatch {batch}, 128 tokens, {threads} thread(s)")
    print("| target | re-measured | vs target | planer's verdict | predicted | rounds | "
          "compile s | STS-B dev | pooled cosine | neighbours@10 | plan |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {_cell(r['fraction'], '.0%')} | {r['measured_ratio']:.3f} | "
              f"{_cell(r['vs_target'], '.3f')} | {_cell(r['planer_ratio'], '.3f')} | "
              f"{_cell(r['predicted_ratio'], '.3f')} | {r['rounds']} | "
              f"{r['compile_s']} | {r.get('stsb_dev', '')} | {r.get('pooled_cosine', '')} | "
              f"{r.get('neighbours_at_10', '')} | {r['plan'] or r['out']} |", flush=True)


def _cell(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _plan_text(plan: dict[str, Any]) -> str:
    return " ".join(f"{la.get('heads', 'all')}/{la.get('ffn', 'all')}"
                    + (f"+{la['int8']['blocks']}" if "int8" in la else "")
                    + (f"+moe{la['moe']['experts']}" if "moe" in la else "")
                    for la in plan["layers"])


def _say(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    check = sub.add_parser("validate", help="latency model vs measured random mixed plans")
    check.add_argument("--settings", nargs="+", default=["1:1", "8:2"], metavar="BATCH:THREADS")
    check.add_argument("--samples", type=int, default=12)
    check.add_argument("--seed", type=int, default=0)
    run = sub.add_parser("targets", help="compile to latency targets, re-measure, score")
    run.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.33, 0.25])
    run.add_argument("--batch", type=int, default=1)
    run.add_argument("--threads", type=int, default=1)
    run.add_argument("--repeats", type=int, default=60)
    run.add_argument("--no-quality", action="store_true",
                     help="skip benchmarks.quality (score the printed paths later)")
    again = sub.add_parser("remeasure", help="re-measure and score compiled OUT folders")
    again.add_argument("outs", nargs="+", type=Path)
    again.add_argument("--batch", type=int, default=1)
    again.add_argument("--threads", type=int, default=1)
    again.add_argument("--repeats", type=int, default=60)
    again.add_argument("--no-quality", action="store_true",
                       help="skip benchmarks.quality (needed for models other than MiniLM)")
    again.add_argument("--original", type=Path,
                       help="the model the OUTs were compiled from (default: bundled MiniLM)")
    for mode in (check, run, again):
        mode.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.mode == "validate":
        data: Any = validate(args.settings, args.samples, args.seed)
    elif args.mode == "targets":
        data = targets(args.fractions, args.batch, args.threads, args.repeats,
                       quality=not args.no_quality)
    else:
        data = remeasure(args.outs, args.batch, args.threads, args.repeats,
                         quality=not args.no_quality, original=args.original)
    if args.out:
        fingerprint = device_fingerprint(SessionOptions())
        args.out.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "mode": args.mode,
            "machine": f"{fingerprint['cpu']}, {fingerprint['logical_cores']} cores, "
                       f"onnxruntime {fingerprint['onnxruntime']}", "results": data},
            indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
