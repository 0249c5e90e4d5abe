"""Chooses what each layer keeps from calibration data and refits what remains.

calibration batches ─▶ capture (ORT) ─▶ importance ─▶ allocate (--target-flops)
─▶ kept heads/channels ─▶ least-squares refit ─▶ Selection
held-out batches    ─▶ capture ─▶ per-layer reconstruction error (before/after refit)
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import onnx_ir as ir

from planer.compiler.calibration import CalibrationSet
from planer.compiler.plan import LayerPlan, Plan
from planer.compiler.spec import ModelSpec
from planer.passes.head_pruning import head_columns
from planer.passes.importance import magnitude_channel_scores, magnitude_head_scores, top_indices
from planer.passes.prune_fit import (
    LayerActivations,
    allocate,
    capture_layers,
    choose_output,
    importance,
    kept_units,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which heads and channels each layer keeps, with optional refitted output projections."""

    heads: dict[int, tuple[int, ...]]
    channels: dict[int, tuple[int, ...]]
    head_output: dict[int, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)
    channel_output: dict[int, tuple[np.ndarray, np.ndarray]] = dataclasses.field(
        default_factory=dict
    )
    method: str = "magnitude"


def magnitude_selection(spec: ModelSpec, plan: Plan) -> Selection:
    """Chooses kept heads/channels by weight magnitude (the data-free fallback)."""
    heads, channels = {}, {}
    for layer, choice in zip(spec.layers, plan.layers, strict=True):
        heads[layer.index] = top_indices(magnitude_head_scores(layer.attention), choice.heads)
        channels[layer.index] = top_indices(magnitude_channel_scores(layer.ffn), choice.ffn)
    return Selection(heads=heads, channels=channels)




def plan_for_flops(
    model: ir.Model, spec: ModelSpec, calibration: CalibrationSet, target_ratio: float, *,
    batch: int, seq_len: int, acts: list[LayerActivations] | None = None,
) -> Plan:
    """Returns the plan whose FLOPs meet `target_ratio`, allocated by calibrated importance."""
    acts = acts if acts is not None else capture_layers(model, spec, calibration.batches)
    counts = allocate(spec, importance(spec, acts), target_ratio, batch=batch, seq_len=seq_len)
    return Plan(tuple(LayerPlan(heads=h, ffn=f) for h, f in counts))


def calibrated_selection(
    model: ir.Model, spec: ModelSpec, plan: Plan, calibration: CalibrationSet, *,
    acts: list[LayerActivations] | None = None, reconstruct: bool = True,
    method: str = "calibrated",
) -> tuple[Selection, list[dict[str, Any]]]:
    """Picks kept units by calibrated importance (or magnitude) and refits output projections.

    Returns:
        (Selection, per-layer fit records with held-out reconstruction errors).
    """
    acts = acts if acts is not None else capture_layers(model, spec, calibration.batches)
    if method == "magnitude":
        base = magnitude_selection(spec, plan)
        heads, channels = base.heads, base.channels
    else:
        scores = importance(spec, acts)
        heads = {i: kept_units(scores.heads[i], c.heads) for i, c in enumerate(plan.layers)}
        channels = {i: kept_units(scores.channels[i], c.ffn) for i, c in enumerate(plan.layers)}
    head_out, chan_out = {}, {}
    holdout = capture_layers(model, spec, calibration.holdout, max_tokens=2048, seed=1) \
        if calibration.holdout else None
    records = []
    for layer, act in zip(spec.layers, acts, strict=True):
        i = layer.index
        a, f = layer.attention, layer.ffn
        cols = head_columns(heads[i], a.head_size) if heads[i] else np.zeros(0, np.int64)
        keep = np.asarray(channels[i], dtype=np.int64)
        record: dict[str, Any] = {"index": i}
        if len(heads[i]) < a.heads:
            choice = choose_output(act.ctx, cols, a.o.w(), a.o.b(), reconstruct=reconstruct,
                                   x_check=holdout[i].ctx if holdout else None)
            if choice.fit is not None:
                head_out[i] = choice.fit
            record["attn"] = choice.record
        if len(channels[i]) < f.width:
            choice = choose_output(act.act, keep, f.w2.w(), f.w2.b(), reconstruct=reconstruct,
                                   x_check=holdout[i].act if holdout else None)
            if choice.fit is not None:
                chan_out[i] = choice.fit
            record["ffn_fit"] = choice.record
        records.append(record)
    selection = Selection(heads=heads, channels=channels, head_output=head_out,
                          channel_output=chan_out,
                          method=method + ("+refit" if reconstruct else ""))
    return selection, records
