"""The torch mirror of an FFN that planer rewrote as a mixture of experts.

Dimensions: T = B·S tokens, D model width, E experts, G neurons per expert, h router width.

    x_TD ─ router: Abs(Relu(x·r1 + b1)·r2 + b2) ─ r_TE ─ hard selection, as the graph:
             top-k (TopK ids) | dynamic-k r ≥ (1 − τ)·max r | + capacity C per expert
             (tensorrt) ─ and real tokens only ─ sel_TE
    x_TD ─ act(x·[w1_0 … w1_E] + b1) ─ × sel repeated per expert's G neurons
         ─ ·[w2_0; …; w2_E] + b2 ─ y_BSD            (= Σ over chosen experts of expert_e(x))

The weights are the block's own initializers, read by the names the FFN→MoE pass gave
them (`layer3/ffn/expert2/w1`, `layer3/ffn/router/w2`, `layer3/ffn/kernel/fc1` for the
com.microsoft.MoE lowering, whose fc2 carries a factor k); the mirror computes every
expert densely and masks the unchosen ones, which gives the same values as the graph's
gathers and the same gradients (an unchosen expert gets none from that token).

The selection is not differentiable, so the routers train on their own objective, the
one they were fitted with: regress each expert's output norm on the current experts
(`aux_loss`, weighted by `RecoveryConfig.router_weight`).

ReLU-fied experts (DSTI, `--moe-activation relu`: the pass marks their nodes `RELUFIED`)
also record Σ over real tokens of mean |h| while training (`l1_sum`), which `activation_l1`
turns into DSTI's L1 activation penalty (weighted by `RecoveryConfig.activation_l1`):
sparser activations concentrate each token's output in fewer experts, which is what
top-k routing keeps.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import onnx_ir as ir
import torch
from torch import nn

from planer.compiler.errors import UnsupportedModelError
from planer.compiler.irutil import const_array
from planer.passes.ffn_to_moe import RELUFIED
from planer.recovery.mirror import WeightStore, activation_fn
from planer.recovery.structure import MoeBlock

_EXPERT = re.compile(r"/expert(\d+)/(w1|b1|w2)\Z")


class MoeMirror(nn.Module):
    """One MoE block: router, hard selection and experts, weights by initializer name."""

    def __init__(self, store: WeightStore, block: MoeBlock, trainable: set[str]):
        super().__init__()
        self.store = [store]
        self.block = block.block
        inits = {str(v.name): v for n in block.nodes for v in n.inputs
                 if v is not None and v.const_value is not None}
        prefix = f"{block.block}/"

        def add(suffix: str, *, required: bool = True) -> str | None:
            value = inits.get(prefix + suffix)
            if value is None:
                if required:
                    raise UnsupportedModelError(f"{block.block}: the MoE block has no "
                                                f"{suffix} to mirror.")
                return None
            return store.add(value, trainable=str(value.name) in trainable)

        self.router = [add(f"router/{p}") for p in ("w1", "b1", "w2", "b2")]
        self.b2 = add("b2", required=False)
        self.top_k, self.tau, self.capacity = _selection(inits, prefix)
        kernel = next((n for n in block.nodes if n.op_type == "MoE"), None)
        if kernel is not None:
            self.lowering = "kernel"
            self.fc1, self.fc2 = add("kernel/fc1"), add("kernel/fc2")
            self.fc1_bias = add("kernel/fc1_bias", required=False)
            kind = kernel.attributes.get("activation_type")
            self.activation = {"relu": "relu", "gelu": "gelu_tanh"}[
                kind.value if kind is not None else "relu"]
        else:
            self.lowering = "tensorrt" if self.capacity is not None else "gather"
            self.experts = _experts(inits, prefix, add)
            self.activation = _activation(block, self.experts)
        self.act = activation_fn(self.activation)
        self.relufied = any(n.metadata_props.get(RELUFIED) for n in block.nodes)
        self.l1_sum: torch.Tensor | None = None  # the last training forward's, ReLU-fied only

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (y [B, S, D], the router regression loss or None)."""
        store = self.store[0]
        shape = x.shape
        x_td = x.reshape(-1, shape[-1])
        real = mask.reshape(-1, 1).bool() if mask is not None else torch.ones_like(
            x_td[:, :1], dtype=torch.bool)
        r1, b1, r2, b2 = (store.get(n) for n in self.router)  # type: ignore[arg-type]
        scores = torch.abs(torch.relu(x_td @ r1 + b1) @ r2 + b2)
        sel = self._select(scores.detach(), real)
        w1, bias1, w2s = self._weights()
        h = self.act(x_td @ w1 + bias1 if bias1 is not None else x_td @ w1)
        group = h.shape[1] // sel.shape[1]
        y = (h * sel.repeat_interleave(group, dim=1).to(h.dtype)) @ torch.cat(w2s, dim=0)
        if self.b2 is not None:
            y = y + store.get(self.b2)
        loss = _router_loss(scores, h.detach(), w2s, group, real) if self.training else None
        self.l1_sum = h[real.reshape(-1)].abs().mean(dim=1).sum() \
            if self.training and self.relufied else None
        return y.reshape(shape), loss

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        """Returns (w1 [D, E·G], b1 [E·G] or None, per-expert w2 [G, D] list)."""
        store = self.store[0]
        if self.lowering == "kernel":
            fc1, fc2 = store.get(self.fc1), store.get(self.fc2)  # type: ignore[arg-type]
            count, group, width = fc1.shape
            w1 = fc1.reshape(count * group, width).T
            bias = store.get(self.fc1_bias).reshape(-1) if self.fc1_bias else None
            return w1, bias, [fc2[e].T / float(self.top_k or 1) for e in range(count)]
        w1 = torch.cat([store.get(e[0]) for e in self.experts], dim=1)
        biases = [store.get(e[1]) if e[1] else None for e in self.experts]
        bias = torch.cat(biases) if all(b is not None for b in biases) else None  # type: ignore
        return w1, bias, [store.get(e[2]) for e in self.experts]

    def _select(self, scores: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Returns bool sel [T, E] as the graph chooses (padding chooses nothing)."""
        if self.top_k is not None:
            chosen = torch.topk(scores, self.top_k, dim=1).indices
            sel = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, chosen, True)
            if self.lowering == "tensorrt":  # the graph's rule there is r >= k-th best
                kth = torch.topk(scores, self.top_k, dim=1).values[:, -1:]
                sel = scores >= kth
        else:
            sel = scores >= scores.max(dim=1, keepdim=True).values * (1.0 - float(self.tau or 0))
        sel = sel & real
        if self.capacity is not None:
            sel = sel & _within_capacity(torch.where(sel, scores, -1.0), self.capacity)
        return sel


def activation_l1(mirror: nn.Module, tokens: float) -> torch.Tensor | None:
    """Returns mean |h| per real token over the ReLU-fied MoE blocks of the last training forward.

    `tokens` is the global batch's real-token count, so the shards' terms add up to the
    whole batch's under DDP. None when no block has ReLU-fied experts.
    """
    sums = [m.l1_sum for m in mirror.modules() if isinstance(m, MoeMirror) and m.l1_sum is not None]
    if not sums:
        return None
    return torch.stack(sums).sum() / (max(tokens, 1.0) * len(sums))


def _within_capacity(score: torch.Tensor, capacity: int) -> torch.Tensor:
    """Marks, per expert, the `capacity` best-scoring chosen tokens (the tensorrt rule)."""
    padded = torch.cat([score, torch.full((capacity, score.shape[1]), -1.0)], dim=0)
    best = torch.topk(padded, capacity, dim=0).indices  # [C, E]
    keep = torch.zeros_like(padded, dtype=torch.bool).scatter_(0, best, True)
    return keep[: score.shape[0]]


def _router_loss(scores: torch.Tensor, h: torch.Tensor, w2s: list[torch.Tensor], group: int,
                 real: torch.Tensor) -> torch.Tensor:
    """Relative squared error of the router's scores against each expert's output norm."""
    rows = real.reshape(-1)
    norms = torch.stack([(h[rows, e * group:(e + 1) * group] @ w2.detach()).norm(dim=1)
                         for e, w2 in enumerate(w2s)], dim=1)
    return ((scores[rows] - norms) ** 2).sum() / (norms ** 2).sum().clamp_min(1e-12)


def _selection(inits: dict[str, ir.Value], prefix: str
               ) -> tuple[int | None, float | None, int | None]:
    """Reads top-k, tau and the tensorrt capacity from the block's constants."""
    k = const_array(inits.get(prefix + "select/k"))
    keep = const_array(inits.get(prefix + "select/one_minus_tau"))
    pad = inits.get(prefix + "capacity/pad_rows_CE")
    capacity = int(pad.const_value.shape[0]) if pad is not None else None  # type: ignore
    if k is not None:
        return int(k.reshape(-1)[0]), None, capacity
    if keep is not None:
        return None, 1.0 - float(keep.reshape(-1)[0]), capacity
    raise UnsupportedModelError(f"{prefix}: the MoE block's selection (top-k or tau) "
                                "cannot be read.")


def _experts(inits: dict[str, ir.Value], prefix: str, add: Callable[..., str | None]
             ) -> list[tuple[str, str | None, str]]:
    """Returns each expert's (w1, b1 or None, w2) initializer names, in expert order."""
    ids = [int(m.group(1)) for name in inits
           if name.startswith(prefix) and (m := _EXPERT.search(name)) is not None]
    if not ids:
        raise UnsupportedModelError(f"{prefix}: the MoE block's experts cannot be read.")
    result = []
    for e in range(max(ids) + 1):
        w1, w2 = add(f"expert{e}/w1"), add(f"expert{e}/w2")
        assert w1 is not None and w2 is not None  # required: add raised otherwise
        result.append((w1, add(f"expert{e}/b1", required=False), w2))
    return result


def _activation(block: MoeBlock, experts: list[tuple[str, str | None, str]]) -> str:
    """Classifies expert 0's activation from the nodes the pass emitted for it."""
    prefix = f"{block.block}/expert0/"
    ops = {n.op_type for n in block.nodes if (n.name or "").startswith(prefix)}
    if ops & {"BiasGelu", "Gelu", "Erf"}:
        return "gelu"
    if ops & {"Tanh", "FastGelu"}:
        return "gelu_tanh"
    if "Relu" in ops:
        return "relu"
    if "Sigmoid" in ops:
        return "silu"
    raise UnsupportedModelError(f"{block.block}: the experts' activation "
                                f"({', '.join(sorted(ops))}) is not mirrored.")
