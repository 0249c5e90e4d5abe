"""Chooses per-layer block variants for a latency target: an exact knapsack over layers.

    per layer l, variants v = (heads, FFN width, int8 ∈ {none, attn, ffn, both}):
        ms(v)   = LatencyModel.layer_ms(heads, width, int8)       (INT8 curves included)
        loss(v) = Σ removal costs of the least important heads and channels dropped
                  + INT8 cost of each quantized block             (cost_model.int8_cost)
    minimise Σ_l loss(v_l)  subject to  overhead + Σ_l ms(v_l) ≤ target

Quality side: a unit's label-free removal cost (passes.prune_fit.importance) and a
block's INT8 cost are both the block-output perturbation over the residual energy, so
they add on one scale. Latency side: the learned LatencyModel; INT8 variants exist only
where it holds that block's dynamic INT8 curve and the quality side holds INT8 costs.

Solver: dynamic programming over layers on a discretised latency axis (0.01 ms bins,
coarsened to at most MAX_BINS bins). Each variant's latency is rounded *up* to whole
bins, so every plan the DP returns meets the budget by the latency model, and the plan
is the exact optimum among plans whose rounded latencies fit. Each layer's variants
are first cut to their Pareto front (no other variant both faster and cheaper). Widths
move on the profiled grid (width/16 steps), heads one at a time; layers whose heads
head pruning cannot rewrite keep every head.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from planer.compiler.plan import INT8_BLOCKS, Int8Plan, LayerPlan, Plan
from planer.compiler.spec import LayerSpec, ModelSpec
from planer.compiler.support import head_pruning_problem
from planer.cost_model.int8_cost import INT8_MODE, Int8Costs
from planer.cost_model.latency import LatencyModel
from planer.cost_model.profile_int8 import int8_kind
from planer.passes.prune_fit import Importance

RESOLUTION_MS = 0.01
MAX_BINS = 4000


@dataclasses.dataclass(frozen=True)
class Quality:
    """The quality model the search minimises: removal costs plus INT8 costs (if measured)."""

    importance: Importance
    int8: Int8Costs | None = None


@dataclasses.dataclass(frozen=True)
class Variant:
    """One layer choice with its predicted latency (ms) and quality loss."""

    choice: LayerPlan
    ms: float
    loss: float


def plan_for_latency(
    spec: ModelSpec, quality: Quality | Importance, model: LatencyModel, target_ms: float,
    *, resolution_ms: float = RESOLUTION_MS,
) -> Plan:
    """Returns the plan with the least predicted loss whose predicted latency is <= target_ms.

    When no plan fits, returns the fastest plan (every layer at its fastest variant).
    """
    quality = _as_quality(quality)
    options = [pareto(layer_variants(spec, i, quality, model)) for i in range(len(spec.layers))]
    picks = solve_knapsack([[(v.ms, v.loss) for v in opts] for opts in options],
                           target_ms - model.overhead_ms, resolution_ms=resolution_ms)
    if picks is None:
        picks = [0] * len(options)  # each Pareto front starts at its fastest variant
    return Plan(tuple(opts[j].choice for opts, j in zip(options, picks, strict=True)))


def layer_variants(spec: ModelSpec, i: int, quality: Quality, model: LatencyModel
                   ) -> list[Variant]:
    """Lists layer i's variants on the grid: every head count, width/16 steps, INT8 options."""
    layer = spec.layers[i]
    heads_lost = _cumulative_lowest(quality.importance.heads[i])
    channels_lost = _cumulative_lowest(quality.importance.channels[i])
    top_h, top_f = layer.attention.heads, layer.ffn.width
    head_counts = [top_h] if head_pruning_problem(layer) else list(range(top_h + 1))
    variants = []
    for h in head_counts:
        for f in _widths(layer):
            pruned = float(heads_lost[top_h - h] + channels_lost[top_f - f])
            for int8 in _int8_options(model, quality, h, f):
                extra = quality.int8.of(i, int8.kinds()) if int8 and quality.int8 else 0.0
                variants.append(Variant(LayerPlan(heads=h, ffn=f, int8=int8),
                                        model.layer_ms(h, f, int8), pruned + extra))
    return variants


def pareto(variants: Sequence[Variant]) -> list[Variant]:
    """Keeps the variants no other variant beats on both latency and loss."""
    kept: list[Variant] = []
    for v in sorted(variants, key=lambda v: (v.ms, v.loss)):
        if not kept or v.loss < kept[-1].loss:
            kept.append(v)
    return kept


def solve_knapsack(options: Sequence[Sequence[tuple[float, float]]], budget: float, *,
                   resolution_ms: float = RESOLUTION_MS) -> list[int] | None:
    """Picks one (ms, loss) option per layer minimising Σ loss with Σ ms <= budget.

    Dynamic programming on bins of `resolution_ms` (coarsened to at most MAX_BINS bins),
    each option's ms rounded up. Returns the chosen index per layer, or None if even the
    fastest options do not fit.
    """
    if budget < 0:
        return None
    step = max(resolution_ms, budget / MAX_BINS) if budget > 0 else resolution_ms
    bins = int(math.floor(budget / step + 1e-9))
    # best[b]: least loss of the layers so far with total rounded cost <= b bins.
    best = np.zeros(bins + 1)
    choices = []
    for opts in options:
        costs = [int(math.ceil(ms / step - 1e-9)) for ms, _ in opts]
        new = np.full(bins + 1, np.inf)
        pick = np.full(bins + 1, -1)
        for j, ((_, loss), cost) in enumerate(zip(opts, costs, strict=True)):
            if cost > bins:
                continue
            candidate = np.full(bins + 1, np.inf)
            candidate[cost:] = best[: bins + 1 - cost] + loss
            better = candidate < new
            new[better], pick[better] = candidate[better], j
        best = new
        choices.append((pick, costs))
    if not np.isfinite(best[bins]):
        return None
    picks, left = [], bins
    for pick, costs in reversed(choices):
        j = int(pick[left])
        picks.append(j)
        left -= costs[j]
    return picks[::-1]


def floor_plan(spec: ModelSpec) -> Plan:
    """Returns the fastest plan pruning can reach: every head and channel removed."""
    return Plan(tuple(LayerPlan(heads=0, ffn=0) for _ in spec.layers))


def predicted_loss(spec: ModelSpec, quality: Quality | Importance, plan: Plan) -> float:
    """Sums the removal costs of the least important units a plan removes and its INT8 costs."""
    quality = _as_quality(quality)
    scores = quality.importance
    loss = 0.0
    for i, (layer, choice) in enumerate(zip(spec.layers, plan.layers, strict=True)):
        heads = np.sort(scores.heads[i])[: layer.attention.heads - choice.heads]
        channels = np.sort(scores.channels[i])[: layer.ffn.width - choice.ffn]
        loss += float(heads.sum() + channels.sum())
        if choice.int8 is not None and quality.int8 is not None:
            loss += quality.int8.of(i, choice.int8.kinds())
    return loss


def _as_quality(quality: Quality | Importance) -> Quality:
    return quality if isinstance(quality, Quality) else Quality(quality)


def _cumulative_lowest(scores: np.ndarray) -> np.ndarray:
    """[k] = the summed cost of removing the k least important units (k = 0..n)."""
    return np.concatenate([[0.0], np.cumsum(np.sort(np.asarray(scores, float)))])


def _widths(layer: LayerSpec) -> list[int]:
    width = layer.ffn.width
    step = max(1, width // 16)
    return sorted({*range(0, width + 1, step), width})


def _int8_options(model: LatencyModel, quality: Quality, heads: int, width: int
                  ) -> list[Int8Plan | None]:
    """The INT8 choices this layer may take: blocks with a curve, a cost and units left."""
    if quality.int8 is None:
        return [None]
    can = {kind for kind, n in (("attn", heads), ("ffn", width))
           if n > 0 and int8_kind(kind, INT8_MODE) in model.int8}
    options: list[Int8Plan | None] = [None]
    for blocks in INT8_BLOCKS:
        if set(Int8Plan(blocks=blocks, mode=INT8_MODE).kinds()) <= can:
            options.append(Int8Plan(blocks=blocks, mode=INT8_MODE))
    return options
