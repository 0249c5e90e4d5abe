"""Predicts the latency of the layer variants the block curves do not cover: MoE and skim.

    MoE FFN (E experts, top-k):  MOE_OVERHEAD · ffn(F·k/E) + ffn(router width equivalent)
    layer after a skim point:    layer_ms · (tokens left / tokens)          (r cumulative)
    the skim point itself:       SKIM_OVERHEAD · the dense layer's ms

A stand-in until measured MoE and skim curves join the latency model
(cost_model.latency): each token runs k of E equal experts, so the expert GEMMs do k/E of
the dense FFN's work, and the gather/scatter around them (MoE) or the scorer, TopK and
gathers (skim) add a share of it. Attention's score GEMMs shrink with the square of the
tokens kept; scaling the whole layer linearly over-predicts them, which errs on the safe
side of the budget. The compile-measure-tighten loop corrects what remains.
"""

from __future__ import annotations

from planer.compiler.plan import LayerPlan, MoePlan, Plan
from planer.compiler.spec import ModelSpec
from planer.cost_model.latency import LatencyModel

MOE_OVERHEAD = 1.3  # gathers, scatters and per-expert launches over the experts' GEMMs
SKIM_OVERHEAD = 0.05  # scorer, TopK and gathers, as a share of a dense layer
ROUTER_HIDDEN = 16  # passes.moe_fit.ROUTER_HIDDEN


def moe_ms(model: LatencyModel, width: int, hidden: int, plan: MoePlan) -> float:
    """Predicts a MoE FFN of `width` channels split into `plan.experts`, run top-k per token."""
    per_token = plan.top_k if plan.top_k is not None else plan.experts / 2
    experts = MOE_OVERHEAD * model.ffn(width * per_token / plan.experts)
    # The router's two GEMMs (D·h + h·E) priced as FFN channels (2·D each).
    router = model.ffn(ROUTER_HIDDEN * (hidden + plan.experts) / (2 * hidden))
    return experts + router


def layer_ms(model: LatencyModel, choice: LayerPlan, *, width: int, hidden: int,
             tokens: float = 1.0, dense_layer_ms: float = 0.0) -> float:
    """Predicts one layer's variant at `tokens` (the share of the sequence still active).

    Args:
        model: the block curves.
        choice: the layer's variant (heads, FFN width or MoE, INT8, skim point).
        width: the layer's full FFN width (MoE splits it).
        hidden: the model width.
        tokens: the share of tokens this layer sees, after any skim point before it.
        dense_layer_ms: the dense layer's latency, which prices the skim point's overhead.
    """
    int8 = choice.int8
    if choice.moe is None:
        ms = model.layer_ms(choice.heads, choice.ffn, int8)
    else:
        attn_int8 = int8 if int8 is not None and int8.blocks == "attn" else None
        ms = model.layer_ms(choice.heads, 0, attn_int8) + moe_ms(model, width, hidden,
                                                                  choice.moe)
    extra = SKIM_OVERHEAD * dense_layer_ms if choice.skim_keep is not None else 0.0
    return ms * tokens + extra


def predict(model: LatencyModel, spec: ModelSpec, plan: Plan) -> float:
    """Predicts a whole plan, MoE layers and skim points included."""
    dense = [model.layer_ms(la.attention.heads, la.ffn.width) for la in spec.layers]
    total, tokens = model.overhead_ms, 1.0
    for layer, choice, dense_ms in zip(spec.layers, plan.layers, dense, strict=True):
        if choice.skim_keep is not None:
            tokens *= choice.skim_keep
        total += layer_ms(model, choice, width=layer.ffn.width, hidden=spec.hidden,
                          tokens=tokens, dense_layer_ms=dense_ms)
    return total
