"""FFN -> MoE benchmark: FFN-alone speed, whole-model latency, held-out quality, recall.

    python benchmarks/bench_moe.py ffn   [--tokens 128 1] [--lowering gather kernel]
    python benchmarks/bench_moe.py model [--experts 8 --top-k 2] [--probe]

`ffn` builds one-FFN ONNX models from MiniLM's layer-0 weights (dense vs MoE, each
lowering) and times them interleaved (ORT CPU, one thread, optimization "all").
`model` fits experts and routers for every MiniLM layer on sst2/train.tsv rows, prints
per-layer quality (sparsity, router recall, experts per token,
reconstruction error on held-out calibration tokens), times dense vs MoE at batch 1 x 128
tokens interleaved in one run, and with --probe runs benchmarks/probe.py (the recipe of
shared/data/README.md) on both models.
Timings are medians of per-round ratios (cost_model.timing); never asserted in tests.
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
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as `python benchmarks/bench_moe.py`: import `benchmarks`
    sys.path.insert(0, str(ROOT))

from benchmarks.probe import evaluate
from planer.compiler.calibration import build_calibration, model_input_infos, read_texts
from planer.compiler.driver.pipeline import read_canonical, read_model, tune_ort_kernels
from planer.compiler.plan import MoePlan
from planer.cost_model.kernels import standalone_ffn, standalone_moe
from planer.cost_model.timing import SessionOptions, make_session, ratios, time_interleaved
from planer.passes.ffn_to_moe import FfnToMoeConfig, MoeLayer, apply_ffn_to_moe
from planer.passes.moe_fit import ROUTER_HIDDEN, Router, cluster_experts, fit_layers

DATA = ROOT.parent / "shared" / "data"
OPTS = SessionOptions(threads=1, optimization="all")


# ---------------------------------------------------------------- one-FFN models


def bench_ffn(args: argparse.Namespace) -> dict[str, Any]:
    """Times dense vs MoE FFN alone on MiniLM layer-0 weights."""
    from planer.fixtures.build import minilm_path

    _, spec = read_model(minilm_path("dynamo"))
    ffn = spec.layers[0].ffn
    weights = ffn.w1.w(), ffn.w1.b(), ffn.w2.w(), ffn.w2.b()
    w1 = weights[0]
    dense = standalone_ffn(*weights, "gelu")  # MiniLM's own (erf) GELU, as exported
    # com.microsoft.MoE's "gelu" is the tanh approximation: the kernel is timed on the
    # same weights with that activation, as it would run.
    dense_tanh = standalone_ffn(*weights, "gelu_tanh")
    rng = np.random.default_rng(0)
    experts = cluster_experts(w1, args.experts)
    d = w1.shape[0]
    h = args.router_hidden
    router = Router(rng.standard_normal((d, h)).astype(np.float32) / np.sqrt(d),
                    np.zeros(h, np.float32),
                    rng.standard_normal((h, args.experts)).astype(np.float32),
                    np.zeros(args.experts, np.float32))
    results: dict[str, Any] = {}
    for tokens in args.tokens:
        moe = MoeLayer(experts, router, top_k=args.top_k,
                       capacity=max(1, int(np.ceil(1.25 * tokens * args.top_k / args.experts))))
        models = {"dense": dense}
        for lowering in args.lowering:
            models[lowering] = (standalone_moe(dense_tanh, "gelu_tanh", moe, "kernel")
                                if lowering == "kernel" else
                                standalone_moe(dense, "gelu", moe, lowering))
        models["tensorrt"] = standalone_moe(dense, "gelu", moe, "auto", target="tensorrt")
        sessions = {k: make_session(m, OPTS) for k, m in models.items()}
        feed = {"x": rng.standard_normal((1, tokens, d)).astype(np.float32),
                "attention_mask": np.ones((1, tokens), np.int64)}
        timings = time_interleaved(sessions, feed, warmup=5, repeats=args.repeats)
        rel = ratios(timings, "dense")
        results[f"tokens={tokens}"] = {
            k: {"median_ms": round(t.median_ms, 4), "speedup_vs_dense": round(1 / rel[k], 3)}
            for k, t in timings.items()}
    return results


# ---------------------------------------------------------------- whole model


def save(model: ir.Model, path: Path) -> Path:
    ir.external_data.load_to_model(model)
    ir.save(model, path)
    return path


def fit_minilm(args: argparse.Namespace) -> tuple[Path, dict[int, Any], dict[str, Any]]:
    from planer.fixtures.build import minilm_path, minilm_tokenizer_dir

    src = minilm_path("dynamo")
    # The form `planer compile` emits: canonical attention, then MoE, then ORT kernel choice.
    model, spec = read_canonical(src)
    # Calibrate on sst2/train rows past the first --probe-rows; the probe scores on
    # sst2/dev.tsv and later agnews rows, which calibration never sees.
    texts = read_texts(DATA / "sst2" / "train.tsv")[args.probe_rows:]
    calib_file = Path(tempfile.mkdtemp()) / "calib.txt"
    calib_file.write_text("\n".join(texts[: args.calib_rows * 4]) + "\n")
    calib = build_calibration(calib_file, model_input_infos(model),
                              tokenizer=minilm_tokenizer_dir(), vocab_size=spec.vocab_size,
                              batch_size=32, max_samples=args.calib_rows, seed=0)
    started = time.perf_counter()
    fitted = fit_layers(model, spec, calib, {la.index: args.experts for la in spec.layers},
                        steps=args.steps, max_tokens=args.max_tokens,
                        router_hidden=args.router_hidden)
    fit_s = time.perf_counter() - started
    plan = (MoePlan(args.experts, top_k=args.top_k) if args.tau is None
            else MoePlan(args.experts, tau=args.tau))
    quality = {i: f.quality(plan).to_dict() for i, f in fitted.items()}
    layers = {i: MoeLayer(f.experts, f.router, top_k=plan.top_k, tau=plan.tau)
              for i, f in fitted.items()}
    apply_ffn_to_moe(model, spec, FfnToMoeConfig(layers, lowering=args.lowering[0]))
    RemoveUnusedNodesPass()(model)
    TopologicalSortPass()(model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kernels = tune_ort_kernels(model, spec.hidden, tokens=128, threads=1)
    path = save(model, out / "minilm_moe.onnx")
    # The dense model as planer emits it (same attention and kernel choices, no experts):
    # MoE's own share of the speed-up is measured against this one.
    neutral, _ = read_canonical(src)
    tune_ort_kernels(neutral, spec.hidden, tokens=128, threads=1)
    save(neutral, out / "minilm_neutral.onnx")
    return path, quality, {"fit_seconds": round(fit_s, 1), "calibration": calib.source,
                           "plan": plan.to_dict(), "ort_kernels": kernels}


def bench_model(args: argparse.Namespace) -> dict[str, Any]:
    from planer.fixtures.build import minilm_path

    src = minilm_path("dynamo")
    moe_path, quality, info = fit_minilm(args)
    results: dict[str, Any] = {**info, "layers": quality}
    sessions = {"dense": make_session(src, OPTS), "moe": make_session(moe_path, OPTS),
                "neutral": make_session(moe_path.parent / "minilm_neutral.onnx", OPTS)}
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(1000, 30522, (1, 128)).astype(np.int64),
            "attention_mask": np.ones((1, 128), np.int64),
            "token_type_ids": np.zeros((1, 128), np.int64)}
    timings = time_interleaved(sessions, feed, warmup=3, repeats=args.repeats)
    results["latency_ms"] = {k: round(t.median_ms, 2) for k, t in timings.items()}
    rel = ratios(timings, "dense")
    results["latency_ratio_moe_over_dense"] = round(rel["moe"], 3)
    results["latency_ratio_neutral_over_dense"] = round(rel["neutral"], 3)
    results["latency_ratio_moe_over_neutral"] = round(ratios(timings, "neutral")["moe"], 3)
    if args.probe:
        from planer.fixtures.build import minilm_tokenizer_dir

        results["probe"] = {name: evaluate(path, minilm_tokenizer_dir()) for name, path in
                            [("dense", src), ("moe", moe_path)]}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["ffn", "model"])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tau", type=float, default=None)
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 1])
    parser.add_argument("--lowering", nargs="+", default=["gather", "kernel"])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--router-hidden", type=int, default=ROUTER_HIDDEN)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--calib-rows", type=int, default=1024)
    parser.add_argument("--probe-rows", type=int, default=5000)
    parser.add_argument("--probe", action="store_true")
    parser.add_argument("--out", default="/tmp/planer_bench_moe")
    args = parser.parse_args(argv)
    result = bench_ffn(args) if args.what == "ffn" else bench_model(args)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
