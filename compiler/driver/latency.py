"""Compiles a model to a latency target: profile, predict, search, compile, measure, tighten.

    block curves (stored) + anchor plans (timed now) ─▶ latency model ─┐
    calibration ─▶ measured quality model (planning.latency_quality) ──┴▶ plan for budget
        ─▶ compile ─▶ measure ─▶ budget × target / measured (tighten or relax) ─▶ again

Each round's compiled model is timed against the original in interleaved rounds in one
process; its latency is that ratio times the dense latency measured when profiling, so a
busy machine, which slows both models alike, does not move the verdict. The loop keeps
the slowest candidate that meets the target (the least pruned, so the best quality) and
stops when one lands within 5% under the target or after `max_rounds`. When none meets
it, the fastest model found is written under a name that says so and the CLI exits 3.

report.json's `phases` gives the wall seconds of each phase (report.PhaseClock): the
stored block curves, the anchors compiled and timed, calibration, activations, the
quality model and the plans compiled for it, the rounds' compiles and measurements.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from planer.compiler import emit, outdir
from planer.compiler.calibration import DEFAULT_SAMPLES
from planer.compiler.driver.anchors import (
    anchor_plans,
    compile_anchors,
    kernel_spelling,
    model_digest,
    open_sessions,
    time_anchors,
)
from planer.compiler.driver.compilation import CompileOptions, check_calibration_samples
from planer.compiler.driver.fit_cache import feeds_digest
from planer.compiler.driver.pipeline import (
    CompileResult,
    compile_plan,
    load_fitting,
    read_model,
    report_pages,
)
from planer.compiler.driver.planning import activations, latency_quality
from planer.compiler.driver.report import PhaseClock, search_section
from planer.compiler.driver.round_cache import compile_round
from planer.compiler.errors import BadInputError, TargetUnreachableError
from planer.compiler.gated_ffn import require_gated_support
from planer.compiler.loading import check_sequence_length, load_model
from planer.compiler.plan import Int8Plan, LayerPlan, Plan
from planer.compiler.progress import as_progress
from planer.compiler.spec import ModelSpec
from planer.compiler.support import require_supported
from planer.cost_model import variants
from planer.cost_model.int8_cost import INT8_MODE
from planer.cost_model.kernels import KernelTimings
from planer.cost_model.latency import (
    LatencyModel,
    anchor,
    fit_latency_model,
    held_out_error,
)
from planer.cost_model.profile import BlockShape, Measurement, ProfileStore, profile_blocks
from planer.cost_model.profile_int8 import profile_int8_blocks
from planer.cost_model.search import floor_plan, plan_for_latency, predicted_loss, search
from planer.cost_model.timing import (
    Timing,
    ratios,
    time_interleaved,
)

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
CLOSE_ENOUGH = 0.95  # a candidate this close under the target stops the search


@dataclasses.dataclass
class Round:
    """One compile-and-measure round of the search."""

    budget_ms: float
    predicted_ms: float
    measured_ms: float
    plan: Plan
    folder: Path
    result: CompileResult
    raw_ms: dict[str, float]  # this round's medians (dense and compiled), before normalising
    cached: bool = False  # compiled by an earlier compile (round_cache) or the quality fit


def profile_model(
    model_path: Path, *, batch: int, seq_len: int, threads: int, refresh: bool = False,
    ort_kernels: str = "auto", progress: Progress | None = None,
    kernels: KernelTimings | None = None, clock: PhaseClock | None = None,
) -> tuple[LatencyModel, dict[str, Any]]:
    """Profiles the model's block variants and fits its latency model; returns both.

    Stored block curves give the shapes; the level comes from whole models compiled as
    every plan will be and timed now, interleaved with the original (latency.anchor):
    every layer at all its units, at a quarter of its heads, at a quarter of its FFN
    width, and the same in INT8 where INT8 was profiled (`anchor_plans`); the fit's
    overhead is embeddings, LayerNorms and everything else outside the blocks.
    """
    say = progress or (lambda _msg: None)
    clock = clock or PhaseClock()
    with clock.phase("block_profile"):
        _, spec = read_model(model_path)
        measured, int8, store = block_profile(spec, batch=batch, seq_len=seq_len,
                                              threads=threads, refresh=refresh,
                                              progress=progress)
    plans = anchor_plans(spec, int8)
    say(f"{len(plans)} anchor plans (float and INT8; all, fewer heads, narrower; compiled "
        "once, cached)")
    with clock.phase("anchors_compile"):
        paths = compile_anchors(model_path, plans, hidden=spec.hidden, batch=batch,
                                seq_len=seq_len, threads=threads, ort_kernels=ort_kernels,
                                kernels=kernels or KernelTimings())
    say("timing the dense model and the anchor plans")
    with clock.phase("anchors_timing"):
        timings = time_anchors({"dense": model_path, **paths}, batch=batch, seq_len=seq_len,
                                threads=threads, vocab=spec.vocab_size)
    # Per-round ratios to the original times its median, as every round's verdict is
    # measured: a burst of load that hits part of the rounds divides out.
    times = {name: ratio * timings["dense"].median_ms
             for name, ratio in ratios(timings, "dense").items()}
    stored = fit_latency_model(measured["attn"], measured["ffn"], times["neutral"],
                               plans["neutral"], int8=int8)
    latency = anchor(stored, [(plan, times[name]) for name, plan in plans.items()])
    info = {"device": store.device, "store": str(store.path), "dense_ms": round(times["dense"], 3),
            "anchors_ms": {k: round(v, 3) for k, v in times.items()},
            "neutral_ms": round(times["neutral"], 3),
            "overhead_ms": round(latency.overhead_ms, 3),
            "stored_scale": {k: round(v, 4) for k, v in latency.scales.items()},
            "block_mape": {"attn": round(held_out_error(measured["attn"]), 4),
                           "ffn": round(held_out_error(measured["ffn"]), 4)},
            "points": {k: [(m.units, round(m.median_ms, 4)) for m in v]
                       for k, v in {**measured, **int8}.items()}}
    return latency, info


def block_profile(
    spec: ModelSpec, *, batch: int, seq_len: int, threads: int, refresh: bool,
    progress: Progress | None,
) -> tuple[dict[str, list[Measurement]], dict[str, list[Measurement]], ProfileStore]:
    """Times (or reads from the store) float and INT8 block variants on the model's grid."""
    attn, ffn = spec.layers[0].attention, spec.layers[0].ffn
    if any(la.attention.head_size != attn.head_size or la.attention.heads != attn.heads
           or la.ffn.width != ffn.width for la in spec.layers):
        raise BadInputError("layers of different sizes are not supported by the latency "
                            "search yet; pass --plan or --target-flops instead.")
    shape = BlockShape(batch=batch, tokens=seq_len, hidden=spec.hidden,
                       head_size=attn.head_size, threads=threads)
    store = ProfileStore(threads)
    heads = list(range(attn.heads + 1))
    step = max(1, ffn.width // 16)
    channels = sorted({*range(0, ffn.width + 1, step), ffn.width})
    (progress or (lambda _msg: None))("profiling block variants (stored ones are reused)")
    measured = profile_blocks(shape, heads, channels, store=store, refresh=refresh,
                              progress=progress, gated=ffn.gated)
    # INT8 beside float, so the search sees where INT8 pays on this machine. Not for
    # gated FFNs, which INT8 cannot rewrite yet (compiler.gated_ffn): the search keeps
    # them float.
    int8 = {} if ffn.gated else profile_int8_blocks(shape, heads, channels, store=store,
                                                    refresh=refresh, progress=progress)
    return measured, int8, store


def measure_ms(
    models: dict[str, Path], *, batch: int, seq_len: int, threads: int, vocab: int | None,
    repeats: int = 20,
) -> dict[str, float]:
    """Times models interleaved in one process (ORT, all optimizations); median ms each."""
    timings = _time_models(models, batch=batch, seq_len=seq_len, threads=threads, vocab=vocab,
                           repeats=repeats)
    return {name: t.median_ms for name, t in timings.items()}


def _time_models(
    models: dict[str, Path], *, batch: int, seq_len: int, threads: int, vocab: int | None,
    repeats: int,
) -> dict[str, Timing]:
    """Runs the models in interleaved rounds on one set of random inputs."""
    sessions, feeds = open_sessions(models, batch=batch, seq_len=seq_len, threads=threads,
                                    vocab=vocab)
    return time_interleaved(sessions, feeds, warmup=3, repeats=repeats)


def compile_to_latency(
    model_path: Path, out_dir: Path, *, target_ms: float | None = None,
    target_fraction: float | None = None, calibration: Path | None,
    tokenizer: Path | None, batch: int, seq_len: int, threads: int, refresh: bool = False,
    max_rounds: int = 4, ort_kernels: str = "auto", progress: Progress | None = None,
    recover_seconds: float | None = None, recover_steps: int | None = None,
    passes: frozenset[str] = frozenset({"prune", "int8"}),
    calibration_samples: int = DEFAULT_SAMPLES,
) -> CompileResult:
    """Compiles the model so its measured median latency meets the target.

    The target is `target_ms`, or `target_fraction` of the dense model's latency as
    measured here at the start. `passes` are the variant kinds the search may use
    (prune, int8, moe, skim; INT8, when named, wherever it pays here).

    Raises:
        TargetUnreachableError: no candidate met the target; the fastest one was written.
    """
    say = progress or (lambda _msg: None)
    amount = target_ms if target_ms is not None else target_fraction
    if amount is None or not math.isfinite(amount) or amount <= 0 \
            or (target_fraction is not None and target_fraction > 1):
        raise BadInputError("--target-latency must be a positive time, or a fraction in "
                            "(0, 1] of the dense latency.")
    # Before profiling or calibrating: a --seq-len past the position table is refused now.
    check_calibration_samples(calibration_samples)
    check_sequence_length(load_model(model_path), seq_len)
    with emit.claim_output(model_path, out_dir):
        return _compile_to_latency(
            model_path, out_dir, amount=amount, target_ms=target_ms,
            target_fraction=target_fraction, calibration=calibration, tokenizer=tokenizer,
            batch=batch, seq_len=seq_len, threads=threads, refresh=refresh,
            max_rounds=max_rounds, ort_kernels=ort_kernels, say=say,
            recover_seconds=recover_seconds, recover_steps=recover_steps, passes=passes,
            calibration_samples=calibration_samples)


def _compile_to_latency(
    model_path: Path, out_dir: Path, *, amount: float, target_ms: float | None,
    target_fraction: float | None, calibration: Path | None, tokenizer: Path | None,
    batch: int, seq_len: int, threads: int, refresh: bool, max_rounds: int, ort_kernels: str,
    say: Progress, recover_seconds: float | None, recover_steps: int | None,
    passes: frozenset[str], calibration_samples: int,
) -> CompileResult:
    progress = say
    if (recover_seconds or recover_steps) and calibration is None:
        raise BadInputError("--recover distils the original model on calibration text; pass "
                            "--calibration.")
    kernels = KernelTimings()  # every compile below times each kernel shape once
    clock = PhaseClock()  # report.json's `phases`
    latency, profile = profile_model(model_path, batch=batch, seq_len=seq_len, threads=threads,
                                     refresh=refresh, ort_kernels=ort_kernels, progress=say,
                                     kernels=kernels, clock=clock)
    if target_ms is None:
        target_ms = amount * profile["dense_ms"]
        say(f"target: {target_fraction:.0%} of the dense {profile['dense_ms']:.1f} ms = "
            f"{target_ms:.1f} ms")
    model, spec = read_model(model_path)
    require_supported(spec)
    require_gated_support(spec, passes=passes)
    # One fitting for every round: each round compiles another plan of the same model.
    options = CompileOptions(calibration=calibration, tokenizer=tokenizer, batch=batch,
                             seq_len=seq_len, calibration_samples=calibration_samples)
    with clock.phase("calibration"):
        fitting = load_fitting(model, spec, dataclasses.replace(options, target_flops=1.0),
                               say)
    assert fitting is not None
    out_dir.mkdir(parents=True, exist_ok=True)
    # Inside OUT and named after this process, so a killed search is cleaned up by the
    # next planer that opens OUT.
    scratch = outdir.staging_folder(out_dir, kind="search")
    rounds: list[Round] = []
    dense_ms = profile["dense_ms"]
    # Plans the quality model compiled, which a round asking for the same plan reuses (a
    # round compiles as they do when there is calibration data: on the same fitting).
    compiled: dict[Plan, CompileResult] = {}
    # What decides a compiled plan besides the plan (round_cache): earlier compiles' plans
    # are copied rather than compiled again.
    compile_key = {"model": model_digest(model_path), "batch": batch, "seq_len": seq_len,
               "threads": threads, "ort_kernels": ort_kernels,
               "spelling": kernel_spelling(ort_kernels, kernels, hidden=spec.hidden,
                                           tokens=batch * seq_len, threads=threads)}
    fitted = feeds_digest([*fitting.calib.batches, *fitting.calib.holdout])

    def compile_cached(plan: Plan, folder: Path, fit: Any) -> tuple[CompileResult, bool]:
        def compile_into(into: Path) -> CompileResult:
            return compile_plan(model_path, into, plan_data=plan.to_dict(),
                                calibration=calibration, tokenizer=tokenizer, batch=batch,
                                seq_len=seq_len, threads=threads, ort_kernels=ort_kernels,
                                fitting=fit, kernels=kernels,
                                calibration_samples=calibration_samples)

        key = {**compile_key, "calibration": fitted if fit is not None else None}
        return compile_round(plan, folder, key=key, compile_into=compile_into)

    def measure_plan(plan: Plan) -> Path:  # the quality model's whole-plan measurements
        folder = scratch / f"quality{len(list(scratch.glob('quality*')))}"
        with clock.phase("quality_plans_compile"):
            compiled[plan], _ = compile_cached(plan, folder, fitting)
        return compiled[plan].model_path

    def predict(plan: Plan) -> float:  # MoE layers and skim points included
        return variants.predict(latency, spec, plan)

    try:
        with clock.phase("activations"):
            activations(fitting, model, spec, say)
        with clock.phase("quality_model"):
            fit = latency_quality(model, spec, fitting, latency, target_ms=target_ms,
                                  batch=batch, passes=passes, measure_plan=measure_plan,
                                  progress=say)
        scores = fit.quality
        budget = target_ms
        if predict(floor_plan(spec)) > target_ms:
            say("the target is below the predicted floor; measuring the fastest plan")
            budget = 0.0
        rounds_bar = as_progress(progress).bar("latency rounds", max_rounds)
        for k in range(max_rounds):
            plan = plan_for_latency(spec, scores, latency, budget, kinds=passes)
            seen = [r.plan for r in rounds]
            while plan in seen and budget > 0:
                budget *= 0.95  # the last budget changed nothing: step a little further
                plan = plan_for_latency(spec, scores, latency, budget, kinds=passes)
            if plan in seen:
                break
            say(f"round {k + 1}: compiling a plan predicted at {predict(plan):.1f} ms")
            folder = scratch / f"round{k}"
            with clock.phase("rounds_compile"):
                if calibration is not None and plan in compiled:
                    result, cached = compiled[plan], True
                    folder = result.model_path.parent
                else:
                    result, cached = compile_cached(
                        plan, folder, fitting if calibration is not None else None)
            say(f"round {k + 1}: measuring against the dense model")
            with clock.phase("rounds_measure"):
                ratio, raw = measure_ratio(model_path, result.model_path, batch=batch,
                                           seq_len=seq_len, threads=threads,
                                           vocab=spec.vocab_size)
            # Interleaved ratio x the dense reference: a busy machine slows both alike.
            measured = ratio * dense_ms
            rounds.append(Round(budget, predict(plan), measured, plan, folder, result,
                                raw, cached))
            rounds_bar.advance(measured_ms=round(measured, 2), target_ms=round(target_ms, 2))
            logger.info("round %d: budget %.2f predicted %.2f measured %.2f (ratio %.3f)", k,
                        budget, predict(plan), measured, ratio)
            if measured <= target_ms and measured >= CLOSE_ENOUGH * target_ms:
                break
            if measured > target_ms and plan == floor_plan(spec):
                break
            budget = next_budget(rounds, target_ms)
        rounds_bar.close()
        if recover_seconds or recover_steps:
            # Once, on the plan the rounds settled on: training changes weights only, so
            # the latency measured for that plan still holds.
            best = _chosen(rounds, target_ms)
            with clock.phase("recover"):
                result = compile_plan(
                    model_path, scratch / "recovered", plan_data=best.plan.to_dict(),
                    calibration=calibration, tokenizer=tokenizer, batch=batch,
                    seq_len=seq_len, threads=threads, ort_kernels=ort_kernels,
                    fitting=fitting if calibration is not None else None,
                    recover_seconds=recover_seconds, recover_steps=recover_steps,
                    progress=say, kernels=kernels, calibration_samples=calibration_samples)
            rounds[rounds.index(best)] = dataclasses.replace(
                best, folder=scratch / "recovered", result=result)
        settled = _chosen(rounds, target_ms)
        section = search_section(
            spec, scores, latency, search(spec, scores, latency, settled.budget_ms, kinds=passes),
            kinds=passes, corrections=fit.corrections)
        return _finish(rounds, out_dir, target_ms, profile, spec, scores, model_path,
                       extra={"search": section, "phases": clock.to_dict()})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def next_budget(rounds: list[Round], target_ms: float) -> float:
    """Returns the next round's budget: relaxed or tightened from what was measured.

    From the last round alone, its budget (or its prediction, if higher) times target /
    measured: after a budget of 0 (the floor predicted above the target) a floor measured
    far under the target means the latency model runs slow here (stored block timings
    from a quieter or busier machine than now), and the search must come back up rather
    than stop there. Once one plan has missed the target and another met it with more
    than the 5% to spare, the answer lies between their predictions: the next budget is
    where the line through their (predicted, measured) points reaches the middle of the
    window a round stops in (regula falsi). The rule from the last round alone can step
    back next to a plan that already missed, a round measured for nothing.
    """
    last = rounds[-1]
    budget = max(last.budget_ms, last.predicted_ms) * target_ms / last.measured_ms
    missed = [r for r in rounds if r.measured_ms > target_ms]
    fast = [r for r in rounds if r.measured_ms < CLOSE_ENOUGH * target_ms]
    if not missed or not fast:
        return budget
    hi = min(missed, key=lambda r: r.predicted_ms)
    lo = max(fast, key=lambda r: r.predicted_ms)
    if not (lo.predicted_ms < hi.predicted_ms and lo.measured_ms < hi.measured_ms):
        return budget  # the measurements contradict the predictions' order
    aim = (1 + CLOSE_ENOUGH) / 2 * target_ms
    share = (aim - lo.measured_ms) / (hi.measured_ms - lo.measured_ms)
    return lo.predicted_ms + share * (hi.predicted_ms - lo.predicted_ms)


def measure_ratio(
    dense: Path, compiled: Path, *, batch: int, seq_len: int, threads: int, vocab: int | None,
    repeats: int = 30,
) -> tuple[float, dict[str, float]]:
    """Times compiled against dense interleaved; returns the median per-round ratio and medians."""
    timings = _time_models({"dense": dense, "compiled": compiled}, batch=batch,
                           seq_len=seq_len, threads=threads, vocab=vocab, repeats=repeats)
    medians = {name: t.median_ms for name, t in timings.items()}
    return ratios(timings, "dense")["compiled"], medians


def _chosen(rounds: list[Round], target_ms: float) -> Round:
    """The slowest round meeting the target (least pruned), else the fastest one."""
    meeting = [r for r in rounds if r.measured_ms <= target_ms]
    if meeting:
        return max(meeting, key=lambda r: r.measured_ms)
    return min(rounds, key=lambda r: r.measured_ms)


def _finish(rounds: list[Round], out_dir: Path, target_ms: float, profile: dict[str, Any],
            spec: Any, scores: Any, model_path: Path,
            extra: dict[str, Any] | None = None) -> CompileResult:
    meeting = [r for r in rounds if r.measured_ms <= target_ms]
    chosen = _chosen(rounds, target_ms)
    dense_ms = profile["dense_ms"]
    summary = {
        "target_ms": round(target_ms, 3), "baseline_ms": round(dense_ms, 3),
        "measured_ms": round(chosen.measured_ms, 3),
        "speedup": round(dense_ms / chosen.measured_ms, 3),
        "predicted_ms": round(chosen.predicted_ms, 3), "target_met": bool(meeting),
        "predicted_loss": round(predicted_loss(spec, scores, chosen.plan), 5),
        "latency_model": {k: v for k, v in profile.items() if k != "points"},
        "rounds": [{"budget_ms": round(r.budget_ms, 3), "predicted_ms": round(r.predicted_ms, 3),
                    "measured_ms": round(r.measured_ms, 3),
                    "raw_medians_ms": {k: round(v, 3) for k, v in r.raw_ms.items()},
                    "predicted_loss": round(predicted_loss(spec, scores, r.plan), 5),
                    "compiled_before": r.cached,
                    "pooled_cosine": r.result.report.get("fidelity", {}).get(
                        "pooled_cosine", {}).get("mean")} for r in rounds],
        **(extra or {}),
    }
    report = {**chosen.result.report, **summary}
    name = emit.MODEL_NAME if meeting else emit.UNREACHABLE_NAME
    _move_outputs(chosen.folder, out_dir, name, report, source=model_path)
    result = CompileResult(model_path=out_dir / name, plan=chosen.plan, report=report)
    if not meeting:
        floor = floor_plan(spec) == chosen.plan
        why = ("with every attention head and FFN channel removed, the floor of head and "
               "channel pruning (embeddings, norms and residual adds remain)"
               if floor else f"after {len(rounds)} rounds of tightening")
        raise TargetUnreachableError(
            f"the target of {target_ms:.1f} ms is out of reach: the fastest model found runs "
            f"in {chosen.measured_ms:.1f} ms (dense {dense_ms:.1f} ms) {why}; it was written "
            f"to {out_dir / name}.", result)
    return result


def _move_outputs(folder: Path, out_dir: Path, name: str, report: dict[str, Any], *,
                  source: Path) -> None:
    """Commits a verified round's files into OUT as one unit, the model renamed `name`.

    emit.commit_folder replaces planer's whole earlier set, so a model left under the other
    name by an earlier run does not stay beside a report that no longer describes it.
    """
    emit.commit_folder(folder, out_dir, model_name=name, report=report,
                       pages=report_pages(source))


def validate_latency_model(
    model_path: Path, models: LatencyModel | Mapping[str, LatencyModel], dense_ms: float, *,
    batch: int, seq_len: int, threads: int, samples: int = 12, seed: int = 0,
    repeats: int = 60, progress: Progress | None = None,
) -> dict[str, Any]:
    """Scores latency models on random mixed plans none of them was anchored on.

    Each plan draws per layer a head count, an FFN width on the profiled grid and the
    INT8 blocks (none, attention, FFN or both). The plans are compiled, timed in one
    interleaved run with the original, and each model's predicted ratio
    (prediction / `dense_ms`, the dense latency its anchors were timed beside) is scored
    against the measured median per-round ratio.

    Returns:
        {"mape": {model name: MAPE}, "models": one row per plan}; a single LatencyModel
        is named "model".
    """
    say = progress or (lambda _msg: None)
    named = {"model": models} if isinstance(models, LatencyModel) else dict(models)
    _, spec = read_model(model_path)
    rng = np.random.default_rng(seed)
    plans = {f"m{i}": random_plan(spec, rng) for i in range(samples)}
    kernels = KernelTimings()
    with tempfile.TemporaryDirectory(prefix="planer-validate-") as scratch:
        paths = {}
        for i, (name, plan) in enumerate(plans.items()):
            say(f"compiling validation model {i + 1}/{samples}")
            paths[name] = compile_plan(model_path, Path(scratch) / name,
                                       plan_data=plan.to_dict(), batch=batch, seq_len=seq_len,
                                       threads=threads, kernels=kernels).model_path
        say("timing validation models against the original, interleaved")
        timings = _time_models({"dense": model_path, **paths}, batch=batch, seq_len=seq_len,
                               threads=threads, vocab=spec.vocab_size, repeats=repeats)
    measured = ratios(timings, "dense")
    rows = [{"plan": _plan_text(plan), "measured_ratio": round(measured[name], 4),
             **{f"{m}_ratio": round(model.predict(plan) / dense_ms, 4)
                for m, model in named.items()}} for name, plan in plans.items()]
    mape = {m: float(np.mean([abs(model.predict(plan) / dense_ms - measured[name])
                              / measured[name] for name, plan in plans.items()]))
            for m, model in named.items()}
    return {"mape": mape, "models": rows}


def random_plan(spec: ModelSpec, rng: np.random.Generator) -> Plan:
    """Draws per layer heads, an FFN width on the profiled grid and INT8 blocks."""
    layers = []
    for la in spec.layers:
        step = max(1, la.ffn.width // 16)
        heads = int(rng.integers(0, la.attention.heads + 1))
        ffn = min(la.ffn.width, step * int(rng.integers(0, 17)))
        blocks = [b for b, ok in (("attn", heads > 0), ("ffn", ffn > 0),
                                  ("both", heads > 0 and ffn > 0)) if ok]
        pick = int(rng.integers(0, len(blocks) + 1))
        int8 = Int8Plan(blocks[pick - 1], INT8_MODE) if pick else None
        layers.append(LayerPlan(heads=heads, ffn=ffn, int8=int8))
    return Plan(tuple(layers))


def _plan_text(plan: Plan) -> str:
    """Writes a plan as `heads/ffn[+int8 blocks]` per layer, e.g. `7/960+both 12/1536`."""
    return " ".join(f"{la.heads}/{la.ffn}" + (f"+{la.int8.blocks}" if la.int8 else "")
                    for la in plan.layers)
