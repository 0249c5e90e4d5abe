"""Searches per-layer block choices toward a latency target (PLANER's search, greedy form).

Quality side: each unit's label-free removal cost (passes.prune_fit.importance) is its
predicted quality loss; a plan's predicted loss is the sum over what it removes.
Latency side: the learned LatencyModel. The search removes the unit with the least
predicted loss per predicted millisecond saved, one global queue over all layers,
until the predicted latency meets the budget.
"""

from __future__ import annotations

import numpy as np

from planer.compiler.plan import LayerPlan, Plan
from planer.compiler.spec import ModelSpec
from planer.cost_model.latency import LatencyModel
from planer.passes.prune_fit import Importance, allocate_budget


def plan_for_latency(
    spec: ModelSpec, scores: Importance, model: LatencyModel, target_ms: float
) -> Plan:
    """Returns the plan with the least predicted loss whose predicted latency is <= target_ms."""
    counts = allocate_budget(spec, scores, lambda _layer, h, f: model.layer_ms(h, f),
                             target_ms - model.overhead_ms)
    return Plan(tuple(LayerPlan(heads=h, ffn=f) for h, f in counts))


def floor_plan(spec: ModelSpec) -> Plan:
    """Returns the fastest plan pruning can reach: every head and channel removed."""
    return Plan(tuple(LayerPlan(heads=0, ffn=0) for _ in spec.layers))


def predicted_loss(spec: ModelSpec, scores: Importance, plan: Plan) -> float:
    """Sums the removal costs of the least important units a plan removes."""
    loss = 0.0
    for i, (layer, choice) in enumerate(zip(spec.layers, plan.layers, strict=True)):
        heads = np.sort(scores.heads[i])[: layer.attention.heads - choice.heads]
        channels = np.sort(scores.channels[i])[: layer.ffn.width - choice.ffn]
        loss += float(heads.sum() + channels.sum())
    return loss
