"""Predicts a plan's measured loss from single-block changes replayed through the model.

Dimensions: B sequences, S tokens, D model width, P probe sequences.

    source ─ copy ─ x ─ block b ─ out_b ─ Add(δ_b) ─ residual ─ … ─ output_BSD
                                          δ_b: a graph input, zero = the source model
    P probe sequences (calibration holdout share) ─ run with δ = 0 ─▶ pooled outputs and
    every block's tensors
    per block b, per variant v on a grid (heads kept, FFN width, INT8, MoE):
        Δ_b(v) from the captured tensors (numpy: prune_fit's output choice for the kept
        units, int8_cost's replay of ORT's dynamic INT8, the fitted router's experts)
        loss_b(v) = 1 − mean pooled cosine( run(δ_b = Δ_b(v)), run(δ = 0) )
        (a language model's logits [B, S, V]: 1 − mean per-token cosine, logits centred)
    skim (keep r before layer l): a compiled skim-only model run on the same sequences
    plan loss = Σ_kind w_kind · Σ_layers loss_kind(the layer's variant)

Only block b changes, so its input is the source's and Δ_b is exact: the run through
the rest of the model measures what the change does to the pooled output, which a
block-level perturbation (passes.prune_fit.importance) cannot see (a later LayerNorm
can shrink or amplify it). Head and width counts between grid points are interpolated
along their summed removal costs, a monotone axis on which the measured loss is close to
linear. The interaction correction w_kind (prune, int8, moe, skim) is fitted by bounded
least squares on a few whole plans compiled and run on the same probe sequences
(relative error, pulled toward 1 where plans say little about a kind).

A language model's output is judged token by token: each real token's next-token
logits, centred over the vocabulary, against the source's, which is what perplexity
reads. Summed over the sequence the tokens' logits share a common direction, and two
tokens trading predictions leave the sum unchanged: on SmolLM2-135M's 50% FLOPs plan
(perplexity 81.5 → 355 on tuning texts) the pooled cosine is 0.89, per token 0.83.

Recovery (`--recover`) is not in the prediction: the search ranks plans by their loss
before recovery. Measuring each variant after a short recovery would cost a training
run per variant (minutes each on a small CPU) where this model costs one forward pass,
and recovery runs once, on the plan the latency rounds settle on; its measured gain
(a few tenths of STS-B points on MiniLM) is small next to the differences between the
plans the search weighs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from scipy.optimize import lsq_linear

from planer.compiler.blocks import find_blocks
from planer.compiler.capture import main_output, unflatten_tokens
from planer.compiler.plan import LayerPlan, MoePlan
from planer.compiler.spec import LayerSpec, ModelSpec
from planer.cost_model.int8_cost import Int8Capture, attention_delta, ffn_delta, take_sequences
from planer.passes.moe_fit import FittedLayer, select
from planer.passes.prune_fit import Importance, LayerActivations, choose_output, kept_units

Feed = dict[str, np.ndarray]
KINDS = ("prune", "int8", "moe", "skim")
GRID = (0.75, 0.5, 0.25, 0.0)  # fractions of the heads / width a layer keeps, measured
PRIOR = 0.3  # pull of each kind's weight toward 1, against the relative misfit


def grid(n: int) -> list[int]:
    """The unit counts measured for a block of `n` units (n itself costs nothing)."""
    return sorted({round(n * f) for f in GRID} - {n}, reverse=True)


@dataclasses.dataclass(frozen=True)
class Curve:
    """Measured loss against removal cost: `costs[k]` removed cost `loss[k]` (0 → 0)."""

    counts: tuple[int, ...]  # units kept at each measured point, the full count first
    costs: tuple[float, ...]
    loss: tuple[float, ...]

    def at(self, removal_cost: float) -> float:
        """Interpolates the loss of removing units whose summed removal cost is given."""
        return float(np.interp(removal_cost, self.costs, self.loss))


@dataclasses.dataclass(frozen=True)
class LayerLoss:
    """One layer's measured single-change losses."""

    attn: Curve
    ffn: Curve
    int8_attn: float | None = None
    int8_ffn: float | None = None
    moe: Mapping[MoePlan, float] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The measured points, for the report."""
        data: dict[str, Any] = {
            "heads": {str(c): round(float(v), 6)
                      for c, v in zip(self.attn.counts, self.attn.loss, strict=True)},
            "ffn": {str(c): round(float(v), 6)
                    for c, v in zip(self.ffn.counts, self.ffn.loss, strict=True)}}
        if self.int8_attn is not None:
            data["int8_attn"] = round(self.int8_attn, 6)
        if self.int8_ffn is not None:
            data["int8_ffn"] = round(self.int8_ffn, 6)
        if self.moe:
            data["moe"] = [{**p.to_dict(), "loss": round(v, 6)} for p, v in self.moe.items()]
        return data


def layers_to_json(layers: Sequence[LayerLoss]) -> list[dict[str, Any]]:
    """The measured losses as JSON (for the measurement cache)."""
    return [{"attn": dataclasses.asdict(la.attn), "ffn": dataclasses.asdict(la.ffn),
             "int8_attn": la.int8_attn, "int8_ffn": la.int8_ffn,
             "moe": [[dataclasses.asdict(p), v] for p, v in la.moe.items()]} for la in layers]


def layers_from_json(data: Sequence[dict[str, Any]]) -> list[LayerLoss]:
    """Reads what layers_to_json wrote."""
    def curve(c: dict[str, Any]) -> Curve:
        return Curve(tuple(c["counts"]), tuple(c["costs"]), tuple(c["loss"]))

    return [LayerLoss(curve(la["attn"]), curve(la["ffn"]), la["int8_attn"], la["int8_ffn"],
                      {MoePlan(**p): v for p, v in la["moe"]}) for la in data]


@dataclasses.dataclass(frozen=True)
class MeasuredQuality:
    """The search's quality model: measured single-change losses, weighted per kind.

    Attributes:
        importance: removal costs, the interpolation axis between measured counts.
        layers: per layer, its measured losses.
        skim: (layer, keep ratio) -> measured loss of skimming there alone.
        weights: kind -> interaction correction (1 where not fitted).
    """

    importance: Importance
    layers: tuple[LayerLoss, ...]
    skim: Mapping[tuple[int, float], float] = dataclasses.field(default_factory=dict)
    weights: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def parts(self, i: int, choice: LayerPlan) -> dict[str, float]:
        """Returns layer i's unweighted predicted loss by kind (prune, int8, moe, skim)."""
        layer, scores = self.layers[i], self.importance
        top_h, top_f = len(scores.heads[i]), len(scores.channels[i])
        prune = layer.attn.at(removed_cost(scores.heads[i], top_h - choice.heads))
        prune += layer.ffn.at(removed_cost(scores.channels[i], top_f - choice.ffn))
        out = {"prune": prune, "int8": 0.0, "moe": 0.0, "skim": 0.0}
        if choice.int8 is not None:
            for kind, n, cost in (("attn", choice.heads, layer.int8_attn),
                                  ("ffn", choice.ffn, layer.int8_ffn)):
                if kind in choice.int8.kinds() and n > 0:
                    if cost is None:
                        raise ValueError(f"layer {i}: INT8 {kind} cost was not measured")
                    out["int8"] += cost
        if choice.moe is not None:
            if choice.moe not in layer.moe:
                raise ValueError(f"layer {i}: MoE {choice.moe.to_dict()} was not measured")
            out["moe"] = layer.moe[choice.moe]
        if choice.skim_keep is not None and choice.skim_keep < 1:
            out["skim"] = self.skim[(i, choice.skim_keep)]
        return out

    def layer_loss(self, i: int, choice: LayerPlan) -> float:
        """Predicts the loss layer i's choice adds to a plan (corrected per kind)."""
        return sum(self.weights.get(k, 1.0) * v for k, v in self.parts(i, choice).items())

    def measures_int8(self, i: int) -> bool:
        """Whether layer i's INT8 costs were measured (both blocks)."""
        return self.layers[i].int8_attn is not None and self.layers[i].int8_ffn is not None


def removed_cost(scores: np.ndarray, count: int) -> float:
    """Sums the removal costs of the `count` least important units."""
    return float(np.sort(np.asarray(scores, float))[:max(count, 0)].sum())


class Probe:
    """The source model with a zero-default perturbation input after every block.

    Args:
        model: the source model (its external data is loaded; the graph is not changed).
        spec: its blocks.
        feeds: the probe sequences (batches of token ids and masks).
        threads: ORT intra-op threads.
    """

    def __init__(self, model: ir.Model, spec: ModelSpec, feeds: Sequence[Feed], *,
                 threads: int = 1):
        ir.external_data.load_to_model(model)
        copy = ir.from_proto(ir.to_proto(model))
        probe_spec = find_blocks(copy)
        self.deltas: list[tuple[str, str]] = []  # per layer: (attention δ, FFN δ) input names
        for layer in probe_spec.layers:
            self.deltas.append((_inject(copy.graph, layer.attention.out, layer.attention.block),
                                _inject(copy.graph, layer.ffn.out, layer.ffn.block)))
        self.capture = Int8Capture(probe_spec)
        extra = [v for v in self.capture.values if not v.is_graph_output()]
        extra += [la.ffn.x for la in probe_spec.layers
                  if la.ffn.x not in extra and not la.ffn.x.is_graph_output()]
        self.ffn_x = [str(la.ffn.x.name) for la in probe_spec.layers]
        copy.graph.outputs.extend(extra)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(ir.to_proto(copy).SerializeToString(), options,
                                            providers=["CPUExecutionProvider"])
        self.output = main_output(self.session.get_outputs())
        self.vocab = spec.vocab_size
        names = {i.name for i in self.session.get_inputs()}
        self.feeds = [{k: np.asarray(v) for k, v in f.items() if k in names} for f in feeds]
        self.zeros = [{name: np.zeros((*_shape(f), spec.hidden), np.float32)
                       for pair in self.deltas for name in pair} for f in self.feeds]
        wanted = list(dict.fromkeys([self.output, *[str(v.name) for v in extra]]))
        # Token rows some exports keep flattened (TorchScript GPT-2's c_proj input) as
        # [B, S, W], so every Δ has the perturbation inputs' rank.
        self.tensors = [{name: unflatten_tokens(array, _shape(f)) for name, array in
                         zip(wanted, self.session.run(wanted, {**f, **z}), strict=True)}
                        for f, z in zip(self.feeds, self.zeros, strict=True)]
        self.base = [self.summary(t[self.output], f) for t, f in
                     zip(self.tensors, self.feeds, strict=True)]

    def layer_tensors(self, i: int, feed: int) -> dict[str, np.ndarray]:
        """Returns layer i's captured tensors by role (int8_cost's roles, `ffn_x`)."""
        tensors = self.tensors[feed]
        roles = {role: tensors[name] for role, name in self.capture.of_layer(i).items()}
        roles["ffn_x"] = tensors[self.ffn_x[i]]
        return roles

    def loss(self, layer: int, block: int, delta: Callable[[int], np.ndarray]) -> float:
        """Returns 1 − mean pooled cosine with `delta(feed)` added after one block.

        `block` is 0 for attention, 1 for the FFN.
        """
        cosines = []
        for k, (feed, zeros) in enumerate(zip(self.feeds, self.zeros, strict=True)):
            inputs = {**feed, **zeros, self.deltas[layer][block]: delta(k).astype(np.float32)}
            out = self.session.run([self.output], inputs)[0]
            cosines.append(_cosines(self.summary(out, feed), self.base[k]))
        return float(1.0 - np.mean(np.concatenate(cosines)))

    def summary(self, out: np.ndarray, feed: Feed) -> np.ndarray:
        """The rows compared by cosine: pooled outputs, or a language model's token logits.

        Logits [B, S, V] (V the vocabulary) give one row per real token, centred over V.
        """
        if out.ndim == 3 and self.vocab is not None and out.shape[-1] == self.vocab:
            mask = np.asarray(feed.get("attention_mask", np.ones(out.shape[:2]))) > 0
            rows = out[mask].astype(np.float32)
            return rows - rows.mean(axis=-1, keepdims=True)
        return _pooled(out, feed)

    def model_loss(self, path: Path) -> float:
        """Returns 1 − mean pooled cosine of another model (a compiled plan) on the probe."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.session.get_session_options().intra_op_num_threads
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        output = main_output(session.get_outputs())
        cosines = []
        for k, feed in enumerate(self.feeds):
            out = session.run([output], {n: v for n, v in feed.items() if n in names})[0]
            cosines.append(_cosines(self.summary(out, feed), self.base[k]))
        return float(1.0 - np.mean(np.concatenate(cosines)))


def measure_layers(
    probe: Probe, spec: ModelSpec, scores: Importance, acts: Sequence[LayerActivations], *,
    batch: int, int8: bool, moe: Mapping[int, FittedLayer] | None = None,
    moe_plans: Sequence[MoePlan] = (), progress: Callable[[str], None] | None = None,
) -> list[LayerLoss]:
    """Measures every layer's grid of single-block variants through the probe."""
    say = progress or (lambda _msg: None)
    layers = []
    for layer, act in zip(spec.layers, acts, strict=True):
        say(f"measuring layer {layer.index}'s variants through the rest of the model")
        fitted = moe.get(layer.index) if moe is not None else None
        layers.append(_measure_layer(probe, layer, act, scores, batch=batch, int8=int8,
                                     moe=fitted, moe_plans=moe_plans))
    return layers


def _measure_layer(probe: Probe, layer: LayerSpec, act: LayerActivations, scores: Importance,
                   *, batch: int, int8: bool, moe: FittedLayer | None,
                   moe_plans: Sequence[MoePlan]) -> LayerLoss:
    i, a, f = layer.index, layer.attention, layer.ffn
    attn = _curve(probe, i, 0, scores.heads[i], act.ctx, a.o, unit=a.head_size)
    ffn = _curve(probe, i, 1, scores.channels[i], act.act, f.w2, unit=1)
    int8_attn = int8_ffn = None
    if int8:
        int8_attn = probe.loss(i, 0, lambda k: attention_delta(a, probe.layer_tensors(i, k),
                                                               batch))
        int8_ffn = probe.loss(i, 1, lambda k: ffn_delta(f, probe.layer_tensors(i, k), batch))
    losses = {}
    if moe is not None:
        for plan in moe_plans:
            losses[plan] = probe.loss(i, 1, _moe_delta(probe, i, f.w2.w(), moe, plan))
    return LayerLoss(attn, ffn, int8_attn, int8_ffn, losses)


def _curve(probe: Probe, i: int, block: int, scores: np.ndarray, x_fit: np.ndarray,
           linear: Any, *, unit: int) -> Curve:
    """Measures removing the least important units down to each grid count."""
    n = len(scores)
    counts, costs, losses = [n], [0.0], [0.0]
    w, b = linear.w(), linear.b()
    role = "ctx" if block == 0 else "act"
    for count in grid(n):
        kept = kept_units(scores, count)
        cols = _columns(kept, unit)
        choice = choose_output(x_fit, cols, w, b)
        w_new, b_new = choice.fit if choice.fit is not None else (w[cols], b)

        def delta(k: int, cols: np.ndarray = cols, w_new: Any = w_new, b_new: Any = b_new
                  ) -> np.ndarray:
            x = probe.layer_tensors(i, k)[role].astype(np.float64)
            before = x @ w.astype(np.float64) + (0 if b is None else b)
            after = x[..., cols] @ np.asarray(w_new, np.float64) + (0 if b_new is None
                                                                   else b_new)
            return after - before

        counts.append(count)
        costs.append(removed_cost(scores, n - count))
        losses.append(probe.loss(i, block, delta))
    # Removing more units never helps by more than noise: keep the curve monotone.
    return Curve(tuple(counts), tuple(costs),
                 tuple(float(v) for v in np.maximum.accumulate(losses)))


def _columns(kept: tuple[int, ...], unit: int) -> np.ndarray:
    if not kept:
        return np.zeros(0, np.int64)
    return np.concatenate([np.arange(u * unit, (u + 1) * unit) for u in kept])


def _moe_delta(probe: Probe, i: int, w2: np.ndarray, fitted: FittedLayer, plan: MoePlan
               ) -> Callable[[int], np.ndarray]:
    """The FFN output's change when tokens run only the experts the router picks."""
    def delta(k: int) -> np.ndarray:
        t = probe.layer_tensors(i, k)
        x, act = t["ffn_x"], t["act"]
        flat_x = x.reshape(-1, x.shape[-1]).astype(np.float32)
        flat_a = act.reshape(-1, act.shape[-1]).astype(np.float32)
        chosen = select(fitted.router(flat_x), top_k=plan.top_k, tau=plan.tau)
        out = np.zeros((flat_x.shape[0], w2.shape[1]), np.float32)
        for e, group in enumerate(fitted.experts):
            dropped = ~chosen[:, e]
            out[dropped] -= flat_a[dropped][:, group] @ w2[group].astype(np.float32)
        return out.reshape(*x.shape[:-1], w2.shape[1])

    return delta


def fit_weights(rows: Sequence[tuple[Mapping[str, float], float]], *,
                prior: float = PRIOR) -> dict[str, float]:
    """Fits per-kind weights so Σ_kind w·S_kind matches measured whole-plan losses.

    Args:
        rows: per plan, its unweighted predicted loss by kind and its measured loss.
        prior: pull of each weight toward 1 (weights of kinds no plan uses stay 1).

    Minimises Σ_plans ((Σ w_k S_k − m) / m)² + prior · Σ_k (w_k − 1)², w ≥ 0.
    """
    used = [k for k in KINDS if any(parts.get(k, 0.0) > 0 for parts, _ in rows)]
    if not used:
        return dict.fromkeys(KINDS, 1.0)
    a = [[parts.get(k, 0.0) / max(m, 1e-4) for k in used] for parts, m in rows]
    y = [m / max(m, 1e-4) for _, m in rows]
    root = np.sqrt(prior)
    a += [[root * (j == k) for k in range(len(used))] for j in range(len(used))]
    y += [root] * len(used)
    solution = lsq_linear(np.asarray(a, float), np.asarray(y, float), bounds=(0, np.inf))
    weights = dict.fromkeys(KINDS, 1.0)
    weights.update({k: float(w) for k, w in zip(used, solution.x, strict=True)})
    return weights


def _inject(graph: ir.Graph, value: ir.Value, block: str) -> str:
    """Adds a graph input δ to `value` for every reader of it; returns δ's name."""
    uses = list(value.uses())
    delta = ir.Value(name=f"planer/probe/{block}/delta_BSD",
                     type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", "S", None]))
    graph.inputs.append(delta)
    node = ir.Node("", "Add", [value, delta], name=f"planer/probe/{block}/Add")
    node.outputs[0].name = f"planer/probe/{block}/out_BSD"
    producer = value.producer()
    if producer is not None:
        graph.insert_after(producer, node)
    else:
        graph.insert_before(graph[0], node)
    for user, index in uses:
        user.replace_input_with(index, node.outputs[0])
    if value.is_graph_output():
        outputs = graph.outputs
        outputs[outputs.index(value)] = node.outputs[0]
    return str(delta.name)


def _shape(feed: Feed) -> tuple[int, int]:
    first = next(v for v in feed.values() if np.ndim(v) == 2)
    return int(first.shape[0]), int(first.shape[1])


def _pooled(out: np.ndarray, feed: Feed) -> np.ndarray:
    out = out.astype(np.float64)
    if out.ndim != 3:
        return out.reshape(out.shape[0], -1)
    mask = np.asarray(feed.get("attention_mask", np.ones(out.shape[:2]))).astype(np.float64)
    return (out * mask[..., None]).sum(1)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.sum(a * b, axis=-1) / np.where(den == 0, 1.0, den)


def probe_feeds(batches: Sequence[Feed], sequences: int) -> list[Feed]:
    """The probe: the last `sequences` sequences of `batches`, as they are batched.

    The caller passes the calibration holdout share, which no refit has seen.
    """
    return take_sequences(list(reversed(batches)), sequences)
