"""Settles the plan a compile applies, and which heads and channels each layer keeps.

    plan given ─────────────────────────────────────────┐
    --target-flops ─▶ split between passes ─▶ allocate ─┼─▶ Plan ─▶ kept units + refit
    --passes moe --target-flops ─▶ fit experts ─▶ pick ─┘          (calibrated or magnitude)

Calibration activations are captured once per source model (`Fitting.acts`) and reused
by every compile that shares the Fitting, such as the latency search's rounds; they are
stored in the planer cache too (fit_cache), as are the quality model's measurements.

The latency search's quality model is built here too (`latency_quality`):

    Fitting ─▶ probe (cost_model.quality) ─▶ single-change losses: heads, widths, INT8,
               MoE (routers fitted for it, --passes moe), skim points (compiled, --passes skim)
    uncorrected search at the target and 0.85 of it ─▶ those plans compiled and measured
    on the probe ─▶ per-kind interaction weights ─▶ MeasuredQuality for every round
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from planer.compiler.cache import cache_dir
from planer.compiler.calibration import CalibrationSet
from planer.compiler.driver.fit_cache import PlanLosses, cached_activations
from planer.compiler.driver.prune import (
    Selection,
    calibrated_selection,
    magnitude_selection,
    plan_for_flops,
)
from planer.compiler.emit import EMISSION_VERSION
from planer.compiler.errors import BadInputError
from planer.compiler.plan import MoePlan, Plan, parse_plan
from planer.compiler.spec import ModelSpec
from planer.cost_model import variants
from planer.cost_model.int8_cost import int8_pays
from planer.cost_model.latency import LatencyModel
from planer.cost_model.quality import (
    KINDS,
    MeasuredQuality,
    Probe,
    fit_weights,
    layers_from_json,
    layers_to_json,
    measure_layers,
    probe_feeds,
)
from planer.cost_model.search import search
from planer.passes.moe_fit import choose_moe_plans, fit_layers
from planer.passes.prune_fit import capture_layers, importance
from planer.passes.skim_fit import skim_keep_for_flops

if TYPE_CHECKING:
    from planer.compiler.driver.compilation import Compilation, Fitting


def choose_units(c: Compilation) -> tuple[Plan, Selection, list[dict[str, Any]]]:
    """Returns the plan to apply, the kept units per layer and the per-layer fit records."""
    o, plan, spec = c.options, c.plan, c.spec
    target = o.target_flops
    calib = c.calib
    passes = flops_passes(o.passes)
    if calib is not None and target is not None and "moe" in passes:
        if passes != {"moe"}:
            raise BadInputError("--passes moe cannot be combined with other passes under "
                                "--target-flops yet; use --plan for mixed plans.")
        c.progress("fitting experts and routers for every layer")
        plan = _plan_for_moe(c.model, spec, calib, target, batch=o.batch, seq_len=o.seq_len)
        target = None  # the plan is chosen; pruning keeps every head and channel
    if calib is None:
        return plan, magnitude_selection(spec, plan), []
    assert c.fitting is not None
    acts = activations(c.fitting, c.model, spec, c.progress)
    if target is not None:
        plan = _plan_for_flops_passes(c, target, acts, passes)
    c.progress("fitting kept units and refitting output projections")
    selection, records = calibrated_selection(c.model, spec, plan, calib, acts=acts,
                                              reconstruct=o.reconstruct, method=o.method)
    return plan, selection, records


def activations(fitting: Fitting, model: ir.Model, spec: ModelSpec, progress: Any) -> Any:
    """Returns the calibration activations of the source model, captured on first use.

    Stored in the planer cache (fit_cache) by the model's bytes and the calibration feeds,
    so a second compile of the same model on the same text reads them back.
    """
    if fitting.acts is None:
        batches = fitting.calib.batches
        fitting.acts = cached_activations(
            model, batches, lambda: capture_layers(model, spec, batches), progress=progress)
    return fitting.acts


def require_calibration(plan: Plan, calibration: Any, target_flops: float | None,
                        passes: frozenset[str]) -> None:
    """Refuses, before any work, a plan or pass whose fit needs calibration data."""
    moe_layers = [i for i, la in enumerate(plan.layers) if la.moe is not None]
    if calibration is None and (moe_layers or (target_flops is not None and "moe" in passes)):
        where = f"plan layer {moe_layers[0]} sets moe" if moe_layers else "--passes moe"
        raise BadInputError(f"{where}, whose routers are fitted on calibration data; pass "
                            "--calibration.")


def skim_layers(plan: Plan) -> list[int]:
    """Returns the layers the plan skims tokens before."""
    return [i for i, la in enumerate(plan.layers) if la.skim_keep is not None and la.skim_keep < 1]


def flops_passes(passes: frozenset[str], target_flops: float | None = None) -> frozenset[str]:
    """The passes a FLOPs target plans with: INT8 is dropped, as it leaves FLOPs alone.

    Raises:
        BadInputError: with `target_flops`, int8 was the only pass named.
    """
    if target_flops is not None and passes == {"int8"}:
        raise BadInputError("--passes int8 cannot meet --target-flops: INT8 does not change "
                            "FLOPs; add prune, skim or moe.")
    return passes - {"int8"}


def _plan_for_flops_passes(c: Compilation, target: float, acts: Any,
                           passes: frozenset[str]) -> Plan:
    """Splits a FLOPs target between the allowed passes and plans each part.

    With both prune and skim, each gets the square root of the target, so their product
    (they compose multiplicatively on layer FLOPs) meets it.
    """
    o, spec = c.options, c.spec
    assert c.calib is not None
    prune_part = skim_part = None
    if "prune" in passes and "skim" in passes:
        prune_part = skim_part = target ** 0.5
    elif "skim" in passes:
        skim_part = target
    else:
        prune_part = target
    plan = Plan.neutral(spec)
    if prune_part is not None:
        c.progress(f"allocating heads and channels for {prune_part:.2f} of the FLOPs")
        plan = plan_for_flops(c.model, spec, c.calib, prune_part, batch=o.batch,
                              seq_len=o.seq_len, acts=acts)
    if skim_part is not None:
        c.progress(f"choosing skim ratios for {skim_part:.2f} of the FLOPs")
        ratios = skim_keep_for_flops(spec, skim_part, seq_len=o.seq_len, batch=o.batch)
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


# ---------------------------------------------------------------- the search's quality model


MOE_SEARCH = (MoePlan(8, top_k=2), MoePlan(8, top_k=4))  # MoE variants the search weighs
SKIM_KEEPS = (0.75, 0.5)  # keep ratios the search weighs at each skim point
PROBE_SEQUENCES = 8


@dataclasses.dataclass
class QualityFit:
    """The search's measured quality model and the probe that measured it.

    `measure_plan` compiles a plan (sharing the compile's fitting) and returns its model;
    `losses` keeps whole plans' measured losses across compiles (fit_cache.PlanLosses).
    """

    quality: MeasuredQuality
    probe: Probe
    measure_plan: Callable[[Plan], Path]
    corrections: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    losses: PlanLosses = dataclasses.field(default_factory=lambda: PlanLosses(None))

    def measured_loss(self, plan: Plan) -> float:
        """Compiles `plan` and measures its loss on the probe sequences (or reads it back)."""
        known = self.losses.get(plan.to_dict())
        if known is not None:
            return known
        loss = self.probe.model_loss(self.measure_plan(plan))
        self.losses.put(plan.to_dict(), loss)
        return loss

    def correct(self, plans: list[Plan], spec: ModelSpec) -> MeasuredQuality:
        """Fits the per-kind interaction weights on whole plans compiled and measured."""
        rows = []
        for plan in plans:
            parts = plan_parts(self.quality, spec, plan)
            measured = self.measured_loss(plan)
            rows.append((parts, measured))
            self.corrections.append({"plan": plan.to_dict()["layers"], "parts": parts,
                                     "measured_loss": round(measured, 6)})
        self.quality = dataclasses.replace(self.quality, weights=fit_weights(rows))
        return self.quality


def plan_parts(quality: MeasuredQuality, spec: ModelSpec, plan: Plan) -> dict[str, float]:
    """Sums a plan's unweighted predicted losses by kind over its layers."""
    total = dict.fromkeys(KINDS, 0.0)
    for i in range(len(spec.layers)):
        for kind, value in quality.parts(i, plan.layers[i]).items():
            total[kind] += value
    return total


def skim_points(spec: ModelSpec) -> list[tuple[int, float]]:
    """The (layer, keep ratio) skim placements the search weighs: a third and two thirds in."""
    n = len(spec.layers)
    layers = sorted({max(1, n // 3), max(1, 2 * n // 3)} - {n})
    return [(i, r) for i in layers for r in SKIM_KEEPS]


def measure_quality(
    model: ir.Model, spec: ModelSpec, fitting: Fitting, *, batch: int, passes: frozenset[str],
    int8: bool, measure_plan: Callable[[Plan], Path], progress: Any,
    sequences: int = PROBE_SEQUENCES, threads: int = 1,
) -> QualityFit:
    """Measures the single-change losses of every variant `passes` allows (cost_model.quality).

    Heads and widths always; INT8 when `int8`; MoE (8 experts, top-2 and top-4) with
    "moe" in `passes` for layers whose width 8 divides; skim placements (skim_points),
    each compiled alone, with "skim". The measurements are cached per model, calibration
    data and settings (under the planer cache, `quality/`), as are the whole plans'
    losses its interaction weights are fitted on, so a second compile of the same model on
    the same text measures nothing again.
    """
    acts = activations(fitting, model, spec, progress)
    scores = importance(spec, acts)
    # The probe runs on held-out sequences: the refit of a pruned block was fitted on the
    # fitting share, and measured there its loss is in-sample (on MiniLM a 1152-wide FFN
    # then looked ~10x cheaper than INT8 and the 50% plan lost cosine 0.97 -> 0.92).
    held = fitting.calib.holdout or fitting.calib.batches
    probe = Probe(model, spec, probe_feeds(held, sequences), threads=threads)
    cached = _quality_cache(model, fitting, batch=batch, passes=passes, int8=int8,
                            sequences=sequences)
    losses = PlanLosses(cached.with_name(f"{cached.stem}.plans.json"))
    if cached.exists():
        progress("reusing the quality model's measurements (cached)")
        data = json.loads(cached.read_text())
        skim = {(int(i), float(r)): float(v) for i, r, v in data["skim"]}
        return QualityFit(MeasuredQuality(scores, tuple(layers_from_json(data["layers"])), skim),
                          probe, measure_plan, losses=losses)
    fits = None
    if "moe" in passes:
        progress("fitting experts and routers for the MoE variants")
        fits = fit_layers(model, spec, fitting.calib,
                          {la.index: 8 for la in spec.layers if la.ffn.width % 8 == 0})
    layers = measure_layers(probe, spec, scores, acts, batch=batch, int8=int8, moe=fits,
                            moe_plans=MOE_SEARCH if fits else (), progress=progress)
    skim = {}
    if "skim" in passes:
        for i, keep in skim_points(spec):
            progress(f"measuring skim {keep} before layer {i}")
            plan = Plan(tuple(dataclasses.replace(la, skim_keep=keep if j == i else None)
                              for j, la in enumerate(Plan.neutral(spec).layers)))
            skim[(i, keep)] = probe.model_loss(measure_plan(plan))
    _write_atomic(cached, json.dumps({"layers": layers_to_json(layers),
                                      "skim": [[i, r, v] for (i, r), v in skim.items()]}))
    return QualityFit(MeasuredQuality(scores, tuple(layers), skim), probe, measure_plan,
                      losses=losses)


QUALITY_CACHE_VERSION = 3  # bump when what measure_quality measures changes


def _quality_cache(model: ir.Model, fitting: Fitting, **settings: Any) -> Path:
    """The cache file of one model's measurements on one calibration set and settings."""
    digest = hashlib.sha256(ir.to_proto(model).SerializeToString())
    for feed in [*fitting.calib.batches, *fitting.calib.holdout]:
        for name in sorted(feed):
            digest.update(name.encode() + np.ascontiguousarray(feed[name]).tobytes())
    # INT8 is keyed by the `int8` setting; "int8" in passes measures nothing more.
    key = {**settings, "passes": sorted(settings["passes"] - {"int8"}),
           "version": QUALITY_CACHE_VERSION,
           "emission": EMISSION_VERSION, "moe": [p.to_dict() for p in MOE_SEARCH],
           "skim": list(SKIM_KEEPS)}
    digest.update(json.dumps(key, sort_keys=True).encode())
    return cache_dir("quality") / f"{digest.hexdigest()[:32]}.json"


def _write_atomic(path: Path, text: str) -> None:
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    scratch.write_text(text)
    os.replace(scratch, path)


CORRECTION_BUDGETS = (1.0, 0.85)  # shares of the target whose plans fit the weights
CORRECTION_NEAR = 0.05  # a measured plan predicted this close to a share stands in for it


def latency_quality(
    model: ir.Model, spec: ModelSpec, fitting: Fitting, latency: LatencyModel, *,
    target_ms: float, batch: int, passes: frozenset[str],
    measure_plan: Callable[[Plan], Path], progress: Any,
) -> QualityFit:
    """Builds the latency search's quality model: measured, then corrected on whole plans.

    The correction plans are the uncorrected search's own answers at the target and a
    little under it, so the weights are fitted where the search will choose. INT8 costs
    are measured only with "int8" in `passes` and where INT8 pays on this machine. A plan
    an earlier compile measured (fit.losses) whose prediction lies within CORRECTION_NEAR
    of such a budget stands in for the search's answer there: the target moves with each
    compile's dense timing, and compiling a plan a few milliseconds from one measured
    before would cost a compile for the same information.
    """
    int8 = "int8" in passes and int8_pays(latency, spec)
    fit = measure_quality(model, spec, fitting, batch=batch, passes=passes, int8=int8,
                          measure_plan=measure_plan, progress=progress)
    plans: list[Plan] = []
    known = [parse_plan(data, spec) for data in fit.losses.plans()]
    for share in CORRECTION_BUDGETS:
        budget = share * target_ms
        plan = search(spec, fit.quality, latency, budget, kinds=passes).plan
        near = [p for p in known if p != Plan.neutral(spec)
                and abs(variants.predict(latency, spec, p) - budget) <= CORRECTION_NEAR * budget]
        if near and plan not in known:
            plan = min(near, key=lambda p: abs(variants.predict(latency, spec, p) - budget))
        if plan not in plans and plan != Plan.neutral(spec):
            plans.append(plan)
    progress(f"fitting the quality model's interaction weights on {len(plans)} plans")
    fit.correct(plans, spec)
    return fit
