"""Builds report.json's static part and the latency search's `search` section.

The static part is the plan as applied, parameters and FLOPs; `search` says per layer
the variant chosen, the alternatives beside it with their predicted latency and loss,
and the losses measured for the layer.

`PhaseClock` times a compile's phases for report.json's `phases` (wall seconds), so a
user sees where a compile spends its time and what a second compile reused.

The FLOPs after the rewrite are counted from the plan and the spec, the same way
`inspect` and the search count them (compiler.spec); tests check them against MatMul
shapes read off the emitted graph.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import planer
from planer.compiler.driver.prune import Selection
from planer.compiler.plan import Plan
from planer.compiler.spec import ModelSpec, layer_flops, model_flops
from planer.cost_model import variants
from planer.cost_model.latency import LatencyModel
from planer.cost_model.quality import MeasuredQuality
from planer.cost_model.search import Search, Variant


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
                                   ffn=round(ffn), batch=batch, seq_len=max(1, round(tokens)),
                                   gated=f.gated)
        inner_removed = (a.heads - choice.heads) * a.head_size
        params_removed += inner_removed * (4 * spec.hidden + 3)
        params_removed += (f.width - choice.ffn) * ((3 if f.gated else 2) * spec.hidden + 1)
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


RECOVERY_NOTE = ("the search ranks plans by their loss before recovery: measuring each "
                 "variant after a short recovery would cost a training run per variant, and "
                 "--recover runs once, on the plan the latency rounds settle on "
                 "(cost_model.quality)")


def search_section(
    spec: ModelSpec, quality: MeasuredQuality, latency: LatencyModel, found: Search, *,
    kinds: frozenset[str], corrections: list[dict[str, Any]], nearby: int = 3,
) -> dict[str, Any]:
    """Describes the search per layer: chosen variant, alternatives, measured losses.

    The alternatives are the chosen variant's neighbours on the layer's Pareto front
    (predicted ms and loss): `nearby` on each side, faster and slower.
    """
    layers = []
    for i, (front, choice) in enumerate(zip(found.fronts, found.plan.layers, strict=True)):
        at = next((j for j, v in enumerate(front) if v.choice == choice), 0)
        measured = quality.layers[i].to_dict()
        skim = {str(r): round(v, 6) for (layer, r), v in quality.skim.items() if layer == i}
        if skim:
            measured["skim"] = skim
        layers.append({
            "index": i, "chosen": _variant(front[at]),
            "parts": {k: round(v, 6) for k, v in quality.parts(i, choice).items() if v},
            "alternatives": [_variant(v) for v in front[max(0, at - nearby): at + nearby + 1]
                             if v.choice != choice],
            "front_size": len(front), "measured": measured})
    return {
        "kinds": sorted(kinds), "skim_placement": list(found.placement or []) or None,
        "skim_considered": [{"layer": i, "keep": r, "measured_loss": round(v, 6)}
                            for (i, r), v in sorted(quality.skim.items())],
        "weights": {k: round(v, 4) for k, v in quality.weights.items()},
        "predicted_loss": round(found.loss, 6),
        "predicted_ms": round(variants.predict(latency, spec, found.plan), 3),
        "corrections": [{**c, "predicted_loss": round(sum(
            quality.weights.get(k, 1.0) * v for k, v in c["parts"].items()), 6),
            "parts": {k: round(v, 6) for k, v in c["parts"].items()}} for c in corrections],
        "layers": layers, "recovery": RECOVERY_NOTE}


def _variant(v: Variant) -> dict[str, Any]:
    return {"variant": v.choice.to_dict(), "predicted_ms": round(v.ms, 4),
            "predicted_loss": round(v.loss, 6)}


class PhaseClock:
    """Wall seconds per phase of a compile, for report.json's `phases`.

    A phase entered again (each latency round's compile) adds to its total. Phases nest:
    a phase's seconds exclude those of the phases inside it, so the phases add up to the
    total. `to_dict` lists them in the order first entered, then `other` (time outside
    every phase) and `total` (since the clock was made).
    """

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self._inner: list[float] = []  # per open phase: seconds spent in phases inside it

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Times the `with` block under `name` (less the phases opened inside it)."""
        start = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            inner = self._inner.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + spent - inner
            if self._inner:
                self._inner[-1] += spent

    def to_dict(self) -> dict[str, float]:
        total = time.perf_counter() - self.started
        phases = {name: round(s, 2) for name, s in self.seconds.items()}
        return {**phases, "other": round(max(0.0, total - sum(self.seconds.values())), 2),
                "total": round(total, 2)}
