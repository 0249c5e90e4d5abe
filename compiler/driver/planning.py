"""Settles the plan a compile applies, and which heads and channels each layer keeps.

    plan given ─────────────────────────────────────────┐
    --target-flops ─▶ split between passes ─▶ allocate ─┼─▶ Plan ─▶ kept units + refit
    --passes moe --target-flops ─▶ fit experts ─▶ pick ─┘          (calibrated or magnitude)

Calibration activations are captured once per source model (`Fitting.acts`) and reused
by every compile that shares the Fitting, such as the latency search's rounds.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from planer.compiler.calibration import CalibrationSet
from planer.compiler.driver.prune import (
    Selection,
    calibrated_selection,
    magnitude_selection,
    plan_for_flops,
)
from planer.compiler.errors import BadInputError
from planer.compiler.plan import Plan
from planer.compiler.spec import ModelSpec
from planer.passes.moe_fit import choose_moe_plans, fit_layers
from planer.passes.prune_fit import capture_layers
from planer.passes.skim_fit import skim_keep_for_flops

if TYPE_CHECKING:
    from planer.compiler.driver.compilation import Compilation, Fitting


def choose_units(c: Compilation) -> tuple[Plan, Selection, list[dict[str, Any]]]:
    """Returns the plan to apply, the kept units per layer and the per-layer fit records."""
    o, plan, spec = c.options, c.plan, c.spec
    target = o.target_flops
    calib = c.calib
    if calib is not None and target is not None and "moe" in o.passes:
        if o.passes != {"moe"}:
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
        plan = _plan_for_flops_passes(c, target, acts)
    c.progress("fitting kept units and refitting output projections")
    selection, records = calibrated_selection(c.model, spec, plan, calib, acts=acts,
                                              reconstruct=o.reconstruct, method=o.method)
    return plan, selection, records


def activations(fitting: Fitting, model: ir.Model, spec: ModelSpec, progress: Any) -> Any:
    """Returns the calibration activations of the source model, captured on first use."""
    if fitting.acts is None:
        progress("capturing calibration activations")
        fitting.acts = capture_layers(model, spec, fitting.calib.batches)
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


def _plan_for_flops_passes(c: Compilation, target: float, acts: Any) -> Plan:
    """Splits a FLOPs target between the allowed passes and plans each part.

    With both prune and skim, each gets the square root of the target, so their product
    (they compose multiplicatively on layer FLOPs) meets it.
    """
    o, spec = c.options, c.spec
    assert c.calib is not None
    prune_part = skim_part = None
    if "prune" in o.passes and "skim" in o.passes:
        prune_part = skim_part = target ** 0.5
    elif "skim" in o.passes:
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
