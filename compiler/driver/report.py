"""Builds report.json's static part: the plan as applied, parameters and FLOPs.

The FLOPs after the rewrite are counted from the plan and the spec, the same way
`inspect` and the search count them (compiler.spec); tests check them against MatMul
shapes read off the emitted graph.
"""

from __future__ import annotations

from typing import Any

import planer
from planer.compiler.driver.prune import Selection
from planer.compiler.plan import Plan
from planer.compiler.spec import ModelSpec, layer_flops, model_flops


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
