"""Chooses per-layer block variants for a latency target: an exact knapsack over layers.

    per layer l, variants v = (heads, FFN width or MoE (E, top-k), int8 ∈ {none, attn,
    ffn, both}), and per plan at most one skim point (keep r before layer l):
        ms(v)   = LatencyModel.layer_ms(heads, width, int8), MoE and skim by
                  cost_model.variants; layers after a skim point at r of the tokens
        loss(v) = the quality model's layer loss (cost_model.quality.MeasuredQuality:
                  measured single-change losses, corrected per kind), or the removal
                  costs of the units dropped + INT8 costs (Quality, the label-free model)
    for each skim placement p (none, or one of the measured (layer, r)):
        minimise Σ_l loss(v_l)  subject to  overhead + Σ_l ms_p(v_l) ≤ target
    keep the placement whose optimum loses least

The skim point shrinks every later layer's token count, which couples the layers; an
outer loop over the few measured placements keeps each inner problem separable, so it
stays an exact knapsack. MoE and skim never share a plan (the skim pass refuses MoE
layers), so a placement turns the MoE variants off.

Quality side: `Quality` adds a unit's label-free removal cost (passes.prune_fit.importance)
and a block's INT8 cost, both the block-output perturbation over the residual energy;
`MeasuredQuality` measures what each variant does to the pooled output through the rest
of the model. `--passes` decides the kinds the search may use: prune (heads, widths),
int8, moe, skim; with int8, INT8 joins wherever the latency model holds INT8 curves and
the quality model INT8 costs. Recovery (`--recover`) is not priced in: see cost_model.quality.

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

from planer.compiler.plan import INT8_BLOCKS, Int8Plan, LayerPlan, MoePlan, Plan
from planer.compiler.spec import LayerSpec, ModelSpec
from planer.compiler.support import head_pruning_problem
from planer.cost_model import variants as variant_ms
from planer.cost_model.int8_cost import INT8_MODE, Int8Costs
from planer.cost_model.latency import LatencyModel
from planer.cost_model.profile_int8 import int8_kind
from planer.cost_model.quality import MeasuredQuality
from planer.passes.prune_fit import Importance

RESOLUTION_MS = 0.01
MAX_BINS = 4000
DEFAULT_KINDS = frozenset({"prune", "int8"})  # `--passes` by default


@dataclasses.dataclass(frozen=True)
class Quality:
    """The label-free quality model: removal costs plus INT8 costs (if measured)."""

    importance: Importance
    int8: Int8Costs | None = None

    def layer_loss(self, i: int, choice: LayerPlan) -> float:
        """Sums the removal costs of the least important units dropped and the INT8 costs."""
        heads = np.sort(self.importance.heads[i])[: len(self.importance.heads[i]) - choice.heads]
        channels = np.sort(self.importance.channels[i])[
            : len(self.importance.channels[i]) - choice.ffn]
        loss = float(heads.sum() + channels.sum())
        if choice.int8 is not None and self.int8 is not None:
            loss += self.int8.of(i, choice.int8.kinds())
        return loss

    def measures_int8(self, i: int) -> bool:
        return self.int8 is not None


QualityModel = Quality | MeasuredQuality
Placement = tuple[int, float] | None  # a skim point (layer, keep ratio), or none


@dataclasses.dataclass(frozen=True)
class Variant:
    """One layer choice with its predicted latency (ms) and quality loss."""

    choice: LayerPlan
    ms: float
    loss: float


@dataclasses.dataclass(frozen=True)
class Search:
    """What the search weighed: the winning skim placement and every layer's front."""

    plan: Plan
    placement: Placement
    fronts: list[list[Variant]]
    loss: float


def plan_for_latency(
    spec: ModelSpec, quality: QualityModel | Importance, model: LatencyModel, target_ms: float,
    *, kinds: frozenset[str] = DEFAULT_KINDS, resolution_ms: float = RESOLUTION_MS,
) -> Plan:
    """Returns the plan with the least predicted loss whose predicted latency is <= target_ms.

    When no plan fits, returns the fastest plan (every layer at its fastest variant).
    `kinds` are the variant kinds allowed (prune, int8, moe, skim).
    """
    return search(spec, quality, model, target_ms, kinds=kinds, resolution_ms=resolution_ms).plan


def search(
    spec: ModelSpec, quality: QualityModel | Importance, model: LatencyModel, target_ms: float,
    *, kinds: frozenset[str] = DEFAULT_KINDS, resolution_ms: float = RESOLUTION_MS,
) -> Search:
    """Solves the knapsack once per skim placement and keeps the least lossy optimum."""
    q = _as_quality(quality)
    placements: list[Placement] = [None]
    if "skim" in kinds and isinstance(q, MeasuredQuality):
        placements += sorted(q.skim)
    best: Search | None = None
    for placement in placements:
        fronts = [pareto(layer_variants(spec, i, q, model, kinds=kinds, placement=placement))
                  for i in range(len(spec.layers))]
        picks = solve_knapsack([[(v.ms, v.loss) for v in front] for front in fronts],
                               target_ms - model.overhead_ms, resolution_ms=resolution_ms)
        if picks is None:
            continue
        chosen = [front[j] for front, j in zip(fronts, picks, strict=True)]
        found = Search(Plan(tuple(v.choice for v in chosen)), placement, fronts,
                       sum(v.loss for v in chosen))
        if best is None or found.loss < best.loss:
            best = found
    if best is None:  # nothing fits: the fastest plan without skimming
        fronts = [pareto(layer_variants(spec, i, q, model, kinds=kinds))
                  for i in range(len(spec.layers))]
        best = Search(Plan(tuple(front[0].choice for front in fronts)), None, fronts,
                      sum(front[0].loss for front in fronts))
    return best


def layer_variants(spec: ModelSpec, i: int, quality: QualityModel, model: LatencyModel, *,
                   kinds: frozenset[str] = DEFAULT_KINDS, placement: Placement = None,
                   ) -> list[Variant]:
    """Lists layer i's variants: heads, width/16 steps or MoE, INT8 options, skim point."""
    layer = spec.layers[i]
    top_h, top_f = layer.attention.heads, layer.ffn.width
    prunes = "prune" in kinds
    head_counts = [top_h] if head_pruning_problem(layer) or not prunes else \
        list(range(top_h + 1))
    ffns: list[tuple[int, MoePlan | None]] = [(f, None) for f in
                                              (_widths(layer) if prunes else [top_f])]
    if "moe" in kinds and placement is None and isinstance(quality, MeasuredQuality):
        ffns += [(top_f, plan) for plan in quality.layers[i].moe]
    skim_keep, tokens = None, 1.0
    if placement is not None and i >= placement[0]:
        tokens = placement[1]
        skim_keep = placement[1] if i == placement[0] else None
    dense_ms = model.layer_ms(top_h, top_f)
    variants = []
    for h in head_counts:
        for f, moe in ffns:
            for int8 in _int8_options(model, quality, i, h, f, moe, kinds=kinds):
                choice = LayerPlan(heads=h, ffn=f, moe=moe, skim_keep=skim_keep, int8=int8)
                ms = variant_ms.layer_ms(model, choice, width=top_f, hidden=spec.hidden,
                                         tokens=tokens, dense_layer_ms=dense_ms)
                variants.append(Variant(choice, ms, quality.layer_loss(i, choice)))
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


def predicted_loss(spec: ModelSpec, quality: QualityModel | Importance, plan: Plan) -> float:
    """Sums the quality model's predicted loss of each layer's choice."""
    q = _as_quality(quality)
    return sum(q.layer_loss(i, choice) for i, choice in enumerate(plan.layers))


def _as_quality(quality: QualityModel | Importance) -> QualityModel:
    return quality if isinstance(quality, Quality | MeasuredQuality) else Quality(quality)


def _widths(layer: LayerSpec) -> list[int]:
    width = layer.ffn.width
    step = max(1, width // 16)
    return sorted({*range(0, width + 1, step), width})


def _int8_options(model: LatencyModel, quality: QualityModel, i: int, heads: int, width: int,
                  moe: MoePlan | None, *, kinds: frozenset[str]) -> list[Int8Plan | None]:
    """The INT8 choices a variant may take: blocks with a curve, a cost and units left.

    None but float without "int8" in `kinds`. A MoE FFN stays float (the quantize stage
    reads dense FFN MatMuls).
    """
    if "int8" not in kinds or not quality.measures_int8(i):
        return [None]
    can = {kind for kind, n in (("attn", heads), ("ffn", 0 if moe is not None else width))
           if n > 0 and int8_kind(kind, INT8_MODE) in model.int8}
    options: list[Int8Plan | None] = [None]
    for blocks in INT8_BLOCKS:
        if set(Int8Plan(blocks=blocks, mode=INT8_MODE).kinds()) <= can:
            options.append(Int8Plan(blocks=blocks, mode=INT8_MODE))
    return options
