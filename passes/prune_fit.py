"""Fits head/channel pruning on unlabelled calibration data: importance, allocation, refit.

Importance (label-free). A head's or channel's contribution to its block output is
exact and separable: attention out = Σ_h ctx_h·Wo_h + bo, FFN out = Σ_j a_j·w2_j + b2.
Removing unit u and folding its mean into the bias (FLAP's bias compensation) changes
the block output by c_u − E[c_u]. Its cost is that change relative to the residual
stream r the block adds to: E‖c_u − E[c_u]‖² / E‖r‖², the relative perturbation the
next LayerNorm or RMSNorm sees, comparable across layers. Outlier tokens are taken
apart (`token_weights`): Llama-style decoders grow massive activations (a few channels
on a few tokens, ~1000x the rest) from some layer on, SmolLM2-135M's from layer 12,
where E‖r‖² jumps ~1000x. Divided by that mean, every later unit looked ~1000x cheaper
and a 50% FLOPs allocation gutted layers 12-29 (perplexity 79.7 → 1,932). A token more
than OUTLIER medians above the others has its change taken relative to its own
residual (the next norm divides it by its own norm) and its energy capped in the mean.
A gated FFN's
a_j = act(x·g_j)·(x·u_j) is W2's input as well (compiler.gated_ffn), so the same
holds. Weight magnitude
ignores both how large the activations are and how much they vary; a unit that is
large but constant costs nothing once its mean moves into the bias.

Allocation. Units are removed greedily, cheapest cost per FLOP saved first, from one
global queue over every layer's heads and channel groups, until the FLOPs target is
met. Layers therefore end up with different widths where their sensitivity differs.

Reconstruction. With the kept units chosen, each block's output projection (O rows,
W2 rows) and bias are refit by ridge least squares so the pruned block reproduces the
original block's output on calibration tokens (Kwon et al.'s layer-wise refit, bias
included). Kept heads' contexts and kept channels' activations do not change when
others are removed, so the fit is exact-data, one linear solve per block.

A refit can also fit noise: with few tokens per kept unit (MPNet's 3072-wide FFNs) it
made held-out error worse than plain slicing in some layers. So `choose_output` judges
three candidates per block on the held-out tokens and keeps the best: the sliced rows
as they are, the sliced rows with the dropped units' mean folded into the bias (FLAP's
compensation), and the refit. Plain slicing is a candidate, so the kept error is never
above it; the fit record says which was kept.

Layers whose heads head pruning cannot rewrite (compiler.support) keep every head in
the allocation; their FFN channels are allocated as usual.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from planer.compiler.capture import capture_tokens
from planer.compiler.spec import LayerSpec, ModelSpec, layer_flops, model_flops
from planer.compiler.support import head_pruning_problem

logger = logging.getLogger(__name__)

RIDGE = 1e-3  # relative to the mean diagonal of XᵀX: stabilises the solve on few tokens


@dataclasses.dataclass
class LayerActivations:
    """Calibration token rows for one layer (same tokens for every array)."""

    ctx: np.ndarray  # [N, I] attention context entering the O projection
    attn_residual: np.ndarray  # [N, D] residual stream the attention output is added to
    act: np.ndarray  # [N, F] FFN activation entering W2
    ffn_residual: np.ndarray  # [N, D]


@dataclasses.dataclass
class Importance:
    """Per-unit removal costs (relative to the residual energy), higher = more important."""

    heads: list[np.ndarray]  # per layer, [H]
    channels: list[np.ndarray]  # per layer, [F]


def capture_layers(
    model: ir.Model, spec: ModelSpec, batches: Sequence[dict[str, np.ndarray]], *,
    max_tokens: int = 4096, seed: int = 0,
) -> list[LayerActivations]:
    """Captures every layer's context, FFN activation and residuals in one ORT pass per batch."""
    values: list[ir.Value] = []
    for layer in spec.layers:
        a, f = layer.attention, layer.ffn
        values += [a.o.input, residual_of(a.out, a.x), f.w2.input, residual_of(f.out, f.x)]
    arrays = capture_tokens(model, values, batches, max_tokens=max_tokens, seed=seed)
    return [LayerActivations(*arrays[4 * i: 4 * i + 4]) for i in range(len(spec.layers))]


def residual_of(block_out: ir.Value, fallback: ir.Value) -> ir.Value:
    """Returns the other operand of the residual Add reading `block_out`."""
    for node in block_out.consumers():
        if node.op_type == "Add" and len(node.inputs) == 2:
            other = node.inputs[1] if node.inputs[0] is block_out else node.inputs[0]
            if other is not None and other.const_value is None:
                return other
    return fallback


def importance(spec: ModelSpec, acts: list[LayerActivations]) -> Importance:
    """Scores every head and channel by its bias-compensated removal cost.

    A unit's cost is its centred contribution to the block output, relative to the
    residual energy, outlier tokens relative to their own (`token_weights`).
    """
    heads, channels = [], []
    for layer, act in zip(spec.layers, acts, strict=True):
        a, f = layer.attention, layer.ffn
        d = a.head_size
        wo = a.o.w().astype(np.float64)
        weights = token_weights(act.attn_residual)
        scores = []
        for h in range(a.heads):
            contribution = act.ctx[:, h * d:(h + 1) * d].astype(np.float64) @ wo[h * d:(h + 1) * d]
            scores.append(_centered_energy(contribution, weights))
        heads.append(np.asarray(scores))
        w2_norm = np.sum(f.w2.w().astype(np.float64) ** 2, axis=1)
        x = act.act.astype(np.float64)
        centered = (x - x.mean(axis=0, keepdims=True)) ** 2
        channels.append(token_weights(act.ffn_residual) @ centered * w2_norm)
    return Importance(heads=heads, channels=channels)


OUTLIER = 20.0  # a token whose residual energy exceeds this many medians is an outlier


def token_weights(residual: np.ndarray) -> np.ndarray:
    """Returns per-token weights w_t: a unit's cost is Σ_t w_t ‖c_u,t − E[c_u]‖².

    Energies e_t = ‖r_t‖² up to OUTLIER medians weigh alike, 1 / (N · mean e): the mean
    squared change relative to the mean residual energy. A token above that cap, e_t =
    x · cap, counts 1/x as much, and only the cap enters the mean: its own change is taken
    relative to its own residual, as the next norm takes it, and it no longer sets the
    scale for the others. Without such tokens (BERT-style encoders: MiniLM's largest is
    5.5 medians) the weights are the plain mean's.
    """
    energy = np.sum(residual.astype(np.float64) ** 2, axis=1)
    cap = OUTLIER * float(np.median(energy))
    if cap <= 0:
        cap = float(np.max(energy)) or 1.0
    excess = np.maximum(energy / cap, 1.0)
    return 1.0 / (energy.size * excess * float(np.mean(energy / excess)))


def _centered_energy(rows: np.ndarray, weights: np.ndarray) -> float:
    centered = rows - rows.mean(axis=0, keepdims=True)
    return float(weights @ np.sum(centered**2, axis=1))


def allocate(
    spec: ModelSpec, scores: Importance, target_ratio: float, *,
    batch: int, seq_len: int, channel_group: int | None = None,
) -> list[tuple[int, int]]:
    """Chooses per-layer (heads, channels) kept so model FLOPs <= target_ratio of the original.

    Units go cheapest-cost-per-FLOP first from one global queue; channels move in groups
    (default F/64) so widths stay GEMM-friendly.
    """
    total = model_flops(spec, batch=batch, seq_len=seq_len)
    fixed = total - sum(_flops(layer, [layer.attention.heads, layer.ffn.width], batch, seq_len)
                        for layer in spec.layers)
    return allocate_budget(
        spec, scores, lambda layer, h, f: _flops(layer, [h, f], batch, seq_len),
        target_ratio * total - fixed, channel_group=channel_group,
    )


LayerCost = Callable[[LayerSpec, int, int], float]


def allocate_budget(
    spec: ModelSpec, scores: Importance, cost: LayerCost, budget: float, *,
    channel_group: int | None = None,
) -> list[tuple[int, int]]:
    """Removes units, least importance per unit of `cost` saved first, until Σ cost <= budget.

    Args:
        spec: the model.
        scores: per-unit removal costs (importance).
        cost: a layer's cost (FLOPs, predicted milliseconds, ...) at (heads, channels).
        budget: the most the layers together may cost.
        channel_group: channels removed per step (default F/64).
    """
    kept = [[layer.attention.heads, layer.ffn.width] for layer in spec.layers]
    orders = [
        (np.argsort(scores.heads[i], kind="stable"), np.argsort(scores.channels[i], kind="stable"))
        for i in range(len(spec.layers))
    ]
    removed = [[0, 0] for _ in spec.layers]
    groups = [channel_group or max(1, layer.ffn.width // 64) for layer in spec.layers]
    fixed_heads = {i for i, layer in enumerate(spec.layers) if head_pruning_problem(layer)}
    heap: list[tuple[float, int, int]] = []

    def step_of(i: int, kind: int) -> int:
        if kind == 0 and i in fixed_heads:
            return 0
        return 1 if kind == 0 else min(groups[i], kept[i][1])

    def push(i: int, kind: int) -> None:
        step = step_of(i, kind)
        if step == 0 or kept[i][kind] - step < 0:
            return
        order = orders[i][kind]
        chosen = order[removed[i][kind]: removed[i][kind] + step]
        importance_lost = float(np.sum((scores.heads if kind == 0 else scores.channels)[i][chosen]))
        after = [kept[i][0] - (kind == 0), kept[i][1] - step * (kind == 1)]
        saved = cost(spec.layers[i], *kept[i]) - cost(spec.layers[i], *after)
        heapq.heappush(heap, (importance_lost / max(saved, 1e-12), i, kind))

    for i in range(len(spec.layers)):
        push(i, 0)
        push(i, 1)
    current = sum(cost(layer, *kept[i]) for i, layer in enumerate(spec.layers))
    while current > budget and heap:
        _, i, kind = heapq.heappop(heap)
        step = step_of(i, kind)
        before = cost(spec.layers[i], *kept[i])
        kept[i][kind] -= step
        removed[i][kind] += step
        current -= before - cost(spec.layers[i], *kept[i])
        push(i, kind)
    return [(h, f) for h, f in kept]


def _flops(layer: LayerSpec, kept: list[int], batch: int, seq_len: int) -> int:
    a = layer.attention
    return layer_flops(hidden=a.q.in_features, heads=kept[0], head_size=a.head_size,
                       ffn=kept[1], batch=batch, seq_len=seq_len, gated=layer.ffn.gated)


def kept_units(scores: np.ndarray, count: int) -> tuple[int, ...]:
    """Returns the sorted indices of the `count` most important units."""
    order = np.argsort(-scores, kind="stable")
    return tuple(sorted(int(i) for i in order[:count]))


def refit(
    x_keep: np.ndarray, y: np.ndarray, *, ridge: float = RIDGE
) -> tuple[np.ndarray, np.ndarray]:
    """Solves min ‖x_keep·W + b − y‖² + λ‖W‖² and returns (W [K, D], b [D]) in float32."""
    x = x_keep.astype(np.float64)
    t = y.astype(np.float64)
    if x.shape[1] == 0:
        return np.zeros((0, t.shape[1]), np.float32), t.mean(axis=0).astype(np.float32)
    mx, my = x.mean(axis=0), t.mean(axis=0)
    xc, yc = x - mx, t - my
    gram = xc.T @ xc
    lam = ridge * float(np.mean(np.diag(gram))) + 1e-12
    w = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), xc.T @ yc)
    b = my - mx @ w
    return w.astype(np.float32), b.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class OutputChoice:
    """The output projection a pruned block keeps, and the held-out errors behind it.

    Attributes:
        fit: (W [K, D], b [D]) replacing the kept rows and the bias, or None to keep the
            sliced rows and the original bias.
        record: `error_sliced`, `error_bias`, `error_refit` (relative errors on the
            judging tokens; the last two only when fitted) and `kept`, the winner.
    """

    fit: tuple[np.ndarray, np.ndarray] | None
    record: dict[str, Any]


def choose_output(
    x_fit: np.ndarray, keep: np.ndarray, w: np.ndarray, b: np.ndarray | None, *,
    x_check: np.ndarray | None = None, reconstruct: bool = True,
) -> OutputChoice:
    """Fits a pruned block's output projection and keeps whichever candidate errs least.

    Candidates: `sliced` (the kept rows of `w` and `b` as they are), `bias` (the same
    rows, `b` plus the mean the dropped units added on `x_fit`) and `refit` (ridge least
    squares on `x_fit`). Each is judged by its relative error on `x_check` (held-out
    rows of the block input; `x_fit` when there are none), so the kept error never
    exceeds slicing's. With `reconstruct` False only slicing is measured.

    Args:
        x_fit: [N, F] block input (attention context or FFN activation) to fit on.
        keep: indices of the kept input units (columns of x, rows of w).
        w: [F, D] output projection.
        b: [D] its bias, or None.
        x_check: [M, F] held-out rows to judge the candidates on.
        reconstruct: whether to fit the bias and refit candidates.
    """
    x_check = x_fit if x_check is None else x_check
    target = _affine(x_check, w, b)
    bias = np.zeros(w.shape[1], np.float64) if b is None else b.astype(np.float64)
    candidates: dict[str, tuple[np.ndarray, np.ndarray]] = {"sliced": (w[keep], bias)}
    if reconstruct:
        dropped = np.setdiff1d(np.arange(w.shape[0]), keep)
        mean = x_fit[:, dropped].astype(np.float64).mean(axis=0) @ w[dropped].astype(np.float64)
        candidates["bias"] = (w[keep], bias + mean)
        candidates["refit"] = refit(x_fit[:, keep], _affine(x_fit, w, b))
    errors = {name: relative_error(_affine(x_check[:, keep], *wb), target)
              for name, wb in candidates.items()}
    kept = min(errors, key=lambda name: (errors[name], name != "sliced"))
    record: dict[str, Any] = {f"error_{name}": round(e, 5) for name, e in errors.items()}
    record["kept"] = kept
    if kept == "sliced":
        return OutputChoice(None, record)
    w_kept, b_kept = candidates[kept]
    dtype = w.dtype
    return OutputChoice((w_kept.astype(dtype), b_kept.astype(dtype)), record)


def _affine(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    y = x.astype(np.float64) @ w.astype(np.float64)
    return y + b.astype(np.float64) if b is not None else y


def relative_error(pred: np.ndarray, target: np.ndarray) -> float:
    """Returns ‖pred − target‖² / ‖target − mean(target)‖² over token rows."""
    t = target.astype(np.float64)
    denom = float(np.sum((t - t.mean(axis=0)) ** 2)) or 1.0
    return float(np.sum((pred.astype(np.float64) - t) ** 2)) / denom
