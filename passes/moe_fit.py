"""Fits what the FFN -> MoE rewrite needs: expert groups, routers, and honest quality numbers.

Dimensions: N calibration tokens, D model width, F FFN width, E experts, G = F/E neurons
per expert, h router width.

    W1_DF ─ L2-normalise columns ─ balanced k-means ─ experts_EG (exact regrouping)
    x_ND, a_NF (captured through ORT) ─ n_NE = || a[:, S_e] · W2[S_e, :] ||
    x_ND ─ Linear(D,h) ─ ReLU ─ Linear(h,E) ─ Abs ≈ n_NE   (MSE, Adam, no labels)

The router follows DSTI: it regresses each expert's output norm, so any selection rule
(static top-k, or dynamic-k `r_e >= (1 - tau) * max r`) can be applied afterwards and a
single fit yields a whole cost/quality curve. With DSTI's ReLU-fication (a plan's
`"activation": "relu"`) the experts run ReLU on the captured pre-activations instead of
the FFN's own activation: the router regresses the ReLU experts' norms, and the error
numbers compare against the original (GELU) FFN, so they include what the swap costs
before any training. Quality is measured on held-out tokens the
fit never saw: router recall (share of the total expert-output norm the chosen experts
carry), experts per token, and the FFN output's relative reconstruction error.

Capture goes through ORT (`compiler.capture`); torch only trains the small router on the
captured arrays.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from scipy.optimize import linear_sum_assignment

from planer.compiler.calibration import CalibrationSet
from planer.compiler.capture import capture_tokens
from planer.compiler.errors import require_torch
from planer.compiler.plan import MoePlan
from planer.compiler.spec import FfnSpec, ModelSpec

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class Router:
    """A gate `Abs(Relu(x·w1 + b1)·w2 + b2)` predicting each expert's output norm."""

    w1: np.ndarray  # [D, h]
    b1: np.ndarray  # [h]
    w2: np.ndarray  # [h, E]
    b2: np.ndarray  # [E]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Scores tokens x_ND, [N, E]."""
        hidden = np.maximum(x @ self.w1 + self.b1, 0.0)
        return np.abs(hidden @ self.w2 + self.b2)


@dataclasses.dataclass(frozen=True)
class LayerQuality:
    """Held-out quality of one layer's MoE (all shares in [0, 1])."""

    layer: int
    activation: str
    sparsity: float  # share of neurons with pre-activation <= 0 (off) on calibration tokens
    oracle_recall: float  # norm share of the best possible expert choice at the same count
    router_recall: float  # norm share of the router's chosen experts
    experts_per_token: float
    reconstruction_error: float  # ||y_moe - y_dense|| / ||y_dense|| (FFN output with b2)
    expert_sum_error: float  # the same error relative to the FFN output without b2
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        """Returns the numbers rounded for report.json."""
        return {k: (round(v, 4) if isinstance(v, float) else v)
                for k, v in dataclasses.asdict(self).items()}


# ---------------------------------------------------------------- experts


def cluster_experts(w1_DF: np.ndarray, experts: int, *, iterations: int = 8,
                    seed: int = 0) -> np.ndarray:
    """Groups the F neurons into `experts` equal groups by balanced k-means on W1 columns.

    Neurons are the L2-normalised columns of W1 (rows of torch's weight); each round
    assigns them to centroids under an equal-size constraint (a linear assignment against
    every centroid repeated G times), then recomputes the centroids.

    Returns:
        experts_EG, int64: row e lists expert e's neurons in increasing order.
    """
    width = w1_DF.shape[1]
    if experts < 1 or width % experts:
        raise ValueError(f"{experts} experts do not divide {width} FFN channels evenly")
    size = width // experts
    points = w1_DF.T.astype(np.float64)
    points /= np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    centroids = points[rng.choice(width, size=experts, replace=False)]
    assign = np.zeros(width, dtype=np.int64)
    for step in range(iterations):
        cost = -(points @ centroids.T)  # [F, E]
        _, cols = linear_sum_assignment(np.repeat(cost, size, axis=1))
        new = cols // size
        if step > 0 and np.array_equal(new, assign):
            break
        assign = new
        for e in range(experts):
            mean = points[assign == e].mean(axis=0)
            centroids[e] = mean / max(np.linalg.norm(mean), 1e-12)
    groups = [np.flatnonzero(assign == e) for e in range(experts)]
    return np.stack(groups).astype(np.int64)


def contiguous_experts(width: int, experts: int) -> np.ndarray:
    """Returns the trivial split (neurons in order), for tests and as a neutral baseline."""
    return np.arange(width, dtype=np.int64).reshape(experts, width // experts)


def expert_norms(a_NF: np.ndarray, w2_FD: np.ndarray, experts_EG: np.ndarray) -> np.ndarray:
    """Returns n_NE, the L2 norm of each expert's contribution to the FFN output per token."""
    norms = np.empty((a_NF.shape[0], experts_EG.shape[0]))
    for e, group in enumerate(experts_EG):
        norms[:, e] = np.linalg.norm(a_NF[:, group] @ w2_FD[group], axis=1)
    return norms


# ---------------------------------------------------------------- router


# Router hidden width h. Measured on MiniLM (8 experts top-2, held-out SST-2 tokens): recall
# within 0.011 of oracle routing at h = 16 against 0.008 at h = 64, while h = 64's first
# GEMM cost the MoE FFN about 6% of its time at 128 tokens (2.36x vs 2.50x over dense).
ROUTER_HIDDEN = 16


def fit_router(x_ND: np.ndarray, norms_NE: np.ndarray, *, hidden: int = ROUTER_HIDDEN,
               steps: int = 800,
               batch: int = 1024, lr: float = 3e-3, seed: int = 0) -> Router:
    """Trains `Linear(D,h) -> ReLU -> Linear(h,E) -> Abs` to regress expert norms (MSE)."""
    torch = require_torch("fitting MoE routers")  # local: a heavy import only fitting needs
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(x_ND, dtype=torch.float32)
    scale = float(norms_NE.mean()) or 1.0  # unit-scale targets make one lr fit every layer
    y = torch.as_tensor(norms_NE / scale, dtype=torch.float32)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, y.shape[1]))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        rows = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=gen)
        loss = torch.nn.functional.mse_loss(net(x[rows]).abs(), y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    (w1, b1, w2, b2) = (p.detach().numpy().astype(np.float64) for p in net.parameters())
    return Router(w1=w1.T.astype(np.float32), b1=b1.astype(np.float32),
                  w2=(w2.T * scale).astype(np.float32), b2=(b2 * scale).astype(np.float32))


def select(scores_NE: np.ndarray, *, top_k: int | None = None,
           tau: float | None = None) -> np.ndarray:
    """Returns the boolean selection [N, E]: the k best (ties kept) or dynamic-k by tau.

    Mirrors the graph exactly: top-k keeps every expert scoring at least the k-th best
    score; dynamic-k keeps every expert with `r_e >= (1 - tau) * max r`. The best expert
    always passes either rule.
    """
    if (top_k is None) == (tau is None):
        raise ValueError("select needs exactly one of top_k or tau")
    if top_k is not None:
        kth = -np.sort(-scores_NE, axis=1)[:, top_k - 1:top_k]
        return scores_NE >= kth
    threshold = scores_NE.max(axis=1, keepdims=True) * np.float32(1.0 - float(tau or 0.0))
    return scores_NE >= threshold


# ---------------------------------------------------------------- fitting a model


@dataclasses.dataclass(frozen=True, eq=False)
class FittedLayer:
    """One layer's fitted experts and router, with held-out arrays to score selections."""

    layer: int
    activation: str
    experts: np.ndarray  # [E, G]
    router: Router
    sparsity: float
    holdout_scores: np.ndarray  # router output on held-out tokens [M, E]
    holdout_norms: np.ndarray  # true expert norms on held-out tokens [M, E]
    holdout_expert_out: np.ndarray  # [E, M, D] float32, each expert's contribution
    holdout_dense: np.ndarray  # [M, D] dense FFN output incl. b2
    # [M, D] dense output minus (experts' sum + b2): what a changed expert activation
    # (ReLU-fication) loses with every expert chosen; None when the experts are exact.
    activation_error: np.ndarray | None = None

    def quality(self, plan: MoePlan) -> LayerQuality:
        """Scores a selection rule on the held-out tokens."""
        chosen = select(self.holdout_scores, top_k=plan.top_k, tau=plan.tau)
        oracle = select(self.holdout_norms, top_k=max(1, round(chosen.sum(1).mean())))
        # Aggregate shares: tokens whose FFN is silent (all norms 0) neither help nor hurt.
        total = max(float(self.holdout_norms.sum()), 1e-12)
        recall = float((self.holdout_norms * chosen).sum() / total)
        best = float((self.holdout_norms * oracle).sum() / total)
        dropped = np.einsum("ne,end->nd", (~chosen).astype(np.float32), self.holdout_expert_out)
        if self.activation_error is not None:
            dropped = dropped + self.activation_error
        dense_norm = max(float(np.linalg.norm(self.holdout_dense)), 1e-12)
        error = float(np.linalg.norm(dropped)) / dense_norm
        experts_norm = max(float(np.linalg.norm(self.holdout_expert_out.sum(0))), 1e-12)
        return LayerQuality(
            layer=self.layer, activation=self.activation, sparsity=self.sparsity,
            oracle_recall=best, router_recall=recall,
            experts_per_token=float(chosen.sum(1).mean()), reconstruction_error=error,
            expert_sum_error=float(np.linalg.norm(dropped)) / experts_norm,
            tokens=int(chosen.shape[0]),
        )


def fit_layers(
    model: ir.Model,
    spec: ModelSpec,
    calibration: CalibrationSet,
    experts: Mapping[int, int],
    *,
    method: str = "weights",
    activations: Mapping[int, str] | None = None,
    router_hidden: int = ROUTER_HIDDEN,
    steps: int = 800,
    max_tokens: int = 8192,
    holdout_tokens: int = 2048,
    seed: int = 0,
) -> dict[int, FittedLayer]:
    """Fits experts and a router for each listed layer (layer index -> expert count).

    Args:
        model: the model as the MoE pass will see it (after pruning); not changed.
        spec: its blocks (`find_blocks` on that model).
        calibration: fitting batches and a disjoint holdout for the quality numbers.
        experts: layer index -> number of experts E (must divide the FFN width).
        method: "weights" (balanced k-means on W1 columns, DSTI) or "contiguous".
        activations: layer index -> the experts' activation where it differs from the
            FFN's ("relu": DSTI's ReLU-fication); other layers keep the FFN's own.
        router_hidden: the router's hidden width h.
        steps: Adam steps of router training.
        max_tokens: fitting tokens kept (seeded subsample).
        holdout_tokens: held-out tokens kept for the quality numbers.
        seed: seeds clustering, subsampling and training.
    """
    fitted = {}
    for layer in spec.layers:
        if layer.index not in experts:
            continue
        ffn = layer.ffn
        values = [ffn.x, ffn.w2.input, *_pre_activation(ffn)]
        fit = capture_tokens(model, values, calibration.batches, max_tokens=max_tokens, seed=seed)
        held = capture_tokens(model, values, calibration.holdout or calibration.batches,
                              max_tokens=holdout_tokens, seed=seed + 1)
        fitted[layer.index] = _fit_layer(layer.index, ffn, experts[layer.index], fit, held,
                                         method=method, hidden=router_hidden, steps=steps,
                                         seed=seed,
                                         activation=(activations or {}).get(layer.index))
        logger.info("fitted router for %s", ffn.block)
    return fitted


def _pre_activation(ffn: FfnSpec) -> list[ir.Value]:
    root = activation_root(ffn)
    return [root] if root is not None else []


def activation_root(ffn: FfnSpec) -> ir.Value | None:
    """Returns the value the activation region starts from (W1's output, bias included)."""
    produced = {id(v) for n in ffn.nodes for v in n.outputs}
    for node in ffn.nodes:
        for item in node.inputs:
            if item is None or id(item) in produced or item.const_value is not None:
                continue
            producer = item.producer()
            if producer is not None and producer.op_type == "Constant":
                continue
            return item
    return None


def _fit_layer(index: int, ffn: FfnSpec, count: int, fit: Sequence[np.ndarray],
               held: Sequence[np.ndarray], *, method: str, hidden: int, steps: int,
               seed: int, activation: str | None = None) -> FittedLayer:
    w1, w2 = ffn.w1.w(), ffn.w2.w().astype(np.float64)
    relufied = activation == "relu" and ffn.activation != "relu"
    if relufied and len(fit) < 3:
        raise ValueError(f"{ffn.block}: its pre-activation cannot be found to ReLU-fy it")
    b2 = ffn.w2.b()
    if method == "weights":
        groups = cluster_experts(w1, count, seed=seed)
    elif method == "contiguous":
        groups = contiguous_experts(w1.shape[1], count)
    else:
        raise ValueError(f"unknown expert split method {method!r}")
    # The experts' activations: the captured ones, or ReLU of the pre-activations.
    x_fit, a_fit = fit[0], np.maximum(fit[2], 0.0) if relufied else fit[1]
    router = fit_router(x_fit, expert_norms(a_fit, w2, groups), hidden=hidden, steps=steps,
                        seed=seed)
    pre = fit[2] if len(fit) > 2 else a_fit
    x_h, a_h = held[0], np.maximum(held[2], 0.0) if relufied else held[1]
    parts = np.stack([(a_h[:, g] @ w2[g]).astype(np.float32) for g in groups])
    bias = 0 if b2 is None else b2
    dense = (held[1] @ w2 if relufied else parts.sum(0)) + bias
    return FittedLayer(
        layer=index, activation="relu" if relufied else ffn.activation, experts=groups,
        router=router, sparsity=float((pre <= 0).mean()),
        holdout_scores=router(x_h.astype(np.float32)),
        holdout_norms=np.linalg.norm(parts, axis=2).T.astype(np.float64),
        holdout_expert_out=parts, holdout_dense=dense.astype(np.float32),
        activation_error=(dense - parts.sum(0) - bias).astype(np.float32) if relufied else None,
    )


# ---------------------------------------------------------------- choosing where MoE pays


def moe_ffn_flops(width: int, hidden: int, plan: MoePlan, experts_per_token: float,
                  router_hidden: int, tokens: int) -> float:
    """FLOPs of one MoE FFN: the router plus the chosen experts' share of the dense FFN."""
    router = 2 * tokens * (hidden * router_hidden + router_hidden * plan.experts)
    return router + 2 * tokens * hidden * width * 2 * experts_per_token / plan.experts


def choose_moe_plans(
    spec: ModelSpec,
    fitted: Mapping[int, FittedLayer],
    *,
    target_flops: float,
    batch: int = 1,
    seq_len: int = 128,
    candidates: Sequence[MoePlan] | None = None,
    max_error: float = 0.35,
    router_hidden: int = ROUTER_HIDDEN,
) -> tuple[dict[int, MoePlan], dict[int, LayerQuality]]:
    """Picks per-layer MoE settings that remove the most FFN FLOPs per unit of error.

    Greedy: start dense; repeatedly take the (layer, candidate) move with the best
    FLOPs saved per added held-out reconstruction error, skipping any candidate over
    `max_error`, until the model's FLOPs at `batch` x `seq_len` fall to `target_flops`
    times the dense model's (`--target-flops R`; 0 takes every move that stays under
    `max_error`). Layers where every candidate is too lossy (typically GELU layers with
    dense activations) stay dense.

    Returns:
        (layer -> MoePlan for the layers turned into MoE, layer -> its held-out quality).

    Raises:
        ValueError: `target_flops` is not a ratio in [0, 1].
    """
    from planer.compiler.spec import model_flops

    if not 0.0 <= target_flops <= 1.0:
        raise ValueError(f"target_flops is a ratio of the dense FLOPs in [0, 1], "
                         f"not {target_flops}")
    tokens = batch * seq_len
    current = float(model_flops(spec, batch=batch, seq_len=seq_len))
    budget = target_flops * current
    options: dict[int, list[tuple[float, float, MoePlan, LayerQuality]]] = {}
    for layer in spec.layers:
        fit = fitted.get(layer.index)
        if fit is None:
            continue
        e = fit.experts.shape[0]
        plans = candidates or [MoePlan(e, top_k=k) for k in range(1, e)]
        dense = 2 * tokens * spec.hidden * layer.ffn.width * 2
        for plan in plans:
            q = fit.quality(plan)
            saved = dense - moe_ffn_flops(layer.ffn.width, spec.hidden, plan,
                                          q.experts_per_token, router_hidden, tokens)
            if saved > 0 and q.reconstruction_error <= max_error:
                options.setdefault(layer.index, []).append(
                    (saved, q.reconstruction_error, plan, q))
    chosen: dict[int, tuple[float, float, MoePlan, LayerQuality]] = {}
    while current > budget:
        best, best_rate = None, -math.inf
        for index, opts in options.items():
            have_saved, have_err = chosen[index][:2] if index in chosen else (0.0, 0.0)
            for opt in opts:
                gain = opt[0] - have_saved
                if gain <= 0:
                    continue
                rate = gain / max(opt[1] - have_err, 1e-6)
                if rate > best_rate:
                    best, best_rate = (index, opt), rate
        if best is None:
            break
        index, opt = best
        current -= opt[0] - (chosen[index][0] if index in chosen else 0.0)
        chosen[index] = opt
    return ({i: o[2] for i, o in chosen.items()}, {i: o[3] for i, o in chosen.items()})
