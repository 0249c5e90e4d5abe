"""Measures how well the search's quality model ranks real mixed plans (issue 16).

    calibration (SST-2 train) ─▶ measured single-change losses (cost_model.quality, probe on
    the fitting share) ─▶ interaction weights fitted on --fit-plans compiled plans
    ─▶ --plans other random mixed plans (heads, FFN width, dynamic INT8, MoE, one skim
    point), each compiled ─▶ predicted loss vs measured loss

Measured loss is 1 − mean pooled cosine to the dense model on the held-out calibration
share (the compile's report, never used for fitting or for the weights) and, with
--stsb, the STS-B dev drop (benchmarks.quality). The removal-cost model the search used
before (cost_model.search.Quality: removal costs + INT8 block costs, blind to MoE and
skim) is scored on the same plans. With --latency the search's latency model (profiled
and anchored as a compile at batch 1, 128 tokens, 1 thread builds it) predicts each
plan, scored against its measured interleaved ratio to the original (latency.
measure_ratio) as MAPE. Run under the shared lock, one thread:

    flock /tmp/bench.lock env OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_quality_model \
        --plans 12 --stsb --latency --out benchmarks/results/quality-model-minilm.json

A long run splits into chunks: --only START:END evaluates that slice of the same --plans
random plans (the single-change measurements are cached, the fit plans recompiled), and
--merge joins the chunks' --out files into one summary:

    ... --plans 12 --stsb --latency --only 0:6 --out /tmp/q0.json   (then --only 6:12)
    .venv/bin/python -m benchmarks.bench_quality_model --merge /tmp/q0.json /tmp/q6.json \
        --out benchmarks/results/quality-model-minilm.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.probe import DATA
from planer.compiler.driver.compilation import CompileOptions
from planer.compiler.driver.latency import measure_ratio, profile_model
from planer.compiler.driver.pipeline import compile_plan, load_fitting, read_model
from planer.compiler.driver.planning import MOE_SEARCH, activations, measure_quality, skim_points
from planer.compiler.plan import INT8_BLOCKS, Int8Plan, LayerPlan, Plan
from planer.compiler.spec import ModelSpec
from planer.cost_model import variants
from planer.cost_model.int8_cost import INT8_MODE, measure_int8_costs
from planer.cost_model.kernels import KernelTimings
from planer.cost_model.search import Quality, predicted_loss
from planer.fixtures.build import minilm_path, minilm_tokenizer_dir
from planer.passes.prune_fit import importance


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (scipy's, ties averaged)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def random_plan(spec: ModelSpec, rng: np.random.Generator, kinds: set[str]) -> Plan:
    """A random mixed plan: per layer heads, width, INT8 and maybe MoE; maybe one skim point."""
    skim = None
    if "skim" in kinds and rng.random() < 0.4:
        points = skim_points(spec)
        skim = points[int(rng.integers(len(points)))]
    layers = []
    for i, layer in enumerate(spec.layers):
        top_h, top_f = layer.attention.heads, layer.ffn.width
        step = top_f // 16
        heads = int(rng.integers(top_h // 3, top_h + 1))
        moe = None
        if "moe" in kinds and skim is None and rng.random() < 0.25:
            moe = MOE_SEARCH[int(rng.integers(len(MOE_SEARCH)))]
        ffn = top_f if moe is not None else int(rng.integers(6, 17)) * step
        int8 = None
        if "int8" in kinds and rng.random() < 0.6:
            blocks = "attn" if moe is not None else INT8_BLOCKS[int(rng.integers(3))]
            int8 = Int8Plan(blocks=blocks, mode=INT8_MODE)
        keep = skim[1] if skim is not None and skim[0] == i else None
        layers.append(LayerPlan(heads=heads, ffn=ffn, moe=moe, skim_keep=keep, int8=int8))
    return Plan(tuple(layers))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", type=int, default=12)
    parser.add_argument("--fit-plans", type=int, default=3)
    parser.add_argument("--kinds", default="prune,int8,moe,skim")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stsb", action="store_true", help="also score STS-B dev per plan")
    parser.add_argument("--latency", action="store_true",
                        help="also score the latency model's prediction per plan (MAPE)")
    parser.add_argument("--only", metavar="START:END",
                        help="evaluate only this slice of the --plans random plans")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="CHUNK",
                        help="join chunk --out files into one summary; runs nothing")
    parser.add_argument("--weights-from", type=Path, metavar="CHUNK",
                        help="take the fitted interaction weights from an earlier chunk's --out "
                             "(same seed and --fit-plans) instead of compiling the fit plans")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.merge:
        return _merge(args.merge, args.out)
    if args.stsb:
        from benchmarks.quality import stsb_spearman
    kinds = set(args.kinds.split(","))
    start, end = (int(x) for x in (args.only or f"0:{args.plans}").split(":"))
    src, tok = minilm_path("dynamo"), minilm_tokenizer_dir()
    calib_path = DATA / "sst2" / "train.tsv"
    model, spec = read_model(src)
    options = CompileOptions(calibration=calib_path, tokenizer=tok, target_flops=1.0)
    fitting = load_fitting(model, spec, options, print)
    assert fitting is not None
    kernels = KernelTimings()
    work = Path(tempfile.mkdtemp(prefix="planer-quality-"))
    results: dict[str, Any] = {}

    def compile_one(plan: Plan) -> Path:
        folder = work / f"m{len(results)}"
        result = compile_plan(src, folder, plan_data=plan.to_dict(), calibration=calib_path,
                              tokenizer=tok, fitting=fitting, kernels=kernels)
        results[str(folder)] = result
        return result.model_path

    started = time.perf_counter()
    fit = measure_quality(model, spec, fitting, batch=1, passes=frozenset(kinds),
                          int8="int8" in kinds, measure_plan=compile_one, progress=print)
    singles_s = time.perf_counter() - started
    rng = np.random.default_rng(args.seed)
    fit_plans = [random_plan(spec, rng, kinds) for _ in range(args.fit_plans)]
    if args.weights_from:
        _reuse_weights(fit, args.weights_from, seed=args.seed, fit_plans=args.fit_plans)
    else:
        fit.correct(fit_plans, spec)
    model_s = time.perf_counter() - started
    print(json.dumps({"weights": fit.quality.weights, "singles_s": round(singles_s, 1),
                      "model_s": round(model_s, 1)}), flush=True)
    old = Quality(importance(spec, activations(fitting, model, spec, print)),
                  measure_int8_costs(model, spec, fitting.calib.batches))
    latency = None
    if args.latency:  # as a compile at batch 1, 128 tokens, 1 thread builds it
        latency, profile = profile_model(src, batch=1, seq_len=128, threads=1,
                                         progress=print, kernels=kernels)
        dense_ms = profile["dense_ms"]
    plans = [random_plan(spec, rng, kinds) for _ in range(args.plans)]
    rows = []
    for index in range(start, end):
        plan = plans[index]
        path = compile_one(plan)
        report = next(r for r in results.values() if r.model_path == path).report
        row = {"index": index, "plan": plan.to_dict()["layers"],
               "predicted_loss": round(sum(fit.quality.layer_loss(i, la)
                                           for i, la in enumerate(plan.layers)), 6),
               "removal_cost_loss": round(predicted_loss(spec, old, _prune_int8(plan)), 6),
               "measured_loss": round(1.0 - report["fidelity"]["pooled_cosine"]["mean"], 6)}
        if args.stsb:
            row["stsb_dev"] = round(stsb_spearman(path, tok, threads=1), 2)
        if latency is not None:
            ratio, _ = measure_ratio(src, path, batch=1, seq_len=128, threads=1,
                                     vocab=spec.vocab_size)
            row["predicted_ratio"] = round(variants.predict(latency, spec, plan) / dense_ms, 4)
            row["measured_ratio"] = round(ratio, 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    dense = stsb_spearman(src, tok, threads=1) if args.stsb else None
    summary = _summary(rows, dense)
    if latency is not None:
        summary["latency_dense_ms"] = round(dense_ms, 3)
    summary.update({"plans": len(rows), "plans_drawn": args.plans, "only": [start, end],
                    "seed": args.seed, "fit_plans": args.fit_plans, "kinds": sorted(kinds),
                    "weights": fit.quality.weights, "corrections": fit.corrections,
                    "quality_model_seconds": round(model_s, 1),
                    "singles_seconds": round(singles_s, 1)})
    print(json.dumps({k: v for k, v in summary.items() if k != "corrections"}))
    if args.out:
        args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), **summary,
                                        "rows": rows}, indent=2) + "\n")
    return 0


def _prune_int8(plan: Plan) -> Plan:
    """The plan as the removal-cost model sees it: heads, widths and INT8 only."""
    return Plan(tuple(dataclasses.replace(la, moe=None, skim_keep=None) for la in plan.layers))


def _reuse_weights(fit: Any, chunk: Path, *, seed: int, fit_plans: int) -> None:
    """Sets the fit's weights (and corrections) to those an earlier chunk fitted."""
    data = json.loads(chunk.read_text())
    if data.get("seed") != seed or data.get("fit_plans") != fit_plans:
        raise SystemExit(f"{chunk} was fitted with another --seed or --fit-plans.")
    fit.quality = dataclasses.replace(fit.quality, weights=data["weights"])
    fit.corrections.extend(data.get("corrections", []))


def _merge(chunks: list[Path], out: Path | None) -> int:
    """Joins chunk files of one run (same plans, seed and fitted weights) into one summary."""
    parts = [json.loads(path.read_text()) for path in chunks]
    first = parts[0]
    for part in parts[1:]:
        for key in ("plans_drawn", "fit_plans", "kinds", "seed", "weights"):
            if part.get(key) != first.get(key):
                raise SystemExit(f"{key} differs between {chunks[0]} and a later chunk: "
                                 f"{first.get(key)} vs {part.get(key)}.")
    rows = sorted((row for part in parts for row in part["rows"]), key=lambda r: r["index"])
    dense = next((part["stsb_dense"] for part in parts if "stsb_dense" in part), None)
    summary = _summary(rows, dense)
    keep = ("fit_plans", "kinds", "seed", "plans_drawn", "weights", "corrections",
            "quality_model_seconds", "singles_seconds", "latency_dense_ms")
    summary.update({"plans": len(rows), **{k: first[k] for k in keep if k in first},
                    "chunks": [{"file": str(p), "date": part.get("date")}
                               for p, part in zip(chunks, parts, strict=True)]})
    print(json.dumps({k: v for k, v in summary.items() if k != "corrections"}))
    if out:
        out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), **summary,
                                   "rows": rows}, indent=2) + "\n")
    return 0


def _summary(rows: list[dict[str, Any]], dense: float | None) -> dict[str, Any]:
    """Spearman of each quality model against measured losses; the latency model's MAPE."""
    measured = [r["measured_loss"] for r in rows]
    out: dict[str, Any] = {
        "spearman_cosine": round(spearman([r["predicted_loss"] for r in rows], measured), 3),
        "spearman_cosine_removal_costs": round(
            spearman([r["removal_cost_loss"] for r in rows], measured), 3)}
    if all("measured_ratio" in r for r in rows):
        errors = [abs(r["predicted_ratio"] - r["measured_ratio"]) / r["measured_ratio"]
                  for r in rows]
        out["latency_mape"] = round(float(np.mean(errors)), 4)
        out["latency_max_ape"] = round(float(np.max(errors)), 4)
    if dense is not None:
        drop = [dense - r["stsb_dev"] for r in rows]
        out["stsb_dense"] = round(dense, 2)
        out["spearman_stsb_drop"] = round(spearman([r["predicted_loss"] for r in rows], drop), 3)
        out["spearman_stsb_drop_removal_costs"] = round(
            spearman([r["removal_cost_loss"] for r in rows], drop), 3)
    return out


if __name__ == "__main__":
    sys.exit(main())
