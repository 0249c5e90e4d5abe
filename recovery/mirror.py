"""A torch mirror of a compiled model's residual stream, with weights read by name.

Dimensions: B batch, S sequence, D model width, H heads, d head size, F FFN width.

    entry_BSD, aux (ORT) ─ Mirror ─ end_BSD (+ each layer's output)
      attn:  x ─ Linear(q/k/v) ─ [B,H,S,d] ─ rotary (where the graph has one) ─ q·kᵀ·scale
             ─ score ops replayed (mask Add, Where...) ─ Softmax ─ ·v ─ NaN guard
             ─ [B,S,H·d] ─ Linear(o)
      rotary: y = x·cos + rotate(x)·sin on q, k (and v where rotated), over each head's
             first r dims for a partial one; rotate "half" (-x₂, x₁) or "interleaved"
             (-x₂ᵢ₊₁, x₂ᵢ); cos/sin as the graph reads them: aux values ORT computes from
             the positions per batch, or constants; one row per kept head or broadcast
      ffn:   x ─ Linear(w1) ─ gelu | gelu_tanh | relu | silu ─ Linear(w2), or gated
             (SwiGLU/GeGLU): Linear(w2)(act(Linear(gate)(x)) · Linear(w1)(x))
      moe:   recovery.moe (router, hard top-k / tau selection, experts)
      skim:  recovery.skim (predictor, the graph's keep rule, straight-through; later
             layers run full length with skimmed keys masked, skimmed rows forwarded)
      stream ops between blocks, replayed op by op (recovery.stream_ops): Add / Sum,
             LayerNormalization, a decomposed RMSNorm (Cast, Pow, ReduceMean, Add, Sqrt,
             Div | Reciprocal, Mul), Reshape, Identity, an LM head's MatMul (frozen)

Every tensor a module reads is a graph initializer looked up by its name in one
`WeightStore`; the trained ones are Parameters, written back under the same names with
the same shapes and dtypes (`write_back`), so the trained model is the emitted graph with
new weights. An initializer another part of the graph also reads (the embeddings, say)
stays frozen, because training it here would change what the frozen ORT part computes.
So does an LM head's MatMul after the layers: like a classification head (recovery.head),
it is not what planer rewrote. Rotary cos/sin are never trained.
`check_mirror` compares the mirror with the emitted model in ORT before any training.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch import nn
from torch.nn import functional as F

from planer.compiler.errors import UnsupportedModelError
from planer.compiler.irutil import const_array
from planer.compiler.spec import AttentionSpec, FfnSpec, Linear, Rotary
from planer.recovery.fakequant import Simulation, dynamic_int8
from planer.recovery.stream_ops import StreamFn, fn_for
from planer.recovery.structure import MoeBlock, SkimBlock, Step, Stream, unsupported_steps

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")


class WeightStore(nn.Module):
    """The graph initializers the mirror reads, by name: Parameters if trained, else buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.params = nn.ParameterDict()
        self.keys: dict[str, str] = {}  # initializer name -> attribute key
        self.dtypes: dict[str, np.dtype] = {}
        self.int8 = Simulation()  # the projections rounded as dynamic INT8 will round them

    def add(self, value: ir.Value, *, trainable: bool, scalar: bool = False) -> str:
        """Registers `value` once (shared initializers stay one tensor); returns its name.

        A one-element tensor is trained only with `scalar` (most are graph constants).
        """
        name = str(value.name)
        if name in self.keys:
            return name
        array = const_array(value)
        if array is None:
            raise UnsupportedModelError(f"{name} is not a constant the mirror can read.")
        key = f"w{len(self.keys)}"
        tensor = torch.from_numpy(np.array(array, dtype=np.float32 if array.dtype.kind == "f"
                                           else array.dtype))
        self.dtypes[name] = array.dtype
        if trainable and array.dtype == np.float32 and (array.size > 1 or scalar):
            self.params[key] = nn.Parameter(tensor)
        else:
            self.register_buffer(key, tensor)
        self.keys[name] = key
        return name

    def get(self, name: str) -> torch.Tensor:
        key = self.keys[name]
        return self.params[key] if key in self.params else getattr(self, key)

    def trained(self) -> dict[str, torch.Tensor]:
        """Returns the trained tensors by initializer name."""
        return {name: self.params[key] for name, key in self.keys.items() if key in self.params}


@dataclasses.dataclass(frozen=True)
class LinearRef:
    """A projection's weight [in, out] (columns start:stop) and bias, by initializer name."""

    weight: str
    bias: str | None
    start: int
    stop: int

    def __call__(self, store: WeightStore, x: torch.Tensor) -> torch.Tensor:
        w = store.get(self.weight)
        if store.int8.applies(self.weight):  # the whole MatMul weight shares one scale
            x, w = dynamic_int8(x, w)
        if self.start != 0 or self.stop != w.shape[1]:
            w = w[:, self.start:self.stop]
        y = x @ w
        if self.bias is not None:
            b = store.get(self.bias).reshape(-1)
            if b.shape[0] != y.shape[-1]:
                b = b[self.start:self.stop]
            y = y + b
        return y


def _linear(store: WeightStore, lin: Linear, trainable: set[str]) -> LinearRef:
    start, stop, _ = lin.columns.indices(int(lin.weight.const_value.shape[1]))  # type: ignore
    weight = store.add(lin.weight, trainable=str(lin.weight.name) in trainable)
    bias = store.add(lin.bias, trainable=str(lin.bias.name) in trainable) \
        if lin.bias is not None else None
    return LinearRef(weight, bias, start, stop)


Operand = tuple[str, Any]  # ("scores", None) | ("aux", name) | ("const", name)


class AttentionMirror(nn.Module):
    """Self-attention as the canonical graph computes it, per kept head."""

    def __init__(self, store: WeightStore, spec: AttentionSpec, trainable: set[str],
                 aux: set[str]):
        super().__init__()
        self.store = [store]  # a list, so the shared store is not registered per block
        self.q, self.k, self.v, self.o = (_linear(store, lin, trainable)
                                          for lin in (spec.q, spec.k, spec.v, spec.o))
        self.heads, self.head_size = spec.heads, spec.head_size
        self.scale = float(spec.scale)
        self.nan_guard = spec.nan_guard
        self.rotary = {role: RotaryRef.read(rotary, store, aux, spec.block, spec.head_size)
                       for role, rotary in spec.rotary.items()}
        self.score_ops: list[tuple[str, list[Operand], dict[str, Any]]] = []
        for op in spec.score_ops:
            if op.op_type not in _SCORE_FNS:
                raise UnsupportedModelError(f"{spec.block}: score op {op.op_type} is not mirrored.")
            operands: list[Operand] = [
                ("scores", None) if i == op.scores_index
                else _operand(value, store, aux, f"{spec.block}: a score op")
                for i, value in enumerate(op.inputs)]
            self.score_ops.append((op.op_type, operands, op.attributes))

    def forward(self, x: torch.Tensor, aux: Mapping[str, torch.Tensor],
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attends over x [B, S, D]; `key_mask` [B, 1, 1, S] is added to the scores (skim)."""
        store = self.store[0]
        b, s, _ = x.shape
        h, d = self.heads, self.head_size
        q, k, v = (self._heads(role, lin(store, x).reshape(b, s, h, d).transpose(1, 2), aux)
                   for role, lin in (("q", self.q), ("k", self.k), ("v", self.v)))
        scores = (q @ k.transpose(-1, -2)) * self.scale
        for op_type, operands, _ in self.score_ops:
            scores = _SCORE_FNS[op_type](*(_read(o, scores, aux, store) for o in operands))
        if key_mask is not None:
            scores = scores + key_mask
        ctx = torch.softmax(scores, dim=-1) @ v
        if self.nan_guard:
            ctx = torch.where(torch.isnan(ctx), torch.zeros_like(ctx), ctx)
        return self.o(store, ctx.transpose(1, 2).reshape(b, s, h * d))

    def _heads(self, role: str, x: torch.Tensor, aux: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Applies the rotary on `role` (q/k/v) to x [B, H, S, d], if the graph has one."""
        rotary = self.rotary.get(role)
        if rotary is None:
            return x
        store = self.store[0]
        return rotary(x, _read(rotary.cos, x, aux, store), _read(rotary.sin, x, aux, store))


def _operand(value: ir.Value | None, store: WeightStore, aux: set[str], what: str) -> Operand:
    """Says where a value a block reads comes from: ORT's aux values or a constant."""
    if value is not None and str(value.name) in aux:
        return ("aux", str(value.name))
    if value is not None and const_array(value) is not None:
        return ("const", store.add(value, trainable=False))
    raise UnsupportedModelError(f"{what} reads {value.name if value else None}, unknown here.")


def _read(operand: Operand, scores: torch.Tensor, aux: Mapping[str, torch.Tensor],
          store: WeightStore) -> torch.Tensor:
    kind, ref = operand
    return scores if kind == "scores" else aux[ref] if kind == "aux" else store.get(ref)


@dataclasses.dataclass(frozen=True)
class RotaryRef:
    """A rotary on q, k or v [B, H, S, d]: y = x·cos + rotate(x)·sin (compiler.rotary).

    `span` is r for a partial rotary (the first r dims rotate, the rest pass through).
    cos/sin broadcast as the graph broadcasts them, per-head rows [.., H, S, d] included
    (head pruning gathered those to the kept heads before the stream).
    """

    style: str
    cos: Operand
    sin: Operand
    span: int | None

    @staticmethod
    def read(rotary: Rotary, store: WeightStore, aux: set[str], block: str,
             head_size: int) -> RotaryRef:
        span = rotary.partial
        covered = head_size if span is None else span
        if rotary.style not in ("half", "interleaved") or rotary.width not in (None, covered):
            raise UnsupportedModelError(f"{block}: a {rotary.style} rotary over {rotary.width} "
                                        f"of {covered} dims is not mirrored.")
        what = f"{block}: the rotary"
        return RotaryRef(rotary.style, _operand(rotary.cos, store, aux, what),
                         _operand(rotary.sin, store, aux, what), span)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        whole = x
        if self.span is not None:
            x = whole[..., :self.span]
        if self.style == "half":  # (x₁, x₂) → (-x₂, x₁), halves of the rotated dims
            half = x.shape[-1] // 2
            turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        else:  # each pair (x₂ᵢ, x₂ᵢ₊₁) → (-x₂ᵢ₊₁, x₂ᵢ)
            pairs = x.reshape(*x.shape[:-1], -1, 2)
            turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).reshape(x.shape)
        y = x * cos + turned * sin
        return y if self.span is None else torch.cat((y, whole[..., self.span:]), dim=-1)


_SCORE_FNS: dict[str, Callable[..., torch.Tensor]] = {
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "Div": lambda a, b: a / b,
    "Where": lambda c, a, b: torch.where(c.bool(), a, b),
}


def activation_fn(name: str) -> Any:
    """Returns the torch function of an FFN activation label from the finder."""
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda h: F.gelu(h, approximate="tanh")
    if name == "relu":
        return F.relu
    if name == "silu":
        return F.silu
    raise UnsupportedModelError(f"the FFN activation {name!r} is not mirrored "
                                f"(mirrored: {', '.join(ACTIVATIONS)}).")


class FfnMirror(nn.Module):
    """A dense FFN: Linear(w1) ─ activation ─ Linear(w2), or gated: act(gate(x))·w1(x) ─ w2."""

    def __init__(self, store: WeightStore, spec: FfnSpec, trainable: set[str]):
        super().__init__()
        self.store = [store]
        self.w1 = _linear(store, spec.w1, trainable)
        self.w2 = _linear(store, spec.w2, trainable)
        self.gate = _linear(store, spec.gate, trainable) if spec.gate is not None else None
        self.activation = spec.activation
        self.act = activation_fn(spec.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        store = self.store[0]
        if self.gate is not None:  # SwiGLU/GeGLU: the activation applies to the gate
            return self.w2(store, self.act(self.gate(store, x)) * self.w1(store, x))
        return self.w2(store, self.act(self.w1(store, x)))


@dataclasses.dataclass
class MirrorOutput:
    """What one forward gives: the end value, each layer's output, auxiliary losses."""

    end: torch.Tensor
    layers: list[torch.Tensor]
    aux_loss: torch.Tensor | None = None
    skim_loss: torch.Tensor | None = None  # Transkimmer's, toward the planned keep ratios
    skim_keep: list[float] = dataclasses.field(default_factory=list)  # soft, per point
    # Per layer, the rows [B, S] (0/1, no gradient) the graph computes there; empty: all.
    layer_rows: list[torch.Tensor | None] = dataclasses.field(default_factory=list)


class Mirror(nn.Module):
    """The residual stream of a compiled model as a torch module.

    Args:
        stream: the stream (`structure.read_stream`) of the canonical compiled model.

    Raises:
        UnsupportedModelError: the stream holds an op or block the mirror cannot replay.
    """

    def __init__(self, stream: Stream):
        super().__init__()
        bad = unsupported_steps(stream)
        if bad:
            raise UnsupportedModelError("recovery cannot mirror these ops between the layers: "
                                        + ", ".join(bad[:5]) + ".")
        self.store = WeightStore()
        self.entry = str(stream.entry.name)
        self.end = str(stream.end.name)
        self.aux_names = [str(v.name) for v in stream.aux]
        self.layer_names = [str(v.name) for v in stream.layer_outputs or []]
        self.skim_masks = {str(m.name) for s in stream.steps if isinstance(s.block, SkimBlock)
                           for m in s.block.masks}
        self.skim_masks_of: dict[str, list[str]] = {}
        self.frozen_shared: list[str] = []
        trainable = self._trainable(stream)
        self.blocks = nn.ModuleDict()
        self.stream_fns: dict[str, StreamFn] = {}  # stream ops by step key (stream_ops)
        self.program: list[tuple[str, str, list[str], str]] = []  # kind, key, inputs, output
        for i, step in enumerate(stream.steps):
            key = f"s{i}"
            self.program.append((step.kind, key, [str(v.name) for v in step.inputs],
                                 str(step.output.name)))
            self._add_step(key, step, trainable)
        self.described = [(kind, _step_name(step)) for (kind, *_), step
                          in zip(self.program, stream.steps, strict=True)]

    def _trainable(self, stream: Stream) -> set[str]:
        """Names the initializers the steps may train: those only the stream reads."""
        names: set[str] = set()
        for step in stream.steps:
            for value in _initializers(step):
                if all(id(u) in stream.region for u in value.consumers()):
                    names.add(str(value.name))
                elif str(value.name) not in self.frozen_shared:
                    self.frozen_shared.append(str(value.name))
        return names

    def _add_step(self, key: str, step: Step, trainable: set[str]) -> None:
        aux = set(self.aux_names) | self.skim_masks
        if step.kind == "attn":
            assert isinstance(step.block, AttentionSpec)
            self.blocks[key] = AttentionMirror(self.store, step.block, trainable, aux)
        elif step.kind == "ffn":
            assert isinstance(step.block, FfnSpec)
            self.blocks[key] = FfnMirror(self.store, step.block, trainable)
        elif step.kind == "moe":
            from planer.recovery.moe import MoeMirror

            assert isinstance(step.block, MoeBlock)
            self.blocks[key] = MoeMirror(self.store, step.block, trainable)
        elif step.kind == "skim":
            from planer.recovery.skim import SkimMirror

            assert isinstance(step.block, SkimBlock)
            self.blocks[key] = SkimMirror(self.store, step.block, trainable)
            self.skim_masks_of[key] = [str(m.name) for m in step.block.masks]
        elif step.kind == "skim_out":
            pass  # the skim state forwards the skimmed rows (SkimState.mix)
        else:
            node = step.block
            assert isinstance(node, ir.Node)
            for value in node.inputs:
                if value is not None and const_array(value) is not None:
                    self.store.add(value, trainable=str(value.name) in trainable)
            if step.kind == "LayerNormalization":
                self.blocks[key] = _LayerNorm(self.store, node)
            elif step.kind not in ("Add", "Sum"):
                self.stream_fns[key] = fn_for(node)

    def forward(self, entry: torch.Tensor, aux: Mapping[str, torch.Tensor],
                mask: torch.Tensor | None = None) -> MirrorOutput:
        """Runs the stream from `entry` [B, S, D]; `mask` [B, S] marks real tokens (MoE)."""
        env: dict[str, torch.Tensor] = {self.entry: entry, **aux}
        extra: list[torch.Tensor] = []
        skim: Any = None  # recovery.skim.SkimState from the first skim point on
        shown: dict[str, torch.Tensor] = {}  # the last layer's output, skimmed rows forwarded
        rows: dict[str, torch.Tensor] = {}  # earlier layers: the rows still running there
        for kind, key, inputs, output in self.program:
            if kind == "attn":
                env[output] = self.blocks[key](env[inputs[0]], env,
                                               skim.key_mask() if skim is not None else None)
            elif kind == "ffn":
                env[output] = self.blocks[key](env[inputs[0]])
            elif kind == "moe":
                env[output], loss = self.blocks[key](env[inputs[0]], mask)
                if loss is not None:
                    extra.append(loss)
            elif kind == "LayerNormalization":
                env[output] = self.blocks[key](env[inputs[0]])
            elif kind == "skim":
                env[output], skim = self.blocks[key](env[inputs[0]], mask, skim)
                # Its slot-layout masks are replaced by the state's full-length key mask.
                env.update(dict.fromkeys(self.skim_masks_of[key], torch.zeros(())))
            elif kind == "skim_out":
                env[output] = skim.mix(env[inputs[0]])
            elif kind in ("Add", "Sum"):
                total = self._operand(env, inputs[0])
                for name in inputs[1:]:
                    total = total + self._operand(env, name)
                env[output] = total
            else:  # an elementwise op, a reduction, Reshape, MatMul (stream_ops)
                env[output] = self.stream_fns[key](*(self._operand(env, n) for n in inputs))
            if skim is not None and output in self.layer_names:
                # The last layer's skimmed rows are what the write-back forwards (mapped
                # toward the final rows). An earlier layer never computes them in the graph,
                # and a map fitted to the final rows is no target for its states: those rows
                # leave its loss (hard mask: no gradient pulls predictors toward skimming).
                if output == self.layer_names[-1]:
                    shown[output] = skim.mix(env[output])
                else:
                    rows[output] = skim.active.to(env[output].dtype)
        layers = [shown.get(name, env[name]) for name in self.layer_names]
        aux_loss = torch.stack(extra).sum() if extra else None
        if skim is None:
            return MirrorOutput(env[self.end], layers, aux_loss)
        return MirrorOutput(env[self.end], layers, aux_loss, skim.loss(), skim.keep_ratios(),
                            [rows.get(name) for name in self.layer_names])

    def _operand(self, env: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
        return env[name] if name in env else self.store.get(name)

    def trained(self) -> dict[str, torch.Tensor]:
        """Returns the trained tensors by initializer name."""
        return self.store.trained()


class _LayerNorm(nn.Module):
    """LayerNormalization over the last axis with its scale and (optional) bias."""

    def __init__(self, store: WeightStore, node: ir.Node):
        super().__init__()
        axis = node.attributes.get("axis")
        if axis is not None and axis.value != -1:
            raise UnsupportedModelError(f"{node.name}: LayerNormalization over axis "
                                        f"{axis.value} is not mirrored.")
        eps = node.attributes.get("epsilon")
        self.eps = float(eps.value) if eps is not None else 1e-5
        self.store = [store]
        self.scale = str(node.inputs[1].name)  # type: ignore[union-attr]
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        self.bias = str(bias.name) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        store = self.store[0]
        bias = store.get(self.bias) if self.bias is not None else None
        return F.layer_norm(x, (x.shape[-1],), store.get(self.scale), bias, self.eps)


def _initializers(step: Step) -> list[ir.Value]:
    """Returns the float initializers a step reads (weights, biases, norms)."""
    block = step.block
    if isinstance(block, AttentionSpec):
        lins: list[Linear] = [block.q, block.k, block.v, block.o]
    elif isinstance(block, FfnSpec):
        lins = [block.w1, block.w2, *([block.gate] if block.gate is not None else [])]
    else:
        if isinstance(block, SkimBlock):
            return block.weights
        if isinstance(block, ir.Node) and block.op_type == "MatMul":
            return []  # an LM head after the layers: frozen, like a classification head
        nodes = block.nodes if isinstance(block, MoeBlock) else [block]
        return [v for n in nodes for v in n.inputs
                if v is not None and v.const_value is not None
                and v.const_value.dtype.is_floating_point()]
    values = [lin.weight for lin in lins] + [lin.bias for lin in lins if lin.bias is not None]
    return values


def _step_name(step: Step) -> str:
    block = step.block
    if isinstance(block, AttentionSpec | FfnSpec | MoeBlock | SkimBlock):
        return block.block
    return str(block.name)


# ---------------------------------------------------------------- write-back, check


def write_back(model: ir.Model, mirror: Mirror) -> list[str]:
    """Writes the mirror's trained tensors into `model`'s initializers of the same names.

    Returns the names written. Shapes and dtypes are checked against the graph's.

    Raises:
        ValueError: a name is missing from `model` or its shape or dtype differs.
    """
    written = []
    for name, tensor in mirror.trained().items():
        value = model.graph.initializers.get(name)
        if value is None or value.const_value is None:
            raise ValueError(f"the model has no initializer {name!r} to write back into.")
        old = value.const_value
        array = tensor.detach().cpu().numpy().astype(old.dtype.numpy())
        if tuple(old.shape.numpy()) != array.shape:
            raise ValueError(f"{name}: trained shape {array.shape} differs from the graph's "
                             f"{tuple(old.shape.numpy())}.")
        value.const_value = ir.tensor(array, name=name)
        written.append(name)
    return written


def max_abs_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Returns max |a - b| over real tokens (all rows without a mask)."""
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    if mask is not None and diff.ndim == 3:
        diff = diff[mask.astype(bool)]
    return float(diff.max()) if diff.size else 0.0


def param_count(mirror: Mirror) -> int:
    """Counts the trained scalars."""
    return sum(math.prod(t.shape) for t in mirror.trained().values())
