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
import re
import sys
import tempfile
import time
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
    options = CompileOptions(mux=n, recover_steps=1, batch=BATCH, seq_len=SEQ, threads=THREADS,
                             ort_kernels="on")  # as `auto` chose at batch 32, 2 threads
    c = Compilation(source, options, model, Plan.neutral(spec), spec)
    c.selection = magnitude_selection(spec, c.plan)
    run_stages([Prune(), Mux(), OrtKernels()], c)
    finish_graph(model)
    ir.external_data.load_to_model(model)  # one self-contained file in `out`
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
        # N = 1 is planer's neutral emission (ORT kernel choice only): the share of the
        # gain that is not multiplexing.
        models["neutral"] = untrained_mux(source, 1, Path(tmp) / "neutral.onnx")
        for n in (2, 4):
            models[f"mux{n}"] = untrained_mux(source, n, Path(tmp) / f"mux{n}.onnx")
        result = throughput(models, repeats=repeats)
    return {"batch": BATCH, "seq_len": SEQ, "threads": THREADS, "repeats": repeats,
            "models": result}


def _curve_recorder(curve: list[list[float]]) -> Any:
    """Returns a progress callable that keeps recovery's held-out evaluations with times."""
    started = time.perf_counter()

    def say(message: str) -> None:
        match = re.match(r"recovery step (\d+):.*fidelity ([-\d.]+)", message)
        if match:
            curve.append([round(time.perf_counter() - started, 1), int(match.group(1)),
                          float(match.group(2))])

    return say


def quality(n: int, budgets: Sequence[float], flops: Sequence[float], work: Path,
            repeats: int) -> dict[str, Any]:
    """Compiles mux N with each recovery budget and pruning at each FLOPs ratio; scores all.

    Throughput is timed at batch 32 beside the original (interleaved), so the pruned model
    whose throughput matches mux N's can be read off the table.
    """
    import torch

    from benchmarks.probe import DATA
    from benchmarks.quality import evaluate
    from planer.compiler.driver.pipeline import compile_plan
    from planer.fixtures.build import minilm_tokenizer_dir

    torch.set_num_threads(THREADS)
    source, tokenizer = resolve_model(None), minilm_tokenizer_dir()
    calibration = DATA / "sst2" / "train.tsv"
    common = {"calibration": calibration, "tokenizer": tokenizer, "seq_len": SEQ,
              "batch": BATCH, "threads": THREADS}
    models: dict[str, Path] = {"original": source}
    reports: dict[str, Any] = {}
    for budget in budgets:
        name = f"mux{n}-recover{budget:g}s"
        curve: list[list[float]] = []
        result = compile_plan(source, work / name, mux=n, recover_seconds=budget,
                              progress=_curve_recorder(curve), **common)
        models[name] = result.model_path
        reports[name] = {k: result.report["recovery"][k] for k in
                         ("steps", "tokens", "train_s", "stopped", "fidelity_before",
                          "fidelity_after")}
        reports[name]["holdout_curve"] = curve  # [seconds, step, held-out pooled cosine]
    for ratio in flops:
        name = f"flops{ratio:g}"
        models[name] = compile_plan(source, work / name, target_flops=ratio, **common).model_path
    speeds = throughput(models, repeats=repeats)
    scores = evaluate(source, [p for k, p in models.items() if k != "original"], tokenizer,
                      threads=THREADS)
    rows = {}
    for (name, _), score in zip(models.items(), scores, strict=True):
        rows[name] = {**speeds[name], **{k: v for k, v in score.items() if k != "model"},
                      **({"recovery": reports[name]} if name in reports else {})}
    return {"mux": n, "batch": BATCH, "seq_len": SEQ, "threads": THREADS,
            "calibration": "sst2/train.tsv", "models": rows}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--repeats", type=int, default=30)
    s.add_argument("--out", type=Path, default=None)
    q = sub.add_parser("quality")
    q.add_argument("--mux", type=int, choices=(2, 4), default=2)
    q.add_argument("--budgets", type=float, nargs="+", default=[300.0], help="seconds")
    q.add_argument("--flops", type=float, nargs="*", default=[0.5], help="pruning ratios")
    q.add_argument("--work", type=Path, default=None, help="keep the models here")
    q.add_argument("--repeats", type=int, default=20)
    q.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.mode == "speed":
        result = speed(args.repeats)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = quality(args.mux, args.budgets, args.flops, args.work or Path(tmp),
                             args.repeats)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
