"""Runs a Plan through the pass pipeline and emits the verified model, plan and report.

load ─▶ canonicalize ─▶ find blocks ─▶ choose heads/channels ─▶ passes ─▶ emit + verify
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx_ir.passes import Sequential
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

import planer
from planer.compiler import emit
from planer.compiler.blocks import find_blocks
from planer.compiler.calibration import (
    CalibrationSet,
    build_calibration,
    model_input_infos,
    random_feeds,
)
from planer.compiler.canonicalize import canonicalize
from planer.compiler.capture import main_output
from planer.compiler.driver.prune import (
    Selection,
    calibrated_selection,
    magnitude_selection,
    plan_for_flops,
)
from planer.compiler.errors import BadInputError
from planer.compiler.loading import has_external_data, load_model
from planer.compiler.plan import Plan, parse_plan
from planer.compiler.spec import ModelSpec, layer_flops, model_flops
from planer.cost_model.kernels import moe_lowering_costs, skip_layernorm_costs
from planer.passes import (
    ChannelPruningConfig,
    ChannelPruningPass,
    HeadPruningConfig,
    HeadPruningPass,
)
from planer.passes.ffn_to_moe import (
    apply_ffn_to_moe,
    choose_lowering,
    config_from_fits,
    kernel_fits,
)
from planer.passes.moe_fit import choose_moe_plans, fit_layers
from planer.passes.ort_kernels import OrtKernelsConfig, apply_ort_kernels
from planer.passes.prune_fit import capture_layers
from planer.passes.skim_fit import fit_predictors, skim_keep_for_flops, skim_report
from planer.passes.token_skim import TokenSkimConfig, apply_token_skim

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
ORT_KERNELS = ("auto", "on", "off")


@dataclasses.dataclass
class CompileResult:
    """What a compile wrote and measured."""

    model_path: Path
    plan: Plan
    report: dict[str, Any]


def read_model(path: Path) -> tuple[ir.Model, ModelSpec]:
    """Loads, canonicalizes and describes the model at `path`."""
    model = load_model(path)
    canonicalize(model)
    return model, find_blocks(model)


def read_canonical(path: Path) -> tuple[ir.Model, ModelSpec]:
    """Reads the model with every attention block re-emitted in planer's canonical form.

    All heads are kept, so outputs are unchanged; passes that follow head pruning (token
    skimming) can then be fitted or benchmarked on their own.
    """
    model, spec = read_model(path)
    apply_selection(model, spec, magnitude_selection(spec, Plan.neutral(spec)))
    ir.external_data.load_to_model(model)
    return model, find_blocks(model)


def apply_selection(model: ir.Model, spec: ModelSpec, selection: Selection) -> ir.Model:
    """Runs the rewrite pipeline on `model` in place."""
    stages = Sequential(
        # Heads first: the attention rewrite re-emits each block with constant per-layer
        # shapes, and reads weights through the spec before channel pruning swaps any.
        HeadPruningPass(spec, HeadPruningConfig(selection.heads, selection.head_output)),
        ChannelPruningPass(spec, ChannelPruningConfig(selection.channels,
                                                      selection.channel_output)),
        RemoveUnusedNodesPass(),
        TopologicalSortPass(),
    )
    stages(model)
    return model


def compile_plan(
    model_path: Path,
    out_dir: Path,
    *,
    plan_data: dict[str, Any] | None = None,
    target_flops: float | None = None,
    calibration: Path | None = None,
    tokenizer: Path | None = None,
    batch: int = 1,
    seq_len: int = 128,
    reconstruct: bool = True,
    method: str = "calibrated",
    passes: frozenset[str] = frozenset({"prune"}),
    target_runtime: str = "ort",
    threads: int = 1,
    ort_kernels: str = "auto",
    progress: Progress | None = None,
) -> CompileResult:
    """Compiles `model_path` to a plan (given, FLOPs-targeted, or neutral) and writes `out_dir`.

    With calibration data the kept heads/channels come from calibrated importance and
    the output projections are refit; without it, from weight magnitude. For the ort
    target, `ort_kernels` steers ORT's fusions (passes.ort_kernels): "auto" measures on
    this machine, at `threads`, whether to keep residual LayerNorms unfused.
    """
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    if plan_data is not None and target_flops is not None:
        raise BadInputError("give either --plan or --target-flops, not both.")
    if target_flops is not None and not 0.0 < target_flops <= 1.0:
        raise BadInputError(f"--target-flops must be in (0, 1], not {target_flops}.")
    if ort_kernels not in ORT_KERNELS:
        raise BadInputError(f"--ort-kernels must be one of {', '.join(ORT_KERNELS)}, "
                            f"not {ort_kernels!r}.")
    emit.check_output_location(model_path, out_dir)
    say(f"reading {model_path}")
    model, spec = read_model(model_path)
    plan = parse_plan(plan_data, spec) if plan_data is not None else Plan.neutral(spec)
    _require_calibration(plan, calibration, target_flops, passes)
    calib = None
    if calibration is not None or target_flops is not None:
        say("tokenizing calibration data")
        calib = build_calibration(calibration, model_input_infos(model), tokenizer=tokenizer,
                                  vocab_size=spec.vocab_size, seq_len=seq_len)
    plan, selection, fit_records = _choose(model, spec, plan, calib, target_flops, passes,
                                           batch=batch, seq_len=seq_len,
                                           reconstruct=reconstruct, method=method, say=say)
    say("rewriting layers")
    apply_selection(model, spec, selection)
    moe_info = skim_info = None
    if calib is not None and any(la.moe is not None for la in plan.layers):
        say("splitting FFNs into experts and fitting routers")
        moe_info = apply_moe(model, plan, calib, lowering=target_runtime, tokens=batch * seq_len,
                             threads=threads, measure=ort_kernels == "auto")
    if _skim_layers(plan):
        say("fitting skim predictors and removing skimmed tokens")
        skim_info = apply_skim(model, plan, calib, lowering=target_runtime)
    kernel_info = None
    if target_runtime == "ort" and ort_kernels != "off":
        say("choosing ORT kernels (timing fused vs unfused residual LayerNorm)"
            if ort_kernels == "auto" else "choosing ORT kernels")
        kernel_info = tune_ort_kernels(model, spec.hidden, tokens=batch * seq_len,
                                       threads=threads, measure=ort_kernels == "auto")
    report = build_report(spec, plan, selection, batch=batch, seq_len=seq_len, moe=moe_info)
    for layer, record in zip(report["layers"], fit_records, strict=False):
        layer.update({k: v for k, v in record.items() if k != "index"})
    report.update({k: v for k, v in (("moe", moe_info), ("skim", skim_info),
                                     ("ort_kernels", kernel_info)) if v is not None})
    if calib is not None:
        report["calibration"] = {"source": calib.source, "synthetic": calib.synthetic,
                                 "fit_samples": calib.num_samples(),
                                 "holdout_samples": calib.holdout_samples()}
    feeds = random_feeds(model_input_infos(model), batch=2, seq_len=min(seq_len, 16),
                         vocab_size=spec.vocab_size, seed=0)

    def measure(path: Path) -> dict[str, Any]:
        say("verifying against the original model")
        extra = _verify(model_path, path, feeds, calib, plan, skim_info)
        extra["compile_seconds"] = round(time.perf_counter() - started, 2)
        return extra

    say(f"writing {out_dir}")
    written = emit.write_outputs(
        model, out_dir,
        documents={"plan.json": plan.to_dict(), "report.json": report},
        external_data=has_external_data(model_path), feeds=feeds, before_commit=measure,
    )
    return CompileResult(model_path=out_dir / emit.MODEL_NAME, plan=plan,
                         report=written["report.json"])


def tune_ort_kernels(model: ir.Model, width: int, *, tokens: int, threads: int,
                     measure: bool = True) -> dict[str, Any]:
    """Runs passes.ort_kernels on `model`; with `measure`, only where this machine gains."""
    info: dict[str, Any] = {}
    unfuse = True
    if measure:
        choice = skip_layernorm_costs(width, tokens, threads)
        info["skip_layernorm"] = {"tokens": tokens, "threads": threads, **choice.to_dict()}
        unfuse = choice.unfuse
    info.update(apply_ort_kernels(model, OrtKernelsConfig(unfuse_skip_layernorm=unfuse)))
    RemoveUnusedNodesPass()(model)
    TopologicalSortPass()(model)
    return info


def _require_calibration(plan: Plan, calibration: Path | None, target_flops: float | None,
                         passes: frozenset[str]) -> None:
    moe_layers = [i for i, la in enumerate(plan.layers) if la.moe is not None]
    if calibration is None and (moe_layers or (target_flops is not None and "moe" in passes)):
        where = f"plan layer {moe_layers[0]} sets moe" if moe_layers else "--passes moe"
        raise BadInputError(f"{where}, whose routers are fitted on calibration data; pass "
                            "--calibration.")


def _choose(
    model: ir.Model, spec: ModelSpec, plan: Plan, calib: CalibrationSet | None,
    target_flops: float | None, passes: frozenset[str], *, batch: int, seq_len: int,
    reconstruct: bool, method: str, say: Progress,
) -> tuple[Plan, Selection, list[dict[str, Any]]]:
    """Settles the plan (FLOPs target) and which heads/channels each layer keeps."""
    if calib is not None and target_flops is not None and "moe" in passes:
        if passes != {"moe"}:
            raise BadInputError("--passes moe cannot be combined with other passes under "
                                "--target-flops yet; use --plan for mixed plans.")
        say("fitting experts and routers for every layer")
        plan = _plan_for_moe(model, spec, calib, target_flops, batch=batch, seq_len=seq_len)
        target_flops = None  # the plan is chosen; pruning keeps every head and channel
    _refuse_unsupported_mixes(plan)
    if calib is None:
        return plan, magnitude_selection(spec, plan), []
    say("capturing calibration activations")
    acts = capture_layers(model, spec, calib.batches)
    if target_flops is not None:
        plan = _plan_for_flops_passes(model, spec, calib, target_flops, passes, batch=batch,
                                      seq_len=seq_len, acts=acts, say=say)
    say("fitting kept units and refitting output projections")
    selection, records = calibrated_selection(model, spec, plan, calib, acts=acts,
                                              reconstruct=reconstruct, method=method)
    return plan, selection, records


def _verify(model_path: Path, path: Path, feeds: dict[str, np.ndarray],
            calib: CalibrationSet | None, plan: Plan,
            skim_info: dict[str, Any] | None) -> dict[str, Any]:
    """Measures the written model against the original: random inputs, then held-out data."""
    extra: dict[str, Any] = {"verification": compare_outputs(model_path, path, feeds)}
    if calib is not None and calib.holdout:
        extra["fidelity"] = fidelity(model_path, path, calib.holdout)
        if skim_info is not None:
            dense, _ = read_model(model_path)
            extra["skim"] = {**skim_info, **skim_report(
                dense, load_model(path), _skim_layers(plan), calib.holdout,
                num_layers=len(plan.layers))}
    return extra


def _refuse_unsupported_mixes(plan: Plan) -> None:
    moe = [i for i, la in enumerate(plan.layers) if la.moe is not None]
    if moe and _skim_layers(plan):
        raise BadInputError("a plan cannot combine moe and skim_keep yet; the skim pass "
                            "cannot read MoE layers.")


def apply_moe(model: ir.Model, plan: Plan, calib: CalibrationSet, *, lowering: str,
              tokens: int, threads: int = 1, measure: bool = False) -> dict[str, Any]:
    """Splits the planned FFNs into experts with fitted routers; returns per-layer quality.

    Runs after pruning, so experts split the pruned width. For the ort target with
    `measure`, layers that com.microsoft.MoE computes exactly (static top-k, relu or
    tanh-GELU) take whichever of it and the gather chain measured faster here at
    `tokens` and `threads`; the others, and every layer without `measure`, use gather.
    """
    wanted = {i: la.moe for i, la in enumerate(plan.layers) if la.moe is not None}
    spec = find_blocks(model)
    fitted = fit_layers(model, spec, calib, {i: p.experts for i, p in wanted.items()})
    config = config_from_fits(fitted, wanted, target=lowering, tokens=tokens)
    info = {f"layer{i}": fitted[i].quality(p).to_dict() for i, p in wanted.items()}
    if lowering == "ort":
        layers = dict(config.layers)
        for layer in spec.layers:
            moe = layers.get(layer.index)
            if moe is None:
                continue
            record = info[f"layer{layer.index}"]
            if measure and kernel_fits(layer.ffn.activation, moe.top_k):
                costs = moe_lowering_costs(layer.ffn.w1.in_features, layer.ffn.width,
                                           moe.experts.shape[0], int(moe.top_k or 0),
                                           layer.ffn.activation, tokens, threads)
                moe = layers[layer.index] = dataclasses.replace(moe, lowering=costs.lowering)
                record["lowering_us"] = {k: v for k, v in costs.to_dict().items()
                                         if k != "lowering"}
            # What the rewrite will emit, from the rule it uses.
            record["lowering"] = choose_lowering(layer.ffn, moe, config)
        config = dataclasses.replace(config, layers=layers)
    apply_ffn_to_moe(model, spec, config)
    RemoveUnusedNodesPass()(model)
    TopologicalSortPass()(model)
    return info


def _plan_for_flops_passes(
    model: ir.Model, spec: ModelSpec, calib: CalibrationSet, target: float,
    passes: frozenset[str], *, batch: int, seq_len: int, acts: Any, say: Progress,
) -> Plan:
    """Splits a FLOPs target between the allowed passes and plans each part.

    With both prune and skim, each gets the square root of the target, so their product
    (they compose multiplicatively on layer FLOPs) meets it.
    """
    prune_part = skim_part = None
    if "prune" in passes and "skim" in passes:
        prune_part = skim_part = target ** 0.5
    elif "skim" in passes:
        skim_part = target
    else:
        prune_part = target
    plan = Plan.neutral(spec)
    if prune_part is not None:
        say(f"allocating heads and channels for {prune_part:.2f} of the FLOPs")
        plan = plan_for_flops(model, spec, calib, prune_part, batch=batch, seq_len=seq_len,
                              acts=acts)
    if skim_part is not None:
        say(f"choosing skim ratios for {skim_part:.2f} of the FLOPs")
        ratios = skim_keep_for_flops(spec, skim_part, seq_len=seq_len, batch=batch)
        plan = Plan(tuple(dataclasses.replace(la, skim_keep=r)
                          for la, r in zip(plan.layers, ratios, strict=True)))
    return plan


def _plan_for_moe(model: ir.Model, spec: ModelSpec, calib: CalibrationSet, target: float, *,
                  batch: int, seq_len: int) -> Plan:
    """Picks per-layer MoE settings meeting a FLOPs target where they pay (moe_fit)."""
    experts = {layer.index: 8 for layer in spec.layers if layer.ffn.width % 8 == 0}
    fitted = fit_layers(model, spec, calib, experts)
    chosen, _ = choose_moe_plans(spec, fitted, target_flops=target, batch=batch,
                                 seq_len=seq_len)
    return Plan(tuple(dataclasses.replace(la, moe=chosen.get(i))
                      for i, la in enumerate(Plan.neutral(spec).layers)))


def _skim_layers(plan: Plan) -> list[int]:
    return [i for i, la in enumerate(plan.layers) if la.skim_keep is not None and la.skim_keep < 1]


def apply_skim(model: ir.Model, plan: Plan, calib: CalibrationSet | None, *,
               lowering: str) -> dict[str, Any]:
    """Skims tokens where the plan says, with fitted predictors when calibration exists.

    Runs after pruning (it reads the re-emitted attention). Returns predictor fit records.
    """
    layers = _skim_layers(plan)
    spec = find_blocks(model)
    if 0 in layers and calib is None:
        raise BadInputError("skim_keep before layer 0 needs a fitted predictor (there is no "
                            "earlier attention to score tokens by); pass --calibration.")
    predictors: dict[int, Any] = {}
    records: dict[str, Any] = {}
    if calib is not None:
        fit = fit_predictors(model, spec, layers, calib.batches)
        predictors = dict(fit.predictors)
        records = {f"layer{i}": {"mse_before": round(fit.train_loss[i][0], 4),
                                 "mse_after": round(fit.train_loss[i][1], 4),
                                 "mse_holdout": round(fit.holdout_loss[i], 4)}
                   for i in layers}
    config = TokenSkimConfig.from_plan([la.skim_keep for la in plan.layers],
                                       predictors=predictors, lowering=lowering)
    apply_token_skim(model, spec, config)
    return {"predictors": records, "score": "fitted" if predictors else "attention",
            "lowering": lowering}


def build_report(
    spec: ModelSpec, plan: Plan, selection: Selection, *, batch: int, seq_len: int,
    moe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Builds report.json's static part: the plan as applied, params and FLOPs."""
    flops_before = model_flops(spec, batch=batch, seq_len=seq_len)
    flops_after = 2 * batch * seq_len * spec.other_matmul_macs_per_token
    params_removed = 0
    layers = []
    tokens = float(seq_len)
    for layer, choice in zip(spec.layers, plan.layers, strict=True):
        a, f = layer.attention, layer.ffn
        if choice.skim_keep is not None:
            tokens *= choice.skim_keep  # cumulative: a skimmed token never comes back
        ffn = float(choice.ffn)
        if choice.moe is not None:  # each token runs only its experts (router cost aside)
            per_token = (moe or {}).get(f"layer{layer.index}", {}).get("experts_per_token")
            ffn *= (per_token or choice.moe.top_k or choice.moe.experts) / choice.moe.experts
        flops_after += layer_flops(hidden=spec.hidden, heads=choice.heads, head_size=a.head_size,
                                   ffn=round(ffn), batch=batch, seq_len=max(1, round(tokens)))
        inner_removed = (a.heads - choice.heads) * a.head_size
        params_removed += inner_removed * (4 * spec.hidden + 3)
        params_removed += (f.width - choice.ffn) * (2 * spec.hidden + 1)
        layers.append({
            "index": layer.index,
            "heads": {"before": a.heads, "after": choice.heads,
                      "kept": list(selection.heads[layer.index])},
            "ffn": {"before": f.width, "after": choice.ffn},
            **({"skim_keep": choice.skim_keep} if choice.skim_keep is not None else {}),
            **({"moe": choice.moe.to_dict()} if choice.moe is not None else {}),
        })
    return {
        "tool": "planer",
        "version": planer.__version__,
        "batch": batch,
        "seq_len": seq_len,
        "selection": selection.method,
        "plan": plan.to_dict(),
        "layers": layers,
        "params_before": spec.total_params,
        "params_after": spec.total_params - params_removed,
        "flops_before": flops_before,
        "flops_after": flops_after,
        "flops_ratio": round(flops_after / flops_before, 4),
    }


def compare_outputs(original: Path, compiled: Path, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """Runs both models on `feeds` in ORT (optimizations off) and compares every output."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    results = []
    for path in (original, compiled):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        results.append(session.run(None, feeds))
    max_abs, cosines = 0.0, []
    for a, b in zip(*results, strict=True):
        a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        max_abs = max(max_abs, float(np.max(np.abs(a64 - b64))) if a64.size else 0.0)
        denom = np.linalg.norm(a64) * np.linalg.norm(b64)
        cosines.append(float(a64 @ b64 / denom) if denom else 1.0)
    return {"inputs": "random", "max_abs_diff": max_abs, "min_cosine": min(cosines)}


def fidelity(
    original: Path, compiled: Path, batches: list[dict[str, np.ndarray]]
) -> dict[str, Any]:
    """Compares the compiled model's outputs with the original's on held-out batches.

    Hidden-state outputs [B, S, D]: cosine per real token and of mean-pooled sequences.
    Logit outputs [B, C]: cosine per row and top-1 agreement. Means and 5th percentiles.
    """
    options = ort.SessionOptions()
    sessions = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                for p in (original, compiled)]
    names = {i.name for i in sessions[0].get_inputs()}
    result_name = main_output(sessions[0].get_outputs())
    token_cos, pooled_cos, agree = [], [], []
    for feed in batches:
        feed = {k: v for k, v in feed.items() if k in names}
        a, b = (s.run([result_name], feed)[0].astype(np.float64) for s in sessions)
        if a.ndim == 3:
            mask = feed.get("attention_mask", np.ones(a.shape[:2])).astype(bool)
            token_cos.extend(_cos(a[mask], b[mask]))
            weights = mask[..., None].astype(np.float64)
            pooled_cos.extend(_cos((a * weights).sum(1), (b * weights).sum(1)))
        else:
            pooled_cos.extend(_cos(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)))
            if a.ndim == 2:
                agree.extend((a.argmax(-1) == b.argmax(-1)).tolist())
    result: dict[str, Any] = {"holdout_samples": sum(len(next(iter(f.values()))) for f in batches)}
    for key, values in (("token_cosine", token_cos), ("pooled_cosine", pooled_cos)):
        if values:
            result[key] = {"mean": round(float(np.mean(values)), 5),
                           "p5": round(float(np.percentile(values, 5)), 5)}
    if agree:
        result["top1_agreement"] = round(float(np.mean(agree)), 5)
    return result


def _cos(a: np.ndarray, b: np.ndarray) -> list[float]:
    num = np.sum(a * b, axis=-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (num / np.where(den == 0, 1.0, den)).tolist()
