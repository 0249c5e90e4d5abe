"""Fits token-skim predictors on calibration data, picks keep ratios, and reports skimming.

    calibration batches ─ ORT (extra outputs: layer inputs x_BSD, Softmax P_BHSS)
        ─ target per real token: log(n · attention received)  (n real tokens; 0 = uniform)
        ─ LayerNorm ─ Linear(D, Hp) ─ GELU ─ Linear(Hp, 1), MSE, Adam (torch, CPU)
        ─ `Predictor` weights for `TokenSkimConfig.predictors`

Targets (no labels):
  "attention"  attention received in layer i-1 (what the training-free score computes
               in the graph; the predictor reproduces it from the layer input alone).
  "future"     attention received averaged over layers i..L-1 of the dense model. A
               skimmed token stops serving as a key in every later layer, not only the
               next one, so its importance is what all of them would have read from it;
               only the dense model knows that, which is what a predictor can add.
  "drift"      log ||y_L - x_i|| / mean over the sequence: how far the token's final
               state moves from the state it would be forwarded with. For outputs read
               at every position (mean pooling) this is the forwarding error itself.
  "residual"   the same with the point's forwarding map: log ||y_L - A_i(x_i)|| / mean,
               the error a skimmed token would leave in the output (needs the maps).

Forwarding maps (`skim_forward`): per point, ridge regression from the layer input x_i
to the dense model's last-layer rows y over the real tokens but the always-kept first
(closed form, centred; the ridge strength is the one of `RIDGES` with the least error on
the holdout share, never on the fitting rows). Then, with the predictors fitted on those
maps' residuals, `fit_context` refits each map on the rows its predictor skims (the graph's
keep rule, point after point), with the kept tokens' mean final row c as a second input:
y ≈ x_i·W + c·V + b. The dense model's rows stand in for the skimmed model's, so the
context map is a candidate only where it beats the linear one on the holdout rows, and
the compile keeps it only where the skimmed model itself measures better
(`compiler/driver/stages.apply_skim`).

The log of the relative attention keeps sequences of different lengths on one scale
(uniform attention is 0 whatever n is) and tames the heavy tail of [SEP]/punctuation.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from planer.compiler.capture import ActivationReader
from planer.compiler.errors import require_torch
from planer.compiler.spec import ModelSpec, layer_flops, model_flops
from planer.passes.skim_forward import ForwardMap
from planer.passes.token_skim import Predictor, active_masks, keep_count, stream_in, stream_out

logger = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]
TARGETS = ("attention", "future", "drift", "residual")
_TINY = 1e-2  # relative-attention floor inside the log
# Ridge strengths tried, relative to the mean eigenvalue of the centred Gram matrix.
RIDGES = (1e-3, 1e-2, 1e-1, 0.3, 1.0, 3.0)


@dataclasses.dataclass
class FitResult:
    """Fitted predictors and their losses (mean squared error on the log target)."""

    predictors: dict[int, Predictor]
    train_loss: dict[int, tuple[float, float]]  # layer -> (before, after) fitting
    holdout_loss: dict[int, float]  # layer -> after fitting, on rows never fitted


def received_attention(probs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Returns [B, S] attention each token receives: mean over heads and real queries."""
    weights = mask.astype(np.float64) / np.maximum(mask.sum(1, keepdims=True), 1)
    return np.einsum("bhqk,bq->bk", probs.astype(np.float64), weights) / probs.shape[1]


def capture_skim_data(
    model: ir.Model, spec: ModelSpec, layers: Sequence[int], batches: Iterable[Feed],
    *, target: str = "attention", forward: Mapping[int, ForwardMap] | None = None,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Returns layer -> (x [N, D], target [N]) over the real tokens of `batches`."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, not {target!r}")
    if target == "residual" and not (forward and set(layers) <= set(forward)):
        raise ValueError("the residual target needs a forwarding map for every skim layer")
    probs = [layer.attention.nodes[0].outputs[0] for layer in spec.layers]
    inputs = [stream_in(spec.layers[i]) for i in layers]
    reader = ActivationReader(model, [*inputs, *probs])
    # The reader names every value it exposes, in order: inputs first, then probabilities.
    input_names, prob_names = reader.names[:len(inputs)], reader.names[len(inputs):]
    rows: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {i: [] for i in layers}
    for feed in batches:
        out = reader.run(feed)
        mask = np.asarray(feed.get("attention_mask", np.ones(out[reader.names[0]].shape[:2])))
        received = [received_attention(out[name], mask) for name in prob_names]
        real = mask.astype(bool)
        n = mask.sum(1, keepdims=True)
        final = out[reader.main_output]
        for i, name in zip(layers, input_names, strict=True):
            if target in ("drift", "residual"):
                if target == "drift":
                    moved = out[name]
                else:
                    assert forward is not None, "the residual target scores through the maps"
                    moved = forward[i].apply(out[name])
                drift = np.linalg.norm(final - moved, axis=-1) + 1e-6
                mean = (drift * mask).sum(1, keepdims=True) / n
                rows[i].append((out[name][real].astype(np.float32),
                                np.log(drift / mean)[real]))
                continue
            # Layer 0 has no previous attention: its own stands in.
            prev = received[max(i - 1, 0) : max(i, 1)]
            sources = prev if target == "attention" else received[i:]
            score = np.log(np.mean(sources, axis=0) * n + _TINY)
            rows[i].append((out[name][real].astype(np.float32), score[real]))
    return {i: (np.concatenate([r[0] for r in parts]), np.concatenate([r[1] for r in parts]))
            for i, parts in rows.items()}


def fit_predictor(
    x: np.ndarray, y: np.ndarray, *, hidden: int = 64, steps: int = 400, lr: float = 3e-3,
    holdout: float = 0.2, seed: int = 0,
) -> tuple[Predictor, tuple[float, float], float]:
    """Fits LayerNorm ─ Linear ─ GELU ─ Linear to y.

    Returns:
        The predictor, (training MSE before, after) and the MSE on held-out rows.
    """
    torch = require_torch("fitting skim predictors")
    torch.manual_seed(seed)
    order = np.random.default_rng(seed).permutation(len(x))
    n_hold = int(len(x) * holdout)
    fit_rows, hold_rows = order[n_hold:], order[:n_hold]
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
    ln, fc1, fc2 = (torch.nn.LayerNorm(x.shape[1]), torch.nn.Linear(x.shape[1], hidden),
                    torch.nn.Linear(hidden, 1))
    net = torch.nn.Sequential(ln, fc1, torch.nn.GELU(), fc2)
    with torch.no_grad():
        fc2.bias.fill_(float(y[fit_rows].mean()))
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    fx, fy = xt[fit_rows], yt[fit_rows]

    def loss_on(rows: np.ndarray) -> float:
        with torch.no_grad():
            return float(torch.mean((net(xt[rows]).squeeze(-1) - yt[rows]) ** 2))

    before = loss_on(fit_rows)
    batch = min(4096, len(fit_rows))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randint(0, len(fit_rows), (batch,), generator=gen)
        loss = torch.mean((net(fx[pick]).squeeze(-1) - fy[pick]) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    after = loss_on(fit_rows)
    hold = loss_on(hold_rows) if n_hold else float("nan")
    predictor = Predictor(
        gamma=ln.weight.detach().numpy().copy(), beta=ln.bias.detach().numpy().copy(),
        w1=fc1.weight.detach().numpy().T.copy(), b1=fc1.bias.detach().numpy().copy(),
        w2=fc2.weight.detach().numpy().reshape(-1).copy(), b2=float(fc2.bias.item()),
        epsilon=ln.eps,
    )
    return predictor, (before, after), hold


def fit_predictors(
    model: ir.Model, spec: ModelSpec, layers: Sequence[int], batches: Iterable[Feed],
    *, target: str = "attention", hidden: int = 64, steps: int = 400, seed: int = 0,
    forward: Mapping[int, ForwardMap] | None = None,
) -> FitResult:
    """Fits one predictor per skim layer on the dense (canonical) model's activations."""
    data = capture_skim_data(model, spec, layers, batches, target=target, forward=forward)
    result = FitResult({}, {}, {})
    for i, (x, y) in data.items():
        p, losses, hold = fit_predictor(x, y, hidden=hidden, steps=steps, seed=seed)
        result.predictors[i], result.train_loss[i], result.holdout_loss[i] = p, losses, hold
        logger.info("layer%d skim predictor (%s): mse %.3f -> %.3f, holdout %.3f",
                    i, target, losses[0], losses[1], hold)
    return result


# ---------------------------------------------------------------- forwarding maps


def capture_forward_data(model: ir.Model, spec: ModelSpec, layers: Sequence[int],
                         batches: Iterable[Feed]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Returns layer -> (x_i [N, D], y [N, D]) over real tokens but the first of each row."""
    values = [stream_in(spec.layers[i]) for i in layers] + [stream_out(spec.layers[-1])]
    reader = ActivationReader(model, values)
    rows: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {i: [] for i in layers}
    for feed in batches:
        out = reader.run(feed)
        y = out[reader.names[-1]]
        real = np.asarray(feed.get("attention_mask", np.ones(y.shape[:2]))).astype(bool)
        real[:, 0] = False  # always kept: never forwarded
        for i, name in zip(layers, reader.names, strict=False):
            rows[i].append((out[name][real], y[real]))
    return {i: (np.concatenate([r[0] for r in parts]).astype(np.float64),
                np.concatenate([r[1] for r in parts]).astype(np.float64))
            for i, parts in rows.items()}


def _ridge(x: np.ndarray, y: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """Returns (W, b) of y ≈ x·W + b, ridge relative to the centred Gram's mean eigenvalue."""
    mx, my = x.mean(0), y.mean(0)
    xc = x - mx
    gram = xc.T @ xc
    w = np.linalg.solve(gram + ridge * np.trace(gram) / len(gram) * np.eye(len(gram)),
                        xc.T @ (y - my))
    return w, my - mx @ w


def fit_forward_map(x: np.ndarray, y: np.ndarray, hold_x: np.ndarray, hold_y: np.ndarray,
                    ) -> tuple[ForwardMap, dict[str, float]]:
    """Fits y ≈ x·W + b by ridge regression; returns the map and its relative errors.

    The record holds, on the holdout rows, ||y - x||² / ||y - ȳ||² (forwarding as is),
    the same for the fitted map, and the chosen ridge strength.
    """
    spread = float(((hold_y - hold_y.mean(0)) ** 2).sum())

    def error(w: np.ndarray, b: np.ndarray) -> float:
        return float(((hold_x @ w + b - hold_y) ** 2).sum()) / spread

    best = None
    for ridge in RIDGES:
        w, b = _ridge(x, y, ridge)
        e = error(w, b)
        if best is None or e < best[0]:
            best = (e, ridge, w, b)
    assert best is not None
    e, ridge, w, b = best
    d = x.shape[1]
    record = {"identity_error": round(error(np.eye(d), np.zeros(d)), 4),
              "linear_error": round(e, 4), "ridge": ridge}
    return ForwardMap(w.astype(np.float32), b.astype(np.float32)), record


def fit_forward(model: ir.Model, spec: ModelSpec, layers: Sequence[int], batches: Iterable[Feed],
                holdout: Iterable[Feed]) -> tuple[dict[int, ForwardMap], dict[int, dict]]:
    """Fits each skim point's forwarding map on `batches`, chooses and checks on `holdout`."""
    fit = capture_forward_data(model, spec, layers, batches)
    hold = capture_forward_data(model, spec, layers, holdout)
    maps, records = {}, {}
    for i in layers:
        maps[i], records[i] = fit_forward_map(*fit[i], *hold[i])
        logger.info("layer%d forwarding map: holdout error %.3f (as is %.3f), ridge %g", i,
                    records[i]["linear_error"], records[i]["identity_error"], records[i]["ridge"])
    return maps, records


def skim_decisions(x: Mapping[int, np.ndarray], real: np.ndarray, keep: Mapping[int, float],
                   predictors: Mapping[int, Predictor], always_keep: Sequence[int] = (0,),
                   ) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Applies the graph's keep rule point after point to dense layer inputs.

    Args:
        x: point -> its input rows [B, S, D].
        real: [B, S] bool, padding False.
        keep: point -> its keep ratio.
        predictors: point -> its scorer.
        always_keep: positions every point keeps (the graph's default: the first token).

    Returns:
        (point -> the tokens it skims [B, S] bool, the tokens kept to the end [B, S]).
    """
    live = real.copy()
    skimmed = {}
    forced = np.zeros_like(live)
    forced[:, [p for p in always_keep if p < live.shape[1]]] = True
    for i in sorted(keep):
        score = np.where(forced, np.inf, np.where(live, predictors[i].score(x[i]), -np.inf))
        kept = np.zeros_like(live)
        for row in range(live.shape[0]):
            k = keep_count(keep[i], int(live[row].sum()))
            kept[row, np.argsort(-score[row], kind="stable")[:k]] = True
        kept &= live | forced
        skimmed[i], live = live & ~kept, kept
    return skimmed, live


def capture_context_data(
    model: ir.Model, spec: ModelSpec, keep: Mapping[int, float],
    predictors: Mapping[int, Predictor], batches: Iterable[Feed],
) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Returns point -> (x_i, c, y) [N, D] over the rows the point skims.

    c is the mean final row of the tokens kept to the end in the row's sequence.
    """
    layers = sorted(keep)
    values = [stream_in(spec.layers[i]) for i in layers] + [stream_out(spec.layers[-1])]
    reader = ActivationReader(model, values)
    rows: dict[int, list[tuple[np.ndarray, ...]]] = {i: [] for i in layers}
    for feed in batches:
        out = reader.run(feed)
        y = out[reader.names[-1]].astype(np.float64)
        real = np.asarray(feed.get("attention_mask", np.ones(y.shape[:2]))).astype(bool)
        x = {i: out[name].astype(np.float64) for i, name in zip(layers, reader.names,
                                                                 strict=False)}
        skimmed, final = skim_decisions(x, real, keep, predictors)
        weights = final[..., None].astype(np.float64)
        context = (y * weights).sum(1) / np.maximum(weights.sum(1), 1.0)  # [B, D]
        for i in layers:
            which = skimmed[i]
            batch_of = np.nonzero(which)[0]
            rows[i].append((x[i][which], context[batch_of], y[which]))
    return {i: tuple(np.concatenate([r[k] for r in parts]) for k in range(3))  # type: ignore[misc]
            for i, parts in rows.items()}


def fit_context_map(fit: tuple[np.ndarray, np.ndarray, np.ndarray],
                    hold: tuple[np.ndarray, np.ndarray, np.ndarray],
                    ) -> tuple[ForwardMap, dict[str, Any]]:
    """Fits y ≈ x·W + c·V + b by ridge regression, or y ≈ x·W + b where that does better.

    Both are chosen (map and ridge strength) by their relative error on the holdout rows;
    the record holds both errors, forwarding as is, and which map was kept.
    """
    (x, c, y), (hx, hc, hy) = fit, hold
    spread = float(((hy - hy.mean(0)) ** 2).sum())
    d = x.shape[1]
    best: dict[str, tuple[float, float, np.ndarray, np.ndarray]] = {}
    for kind, feats, hold_feats in (("linear", x, hx), ("context", np.hstack([x, c]),
                                                        np.hstack([hx, hc]))):
        for ridge in RIDGES:
            w, b = _ridge(feats, y, ridge)
            e = float(((hold_feats @ w + b - hy) ** 2).sum()) / spread
            if kind not in best or e < best[kind][0]:
                best[kind] = (e, ridge, w, b)
    kind = "context" if best["context"][0] < best["linear"][0] else "linear"
    e, ridge, w, b = best[kind]
    fmap = ForwardMap(w[:d].astype(np.float32), b.astype(np.float32),
                      w[d:].astype(np.float32) if kind == "context" else None)
    record = {"identity_error": round(float(((hx - hy) ** 2).sum()) / spread, 4),
              "linear_error": round(best["linear"][0], 4),
              "context_error": round(best["context"][0], 4), "kept": kind, "ridge": ridge,
              "rows": len(x)}
    return fmap, record


def fit_context(model: ir.Model, spec: ModelSpec, keep: Mapping[int, float],
                predictors: Mapping[int, Predictor], batches: Iterable[Feed],
                holdout: Iterable[Feed], fallback: Mapping[int, ForwardMap],
                ) -> tuple[dict[int, ForwardMap], dict[int, dict]]:
    """Refits each point's map on the rows its predictor skims, with the context term.

    A point that skims no row of the fitting or the holdout share (texts too short to
    skim) keeps its `fallback` map.

    Raises:
        ValueError: a point has no predictor.
    """
    missing = sorted(set(keep) - set(predictors))
    if missing:
        raise ValueError(f"context maps follow the fitted predictors; layer(s) {missing} have "
                         "none")
    fit = capture_context_data(model, spec, keep, predictors, batches)
    hold = capture_context_data(model, spec, keep, predictors, holdout)
    maps, records = {}, {}
    for i in sorted(keep):
        if not len(fit[i][0]) or not len(hold[i][0]):
            maps[i], records[i] = fallback[i], {"kept": "linear", "rows": len(fit[i][0])}
            continue
        maps[i], records[i] = fit_context_map(fit[i], hold[i])
        logger.info("layer%d forwarding map (%s): holdout error %.3f with context, %.3f linear",
                    i, records[i]["kept"], records[i]["context_error"],
                    records[i]["linear_error"])
    return maps, records


# ---------------------------------------------------------------- ratios for a FLOPs target


def skimmed_flops(spec: ModelSpec, keep: Sequence[float | None], *, seq_len: int,
                  batch: int = 1) -> int:
    """Counts FLOPs when layer i sees the tokens left by the cumulative keep ratios."""
    total = 2 * batch * seq_len * spec.other_matmul_macs_per_token
    tokens = seq_len
    for layer, r in zip(spec.layers, keep, strict=True):
        if r is not None:
            tokens = keep_count(r, tokens)
        a, f = layer.attention, layer.ffn
        total += layer_flops(hidden=spec.hidden, heads=a.heads, head_size=a.head_size,
                             ffn=f.width, batch=batch, seq_len=tokens, gated=f.gated)
    return total


def skim_keep_for_flops(
    spec: ModelSpec, target_ratio: float, *, seq_len: int, batch: int = 1, start: int = 1,
    mode: str = "geometric",
) -> list[float | None]:
    """Picks per-layer skim_keep so FLOPs are at most `target_ratio` of the dense model's.

    `mode="geometric"` keeps the same ratio r before every layer from `start` on (tokens
    thin out progressively, as in PoWER-BERT/Transkimmer schedules); `mode="single"`
    skims once, before layer `start`. Start at 1 or later for training-free scores
    (layer 0 has no previous attention). The largest r meeting the target is found by
    bisection; if even one token per sequence cannot meet it, the smallest r is returned.

    Returns:
        One entry per layer: None (no skim point) or r in (0, 1].
    """
    if mode not in ("geometric", "single"):
        raise ValueError(f"mode must be 'geometric' or 'single', not {mode!r}")
    dense = model_flops(spec, batch=batch, seq_len=seq_len)

    def plan(r: float) -> list[float | None]:
        if mode == "single":
            return [r if i == start else None for i in range(len(spec.layers))]
        return [r if i >= start else None for i in range(len(spec.layers))]

    if skimmed_flops(spec, plan(1.0), seq_len=seq_len, batch=batch) <= target_ratio * dense:
        return [None] * len(spec.layers)
    lo, hi = 1.0 / seq_len, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if skimmed_flops(spec, plan(mid), seq_len=seq_len, batch=batch) <= target_ratio * dense:
            lo = mid
        else:
            hi = mid
    return plan(round(math.floor(lo * 1000) / 1000, 3) or 1.0 / seq_len)


# ---------------------------------------------------------------- report


def skim_report(
    dense: ir.Model, skimmed: ir.Model, points: Sequence[int], holdout: Sequence[Feed],
    *, num_layers: int,
) -> dict[str, object]:
    """Measures kept tokens per skim point and output fidelity on held-out batches.

    Returns mean kept tokens per layer (all layers: a layer sees what the last skim point
    before it kept), mean real tokens, and cosine to the dense model's final hidden
    states: per real token and mean-pooled per sequence, each as mean and 5th percentile.
    """
    masks = active_masks(skimmed)
    missing = sorted(set(points) - set(masks))
    if missing:
        raise ValueError(f"the skimmed model has no skim point before layer(s) {missing}")
    dense_reader = ActivationReader(dense, [])
    skim_reader = ActivationReader(skimmed, [masks[i] for i in points])
    names = dict(zip(skim_reader.names, points, strict=True))  # in the order given
    kept: dict[int, list[float]] = {i: [] for i in points}
    real, token_cos, pooled_cos = [], [], []
    for feed in holdout:
        a = dense_reader.run(feed)[dense_reader.main_output].astype(np.float64)
        out = skim_reader.run(feed)
        b = out[skim_reader.main_output].astype(np.float64)
        mask = (np.asarray(feed["attention_mask"]).astype(bool) if "attention_mask" in feed
                else np.ones(a.shape[:2], bool))  # ViT: every patch is real
        real.extend(mask.sum(1).tolist())
        for name, i in names.items():
            kept[i].extend(out[name].sum(1).tolist())
        token_cos.extend(_cosine(a[mask], b[mask]).tolist())
        w = mask[..., None].astype(np.float64)
        pooled_cos.extend(_cosine((a * w).sum(1) / w.sum(1), (b * w).sum(1) / w.sum(1)).tolist())
    per_layer, current = [], float(np.mean(real))
    for i in range(num_layers):
        if i in kept:
            current = float(np.mean(kept[i]))
        per_layer.append(round(current, 2))
    return {
        "mean_real_tokens": round(float(np.mean(real)), 2),
        "mean_kept_tokens_per_layer": per_layer,
        "token_cosine": {"mean": float(np.mean(token_cos)),
                         "p5": float(np.percentile(token_cos, 5))},
        "pooled_cosine": {"mean": float(np.mean(pooled_cos)),
                          "p5": float(np.percentile(pooled_cos, 5))},
    }


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.maximum(den, 1e-12)
