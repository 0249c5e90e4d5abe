"""Measures what dynamic INT8 costs in quality, per layer and block, on captured activations.

    calibration sequences ─ ORT (float model, one pass) ─▶ per layer, whole [B, S, ·] tensors:
        attention: Q/K/V inputs, Softmax logits, context, residual
        FFN:       W1 input, activation (W2 input), residual
    ─ numpy: quantize one block as passes.quantize's dynamic mode does ─▶ Δ block output
    ─ cost = E‖Δ block output‖² / E‖residual‖²   (one block at a time, real tokens only)

ORT's dynamic scheme is replayed: weights int8, symmetric, one scale per tensor
(scale = max|W| / 127); activations uint8, asymmetric, one scale and zero point per
tensor computed at run time over the whole input (DynamicQuantizeLinear), here over
each group of `batch` sequences, the deployment batch. MatMulInteger's products are
exact, so a quantized projection is dequantized x times dequantized W (float32 here;
energies summed in float64).

The attention error goes through the block as it runs: Q' and K' move the logits by
scale·(Q'K'ᵀ − QKᵀ) on top of the captured Softmax input (mask included), the new
probabilities mix V', and the context's change feeds the quantized O projection. The
FFN's W1 error goes through the activation (GELU, tanh-GELU, ReLU or SiLU by the
finder's name; a secant slope otherwise) into the quantized W2. The normaliser is the
energy of the residual stream the block adds to, as for passes.prune_fit.importance,
so a block's INT8 cost and a head's or channel's removal cost are on one scale.

Measured on the unpruned block: a pruned block's INT8 error is taken as the same
(the search adds the two costs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir
from scipy.special import erf

from planer.compiler.capture import ActivationReader
from planer.compiler.errors import UnsupportedModelError
from planer.compiler.gated_ffn import gated_ffn_problem
from planer.compiler.spec import AttentionSpec, FfnSpec, Linear, ModelSpec
from planer.cost_model.latency import LatencyModel
from planer.cost_model.profile_int8 import int8_kind
from planer.passes.prune_fit import residual_of

Feed = dict[str, np.ndarray]
INT8_MODE = "dynamic"  # the mode the search offers (static needs calibrated ranges per plan)


@dataclasses.dataclass(frozen=True)
class Int8Costs:
    """Per-layer quality cost of quantizing each block alone (relative to residual energy)."""

    attn: tuple[float, ...]
    ffn: tuple[float, ...]

    def of(self, layer: int, blocks: Sequence[str]) -> float:
        """Sums the costs of quantizing `blocks` ("attn", "ffn") of one layer."""
        return sum(getattr(self, kind)[layer] for kind in blocks)


def measure_int8_costs(
    model: ir.Model, spec: ModelSpec, batches: Sequence[Feed], *, batch: int = 1,
    max_sequences: int = 8,
) -> Int8Costs:
    """Measures every layer's attention and FFN INT8 cost on up to `max_sequences` sequences.

    Args:
        model: the source model (not changed).
        spec: its blocks.
        batches: calibration feeds (token ids and mask, [B, S]).
        batch: the deployment batch: activation ranges are taken over this many sequences.
        max_sequences: how many calibration sequences to replay.
    """
    gated = gated_ffn_problem(spec, "INT8's cost model")
    if gated is not None:
        raise UnsupportedModelError(f"{gated}.")
    names = Int8Capture(spec)
    reader = ActivationReader(model, names.values)
    totals = np.zeros((len(spec.layers), 2, 2))  # layer, block, (Δ energy, residual energy)
    for feed in take_sequences(batches, max_sequences):
        out = reader.run(feed)
        mask = np.asarray(feed.get("attention_mask", np.ones(_batch_shape(feed))))
        real = mask.reshape(-1) != 0
        for i, layer in enumerate(spec.layers):
            arrays = {key: out[name] for key, name in names.of_layer(i).items()}
            totals[i, 0] += _attention_error(layer.attention, arrays, batch, real)
            totals[i, 1] += _ffn_error(layer.ffn, arrays, batch, real)
    costs = totals[..., 0] / np.maximum(totals[..., 1], 1e-30)
    return Int8Costs(attn=tuple(float(c) for c in costs[:, 0]),
                     ffn=tuple(float(c) for c in costs[:, 1]))


def int8_pays(model: LatencyModel, spec: ModelSpec) -> bool:
    """Whether a dynamic INT8 curve beats its float twin at the model's full block size."""
    full = {"attn": spec.layers[0].attention.heads, "ffn": spec.layers[0].ffn.width}
    for kind, float_curve in (("attn", model.attn), ("ffn", model.ffn)):
        curve = model.int8.get(int8_kind(kind, INT8_MODE))
        if curve is not None and curve(full[kind]) < float_curve(full[kind]):
            return True
    return False


def costs_if_int8_pays(
    latency: LatencyModel, model: ir.Model, spec: ModelSpec, batches: Sequence[Feed], *,
    batch: int, progress: Callable[[str], None] | None = None,
) -> Int8Costs | None:
    """Measures INT8 costs when the latency model says INT8 can save time here, else None."""
    if not int8_pays(latency, spec):
        return None
    if progress is not None:
        progress("measuring what INT8 costs per block")
    return measure_int8_costs(model, spec, batches, batch=batch)


class Int8Capture:
    """The values to read per layer, deduplicated across roles (Q, K and V share an input)."""

    def __init__(self, spec: ModelSpec):
        self.values: list[ir.Value] = []
        self.layers: list[dict[str, str]] = []
        for layer in spec.layers:
            a, f = layer.attention, layer.ffn
            roles = {"q": a.q.input, "k": a.k.input, "v": a.v.input, "logits": _logits(a),
                     "ctx": a.o.input, "attn_res": residual_of(a.out, a.x),
                     "x1": f.w1.input, "act": f.w2.input, "ffn_res": residual_of(f.out, f.x)}
            for value in roles.values():
                if value not in self.values:
                    self.values.append(value)
                if not value.name:  # the reader reads values by name
                    value.name = f"planer/int8_cost_{len(self.values)}"
            self.layers.append({role: str(v.name) for role, v in roles.items()})

    def of_layer(self, i: int) -> dict[str, str]:
        return self.layers[i]


def _logits(a: AttentionSpec) -> ir.Value:
    """The Softmax input: Q·Kᵀ after the scale and every score op (the mask)."""
    softmax = next(n for n in a.nodes if n.op_type == "Softmax")
    value = softmax.inputs[0]
    assert value is not None
    return value


def take_sequences(batches: Sequence[Feed], limit: int) -> list[Feed]:
    """Cuts the feeds to at most `limit` sequences in all."""
    feeds, left = [], limit
    for feed in batches:
        if left <= 0:
            break
        rows = _batch_shape(feed)[0]
        take = min(rows, left)
        feeds.append({k: np.asarray(v)[:take] if np.ndim(v) >= 1 and np.shape(v)[0] == rows
                      else v for k, v in feed.items()})
        left -= take
    if not feeds:
        raise ValueError("no calibration batches to measure int8 costs on")
    return feeds


def _batch_shape(feed: Feed) -> tuple[int, ...]:
    first = next(v for v in feed.values() if np.ndim(v) == 2)
    return tuple(np.shape(first))


def _attention_error(a: AttentionSpec, x: dict[str, np.ndarray], batch: int,
                     real: np.ndarray) -> np.ndarray:
    """Returns (Σ‖Δ out‖², Σ‖residual‖²) over real tokens with the block quantized alone."""
    return _energies(attention_delta(a, x, batch), x["attn_res"], real)


def attention_delta(a: AttentionSpec, x: dict[str, np.ndarray], batch: int) -> np.ndarray:
    """Returns the attention output's change [B, S, D] when the block runs in dynamic INT8.

    `x` holds the block's captured tensors by role (`q`, `k`, `v`, `logits`, `ctx`).
    """
    heads, d = a.heads, a.head_size
    q, k, v = (_project(x[r], lin) for r, lin in (("q", a.q), ("k", a.k), ("v", a.v)))
    qq, kq, vq = (_project(_dq(x[r], batch), lin, quantized=True)
                  for r, lin in (("q", a.q), ("k", a.k), ("v", a.v)))
    split = _heads(heads, d)
    logits = x["logits"].astype(np.float32)
    moved = logits + a.scale * (split(qq) @ split(kq).swapaxes(-1, -2)
                                - split(q) @ split(k).swapaxes(-1, -2))
    ctx_shift = _merge(_softmax(moved) @ split(vq) - _softmax(logits) @ split(v))
    ctx = x["ctx"].astype(np.float32)
    out = ctx @ a.o.w().astype(np.float32)
    out_q = _dq(ctx + ctx_shift, batch) @ _wq(a.o.w())
    return out_q - out


def _ffn_error(f: FfnSpec, x: dict[str, np.ndarray], batch: int,
               real: np.ndarray) -> np.ndarray:
    """Returns (Σ‖Δ out‖², Σ‖residual‖²) over real tokens with the FFN quantized alone."""
    return _energies(ffn_delta(f, x, batch), x["ffn_res"], real)


def ffn_delta(f: FfnSpec, x: dict[str, np.ndarray], batch: int) -> np.ndarray:
    """Returns the FFN output's change [B, S, D] when the block runs in dynamic INT8.

    `x` holds the block's captured tensors by role (`x1`, the W1 input; `act`).
    """
    pre = _project(x["x1"], f.w1)
    pre_q = _project(_dq(x["x1"], batch), f.w1, quantized=True)
    act = x["act"].astype(np.float32)
    act_q = act + _activation_change(f.activation, pre, pre_q, act)
    w2 = f.w2.w().astype(np.float32)
    return _dq(act_q, batch) @ _wq(f.w2.w()) - act @ w2


ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "gelu": lambda z: 0.5 * z * (1.0 + erf(z / np.sqrt(2.0))),
    "gelu_tanh": lambda z: 0.5 * z * (1.0 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3))),
    "relu": lambda z: np.maximum(z, 0.0),
    "silu": lambda z: z / (1.0 + np.exp(-z)),
}


def _activation_change(name: str, pre: np.ndarray, pre_q: np.ndarray,
                       act: np.ndarray) -> np.ndarray:
    fn = ACTIVATIONS.get(name)
    if fn is not None:
        return fn(pre_q) - fn(pre)
    # An activation the finder does not name: the secant slope act / pre through 0.
    slope = np.divide(act, pre, out=np.full_like(act, 0.5), where=np.abs(pre) > 1e-6)
    return slope * (pre_q - pre)


def _project(x: np.ndarray, linear: Linear, *, quantized: bool = False) -> np.ndarray:
    w = _wq(linear.w()) if quantized else linear.w().astype(np.float32)
    y = x.astype(np.float32) @ w
    b = linear.b()
    return y + b.astype(np.float32) if b is not None else y


def _wq(w: np.ndarray) -> np.ndarray:
    """Weights as ORT dynamic mode stores them: int8, symmetric, one scale per tensor."""
    w = w.astype(np.float32)
    scale = float(np.max(np.abs(w))) / 127 or 1.0
    return np.clip(np.round(w / scale), -127, 127) * scale


def _dq(x: np.ndarray, batch: int) -> np.ndarray:
    """Activations as DynamicQuantizeLinear sees them, one range per `batch` sequences."""
    x = x.astype(np.float32)
    out = np.empty_like(x)
    for start in range(0, x.shape[0], max(batch, 1)):
        part = x[start:start + batch]
        lo, hi = min(0.0, float(part.min())), max(0.0, float(part.max()))
        scale = (hi - lo) / 255 or 1.0
        zero = np.clip(np.round(-lo / scale), 0, 255)
        out[start:start + batch] = (np.clip(np.round(part / scale) + zero, 0, 255) - zero) * scale
    return out


def _heads(heads: int, d: int) -> Callable[[np.ndarray], np.ndarray]:
    def split(y: np.ndarray) -> np.ndarray:
        b, s, _ = y.shape
        return y.reshape(b, s, heads, d).transpose(0, 2, 1, 3)

    return split


def _merge(y: np.ndarray) -> np.ndarray:
    b, h, s, d = y.shape
    return y.transpose(0, 2, 1, 3).reshape(b, s, h * d)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=-1, keepdims=True)


def _energies(delta: np.ndarray, residual: np.ndarray, real: np.ndarray) -> np.ndarray:
    rows = delta.astype(np.float64).reshape(-1, delta.shape[-1])[real]
    res = residual.astype(np.float64).reshape(-1, residual.shape[-1])[real]
    return np.array([np.sum(rows**2), np.sum(res**2)])
