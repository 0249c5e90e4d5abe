"""The torch mirror of a token-skim point, trained end to end as Transkimmer trains it.

Dimensions: B batch, S sequence (always the full length: the mirror never gathers),
D model width, Hp predictor width.

    x_BSD ─ LayerNorm ─ Linear(D, Hp) ─ GELU ─ Linear(Hp, 1) ─ s_BS    weights by name:
            layer2/skim/predictor/{gamma, beta, w1, b1, w2}, layer2/skim/const/predictor/b2
    hard_BS: the graph's rule. Among live tokens (real, kept by earlier points) the
             always-kept positions ([CLS]) first, then the top k_b = max(1, ceil(r·n_b − slack))
             by score; r and slack are the graph's own float32 constants
    m_BS  = hard + p − stop_gradient(p),  p = σ(s)      straight-through: the value is the
            hard 0/1 decision, the gradient is p's ("gumbel": s + logistic noise in training,
            for the decision and p alike, i.e. a hard Gumbel-sigmoid)
    c_j   = c_{j−1}·m_j  (c_0 = 1): whether a token still runs after point j
    later layers run on all S rows with the skimmed keys masked (additive float32 min on
    [B, 1, 1, S]), so a kept row gets exactly the graph's value and a skimmed row the
    state it would have had as a query (what the gradient through m compares)
    out   = c_J·y + Σ_j (c_{j−1} − c_j)·A_j(x_j)   skimmed rows hold their state where
            they left, through the point's forwarding map A_j(x) = x·W_j + b_j where the
            graph has one (layer2/skim/forward/{w, b}; else A_j(x) = x), + k·V_j where the
            map has a context term (layer2/skim/forward/v; k [B, D] the mean of y over the
            tokens kept to the end), as the graph's write-back does; the layer outputs the
            loss reads likewise
    skim loss (Transkimmer): mean over points of (mean over live tokens of p, forced
            ones counting 1, − r)²: keeps σ(s) calibrated to the planned keep ratio, so the
            straight-through gradient acts near the decision boundary

With the hard decision in the forward pass the mirror equals the emitted graph (the check
holds it to 1e-4 before training); the predictor's trained weights are written back under
the same names (`mirror.write_back`), so the graph's structure never changes. A forwarding
map trains with the predictor (its weights are read only by the write-back, which the
mirror replaces) and is written back by name the same way.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from planer.compiler.errors import UnsupportedModelError
from planer.compiler.irutil import const_array
from planer.compiler.names import PROVENANCE_PASS, PassName
from planer.passes.skim_forward import BIAS, CONTEXT, WEIGHT
from planer.recovery.mirror import Mirror, WeightStore
from planer.recovery.structure import SkimBlock

ESTIMATORS = ("straight_through", "gumbel")
_PREDICTOR = ("gamma", "beta", "w1", "b1", "w2")
_ALWAYS = re.compile(r"/const/always_keep_(\d+)\Z")
_F32_MIN = float(np.finfo(np.float32).min)


@dataclasses.dataclass
class SkimState:
    """The tokens still running, carried through one forward pass from the first point on.

    Attributes:
        present: c_j [B, S] (0/1 in value, straight-through gradient to the predictors).
        active: the hard decision [B, S] bool (the keys later layers may attend to).
        stages: per point (its forwarded rows A(x) [B, S, D], c before, c after, the
            context weight V [D, D] or None).
        losses: per point, the skim loss.
        keep: per point, the soft keep ratio (mean p over live tokens; forced count 1).
    """

    present: torch.Tensor
    active: torch.Tensor
    stages: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]
    losses: list[torch.Tensor]
    keep: list[torch.Tensor]

    @staticmethod
    def start(x: torch.Tensor, mask: torch.Tensor | None) -> SkimState:
        """Returns the state entering the first point: every real token runs."""
        b, s = x.shape[:2]
        real = mask.bool() if mask is not None else torch.ones(b, s, dtype=torch.bool)
        return SkimState(torch.ones(b, s, dtype=x.dtype), real, [], [], [])

    def key_mask(self) -> torch.Tensor:
        """Returns the additive [B, 1, 1, S] mask hiding the tokens no longer running."""
        return ((~self.active).to(torch.float32) * _F32_MIN)[:, None, None, :]

    def mix(self, y: torch.Tensor) -> torch.Tensor:
        """Returns y [B, S, D] with each skimmed row replaced by its state where it left.

        The forwarded state keeps its gradient, as in Transkimmer: detaching it (a skimmed
        row's loss training only the keep decision) measured worse on MiniLM (README).
        """
        out = self.present[..., None] * y
        context = None
        for x, before, after, v in self.stages:
            if v is not None:
                if context is None:  # the kept rows' mean, as the write-back computes it
                    kept = self.active.to(y.dtype)[..., None]
                    context = (kept * y).sum(1) / kept.sum(1).clamp_min(1.0)
                x = x + (context @ v)[:, None, :]
            out = out + (before - after)[..., None] * x
        return out

    def loss(self) -> torch.Tensor:
        return torch.stack(self.losses).mean()

    def keep_ratios(self) -> list[float]:
        return [float(k) for k in self.keep]


class SkimMirror(nn.Module):
    """One skim point: its fitted predictor and the graph's keep rule.

    Raises:
        UnsupportedModelError: the point has no fitted predictor (a training-free
            attention score), or its constants cannot be read.
    """

    def __init__(self, store: WeightStore, block: SkimBlock, trainable: set[str]):
        super().__init__()
        self.store = [store]
        self.block = block.block
        self.mask_names = [str(m.name) for m in block.masks]
        consts, prefix = block.constants, f"{block.block}/"
        if prefix + "predictor/w1" not in consts:
            raise UnsupportedModelError(
                f"{block.block}: recovery mirrors skim points with a fitted predictor only; "
                "this one scores tokens by attention (compile with --calibration).")

        def add(name: str, *, scalar: bool = False) -> str:
            value = consts.get(prefix + name)
            if value is None:
                raise UnsupportedModelError(f"{block.block}: the skim point has no {name}.")
            return store.add(value, trainable=str(value.name) in trainable, scalar=scalar)

        self.gamma, self.beta, self.w1, self.b1, self.w2 = (add(f"predictor/{n}")
                                                            for n in _PREDICTOR)
        self.b2 = add("const/predictor/b2", scalar=True)
        self.ratio = _scalar(consts, prefix + "const/ratio")
        self.slack = _scalar(consts, prefix + "const/slack")
        self.eps = _epsilon(block, consts, prefix)
        self.always_keep = sorted(int(m.group(1)) for name in consts
                                  if (m := _ALWAYS.search(name)) is not None)
        self.estimator = "straight_through"
        self.forward_map: tuple[str, str] | None = None
        self.context_map: str | None = None
        w, b = consts.get(prefix + WEIGHT), consts.get(prefix + BIAS)
        if w is not None and b is not None:
            # Read by the write-back alone (the mirror replaces it): trained unless shared.
            train = all(u.metadata_props.get(PROVENANCE_PASS) == PassName.TOKEN_SKIM
                        for v in (w, b) for u in v.consumers())
            self.forward_map = (store.add(w, trainable=train), store.add(b, trainable=train))
            v = consts.get(prefix + CONTEXT)
            if v is not None:
                self.context_map = store.add(v, trainable=train)

    def forwarded(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the rows a skimmed token carries to the output: A(x), or x itself."""
        if self.forward_map is None:
            return x
        store = self.store[0]
        return x @ store.get(self.forward_map[0]) + store.get(self.forward_map[1])

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the predictor's keep scores s [B, S] (higher = keep)."""
        store = self.store[0]
        z = F.layer_norm(x, (x.shape[-1],), store.get(self.gamma), store.get(self.beta),
                         self.eps)
        h = F.gelu(z @ store.get(self.w1) + store.get(self.b1))
        return (h @ store.get(self.w2)).squeeze(-1) + store.get(self.b2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                state: SkimState | None) -> tuple[torch.Tensor, SkimState]:
        """Decides which tokens keep running; returns (x unchanged, the updated state)."""
        state = state or SkimState.start(x, mask)
        s = self.score(x)
        if self.training and self.estimator == "gumbel":
            u = torch.rand_like(s).clamp(1e-6, 1 - 1e-6)
            s = s + torch.log(u) - torch.log1p(-u)  # logistic = difference of two Gumbels
        live = state.active
        pos = torch.arange(x.shape[1])[None, :]
        forced = torch.zeros_like(live)
        for position in self.always_keep:
            forced = forced | (pos == position)
        hard = self._decide(s.detach(), live, forced)
        p = torch.sigmoid(s)
        free = (live & ~forced).to(p.dtype)
        m = hard.to(p.dtype) + (p - p.detach()) * free
        present = state.present * m
        v = None if self.context_map is None else self.store[0].get(self.context_map)
        state.stages.append((self.forwarded(x), state.present, present, v))
        state.present, state.active = present, hard
        live_f = live.to(p.dtype)
        soft = torch.where(forced, torch.ones_like(p), p)
        ratio = (soft * live_f).sum() / live_f.sum().clamp_min(1.0)
        state.losses.append((ratio - self.ratio) ** 2)
        state.keep.append(ratio.detach())
        return x, state

    def _decide(self, s: torch.Tensor, live: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
        """Returns the graph's kept [B, S]: forced, then the best k_b live tokens by score."""
        low = torch.full_like(s, _F32_MIN)
        z = torch.where(forced, torch.full_like(s, -_F32_MIN), torch.where(live, s, low))
        n = live.to(torch.float32).sum(1, keepdim=True)
        ratio = torch.tensor(self.ratio, dtype=torch.float32)
        slack = torch.tensor(self.slack, dtype=torch.float32)
        k = torch.clamp(torch.ceil(n * ratio - slack), min=1.0)
        order = torch.argsort(z, dim=1, descending=True, stable=True)
        rank = torch.argsort(order, dim=1)
        return rank.to(torch.float32) < k


def _scalar(consts: dict, name: str) -> float:
    array = const_array(consts.get(name))
    if array is None:
        raise UnsupportedModelError(f"{name.rsplit('/const/', 1)[0]}: the skim point's "
                                    f"{name.rsplit('/', 1)[-1]} cannot be read.")
    return float(np.asarray(array, dtype=np.float32).reshape(-1)[0])


def _epsilon(block: SkimBlock, consts: dict, prefix: str) -> float:
    """Reads the predictor LayerNorm's epsilon (the op's attribute, or the decomposed form's)."""
    for node in block.nodes:
        if node.name == f"{prefix}predictor/LayerNorm":
            eps = node.attributes.get("epsilon")
            return float(eps.value) if eps is not None else 1e-5
    return _scalar(consts, prefix + "const/predictor/ln/eps")


def set_estimator(mirror: Mirror, estimator: str) -> None:
    """Chooses how every skim point's keep decision is trained (`ESTIMATORS`).

    Raises:
        ValueError: an unknown estimator.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"the skim estimator must be one of {ESTIMATORS}, not {estimator!r}")
    for module in mirror.modules():
        if isinstance(module, SkimMirror):
            module.estimator = estimator


def keep_summary(mirror: Mirror, batches: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor],
                                                         torch.Tensor]]) -> dict[str, Any]:
    """Returns per skim point its planned keep ratio and the mean soft one σ(s) on `batches`.

    The hard ratio is the plan's by construction (ceil(r·n) per sequence); the soft one
    says how well the predictor's probabilities match it (what the skim loss trains).
    """
    points = [m for m in mirror.modules() if isinstance(m, SkimMirror)]
    if not points:
        return {}
    sums = np.zeros(len(points))
    training = mirror.training
    mirror.eval()
    with torch.no_grad():
        for entry, aux, mask in batches:
            sums += np.asarray(mirror(entry, aux, mask).skim_keep)
    mirror.train(training)
    return {p.block: {"plan": round(p.ratio, 4), "soft_keep": round(float(s) / len(batches), 4)}
            for p, s in zip(points, sums, strict=True)}
