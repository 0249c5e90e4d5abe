"""Measures how well the search's quality model ranks real mixed plans (issue 16).

    calibration (SST-2 train) ─▶ measured single-change losses (cost_model.quality, probe on
    the fitting share) ─▶ interaction weights fitted on --fit-plans compiled plans
    ─▶ --plans other random mixed plans (heads, FFN width, dynamic INT8, MoE, one skim
    point), each compiled ─▶ predicted loss vs measured loss

Measured loss is 1 − mean pooled cosine to the dense model on the held-out calibration
share (the compile's report, never used for fitting or for the weights) and, with
--stsb, the STS-B dev drop (benchmarks.quality). The removal-cost model the search used
before (cost_model.search.Quality: removal costs + INT8 block costs, blind to MoE and
skim) is scored on the same plans. Run under the shared lock, one thread:

    flock /tmp/bench.lock env OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_quality_model \
        --plans 12 --stsb --out benchmarks/results/quality-model-minilm.json
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
from planer.compiler.driver.pipeline import compile_plan, load_fitting, read_model
from planer.compiler.driver.planning import MOE_SEARCH, activations, measure_quality, skim_points
from planer.compiler.plan import INT8_BLOCKS, Int8Plan, LayerPlan, Plan
from planer.compiler.spec import ModelSpec
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
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    kinds = set(args.kinds.split(","))
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
    fit.correct([random_plan(spec, rng, kinds) for _ in range(args.fit_plans)], spec)
    model_s = time.perf_counter() - started
    print(json.dumps({"weights": fit.quality.weights, "singles_s": round(singles_s, 1),
                      "model_s": round(model_s, 1)}), flush=True)
    old = Quality(importance(spec, activations(fitting, model, spec, print)),
                  measure_int8_costs(model, spec, fitting.calib.batches))
    rows = []
    for _ in range(args.plans):
        plan = random_plan(spec, rng, kinds)
        path = compile_one(plan)
        report = next(r for r in results.values() if r.model_path == path).report
        row = {"plan": plan.to_dict()["layers"],
               "predicted_loss": round(sum(fit.quality.layer_loss(i, la)
                                           for i, la in enumerate(plan.layers)), 6),
               "removal_cost_loss": round(predicted_loss(spec, old, _prune_int8(plan)), 6),
               "measured_loss": round(1.0 - report["fidelity"]["pooled_cosine"]["mean"], 6)}
        if args.stsb:
            from benchmarks.quality import stsb_spearman

            row["stsb_dev"] = round(stsb_spearman(path, tok, threads=1), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = _summary(rows, src, tok, args.stsb)
    summary.update({"plans": len(rows), "fit_plans": args.fit_plans, "kinds": sorted(kinds),
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


def _summary(rows: list[dict[str, Any]], src: Path, tok: Path, stsb: bool) -> dict[str, Any]:
    measured = [r["measured_loss"] for r in rows]
    out: dict[str, Any] = {
        "spearman_cosine": round(spearman([r["predicted_loss"] for r in rows], measured), 3),
        "spearman_cosine_removal_costs": round(
            spearman([r["removal_cost_loss"] for r in rows], measured), 3)}
    if stsb:
        from benchmarks.quality import stsb_spearman

        dense = stsb_spearman(src, tok, threads=1)
        drop = [dense - r["stsb_dev"] for r in rows]
        out["stsb_dense"] = round(dense, 2)
        out["spearman_stsb_drop"] = round(spearman([r["predicted_loss"] for r in rows], drop), 3)
        out["spearman_stsb_drop_removal_costs"] = round(
            spearman([r["removal_cost_loss"] for r in rows], drop), 3)
    return out


if __name__ == "__main__":
    sys.exit(main())
