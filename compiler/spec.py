"""ModelSpec: the Transformer as blocks (attention, FFN, norms, residual wiring).

The finder (`compiler.blocks`) fills these records from a canonical graph; passes read
weights through them and never look tensors up by exporter-generated names. FLOPs and
parameter counts are computed from the spec, so the report, `inspect` and the search
all count the same way.

Dimensions: B batch, S sequence, D model width, H heads, d head size, F FFN width.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from planer.compiler.names import BlockId


@dataclasses.dataclass
class Linear:
    """A projection y = x @ W[:, columns] + b[columns] with W an initializer in [in, out] layout.

    `columns` selects this projection's share of a fused weight (GPT-2's c_attn holds
    Q, K and V side by side); it is the whole width otherwise.
    """

    weight: ir.Value
    bias: ir.Value | None
    matmul: ir.Node
    columns: slice

    def w(self) -> np.ndarray:
        """Returns this projection's weight, [in, out]."""
        return _constant(self.weight).numpy()[:, self.columns]

    def b(self) -> np.ndarray | None:
        """Returns this projection's bias, [out], or None."""
        if self.bias is None:
            return None
        return _constant(self.bias).numpy().reshape(-1)[self.columns]

    @property
    def input(self) -> ir.Value:
        """The activation this projection multiplies (its MatMul's first operand)."""
        value = self.matmul.inputs[0]
        if value is None:
            raise ValueError(f"{self.matmul.name} has no first input")
        return value

    @property
    def in_features(self) -> int:
        return int(_constant(self.weight).shape.numpy()[0])

    @property
    def out_features(self) -> int:
        total = _constant(self.weight).shape.numpy()[1]
        start, stop, _ = self.columns.indices(int(total))
        return stop - start


def _producer(value: ir.Value) -> ir.Node:
    """Returns the node computing a block's output (the finder only takes computed ones)."""
    node = value.producer()
    if node is None:
        raise ValueError(f"{value.name} is not computed by a node, so it cannot end a block")
    return node


def _constant(value: ir.Value) -> ir.TensorProtocol:
    """Returns the tensor behind a Linear's weight or bias (the finder only takes constants)."""
    if value.const_value is None:
        raise ValueError(f"{value.name} is not a constant, so it cannot be a Linear's weight")
    return value.const_value


@dataclasses.dataclass
class ScoreOp:
    """One elementwise step between Q·Kᵀ and Softmax (a mask Add, a Where, ...), replayed as is."""

    op_type: str
    inputs: list[ir.Value | None]
    scores_index: int  # which input position carries the scores
    attributes: dict[str, Any]


@dataclasses.dataclass
class Rotary:
    """Rotary position embedding on Q, K or V, [B, H, S, d]: y = x·cos + rotate(x)·sin.

    `style` "half" rotates (x[:d/2], x[d/2:]) into (-x[d/2:], x[:d/2]) (Llama, GPT-NeoX,
    ModernBERT); "interleaved" turns each pair (x₂ᵢ, x₂ᵢ₊₁) into (-x₂ᵢ₊₁, x₂ᵢ) (RoFormer,
    GPT-J). `cos` and `sin` broadcast over the heads or hold one row per head on axis -3.
    `width` is how many dims the rotation covers as read (None: all it is given);
    `partial` is r when it is given only each head's first r dims (the rest pass through).
    """

    style: str
    cos: ir.Value
    sin: ir.Value
    width: int | None
    nodes: list[ir.Node]
    partial: int | None = None


@dataclasses.dataclass
class AttentionSpec:
    """Self-attention from its input x_BSD to the output projection's result out_BSD."""

    block: str
    x: ir.Value
    out: ir.Value
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    heads: int
    head_size: int
    scale: float
    score_ops: list[ScoreOp]
    nan_guard: bool
    nodes: list[ir.Node]
    rotary: dict[str, Rotary] = dataclasses.field(default_factory=dict)  # "q"/"k"/"v" rotated

    @property
    def inner(self) -> int:
        return self.heads * self.head_size

    @property
    def out_node(self) -> ir.Node:
        """The node computing `out` (a rewrite inserts its nodes before it)."""
        return _producer(self.out)


@dataclasses.dataclass
class FfnSpec:
    """FFN from x_BSD through W1, an elementwise activation and W2 to out_BSD.

    A gated FFN (SwiGLU, GeGLU: Llama-style decoders) also has `gate`; its activation
    applies to the gate and W1 is the up projection: out = (act(x·W_gate) * x·W1)·W2.
    Channel j is then the triple (gate column j, W1 column j, W2 row j), and W2's input
    (what `w2.input` names) is still the per-channel activation a_j that importance
    and the refit read. `nodes` holds the activation region and the gating Mul.
    """

    block: str
    x: ir.Value
    out: ir.Value
    w1: Linear
    w2: Linear
    activation: str
    nodes: list[ir.Node]
    gate: Linear | None = None

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def width(self) -> int:
        return self.w1.out_features

    @property
    def out_node(self) -> ir.Node:
        """The node computing `out` (a rewrite inserts its nodes before it)."""
        return _producer(self.out)


@dataclasses.dataclass
class LayerSpec:
    """One Transformer layer: attention, FFN and how the residual path is normalised."""

    index: int
    attention: AttentionSpec
    ffn: FfnSpec
    norm: str  # "post" (BERT) or "pre" (GPT-2, ViT)

    @property
    def block(self) -> str:
        return str(BlockId(self.index))

    def params(self) -> int:
        """Counts the weights and biases of the layer's projections (norms excluded)."""
        total = 0
        for lin in (*self.projections(),):
            total += lin.in_features * lin.out_features + (lin.out_features if lin.bias else 0)
        return total

    def projections(self) -> tuple[Linear, ...]:
        a, f = self.attention, self.ffn
        gate = (f.gate,) if f.gate is not None else ()  # last: readers zip the first six
        return (a.q, a.k, a.v, a.o, f.w1, f.w2, *gate)


@dataclasses.dataclass
class ModelSpec:
    """Every layer of the model plus what surrounds them."""

    layers: list[LayerSpec]
    hidden: int
    vocab_size: int | None
    inputs: list[str]
    outputs: list[str]
    total_params: int
    other_matmul_macs_per_token: int  # MACs of constant-weight MatMuls outside the layers
    kind: str = "encoder"  # "encoder" or "decoder"
    causal: bool | None = None  # set by compiler.causal.mark_causal (inspect); None: not probed
    shared_weights: bool = False  # layers share projection weights (ALBERT)

    def to_dict(self, *, batch: int = 1, seq_len: int = 128) -> dict[str, Any]:
        """Returns a JSON-ready summary (what `planer inspect --json` prints)."""
        return {
            "kind": self.kind,
            "causal": self.causal,
            "shared_weights": self.shared_weights,
            "hidden": self.hidden,
            "vocab_size": self.vocab_size,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "params": self.total_params,
            "batch": batch,
            "seq_len": seq_len,
            "flops": model_flops(self, batch=batch, seq_len=seq_len),
            "layers": [layer_record(layer, batch=batch, seq_len=seq_len) for layer in self.layers],
        }


def layer_record(layer: LayerSpec, *, batch: int, seq_len: int) -> dict[str, Any]:
    """Summarises one layer for reports."""
    a, f = layer.attention, layer.ffn
    styles = sorted({r.style for r in a.rotary.values()})
    rotary = {"rotary": "+".join(styles)} if styles else {}  # absent: no rotary, as before
    return {
        "index": layer.index,
        "heads": a.heads,
        "head_size": a.head_size,
        "hidden": a.q.in_features,
        "ffn": f.width,
        "activation": f.activation,
        "norm": layer.norm,
        "params": layer.params(),
        "flops": layer_flops(
            hidden=a.q.in_features, heads=a.heads, head_size=a.head_size, ffn=f.width,
            batch=batch, seq_len=seq_len, gated=f.gated,
        ),
        **rotary,
        **({"gated": True} if f.gated else {}),  # absent: ungated, as before
    }


def layer_flops(
    *, hidden: int, heads: int, head_size: int, ffn: int, batch: int, seq_len: int,
    gated: bool = False,
) -> int:
    """Counts multiply-adds x2 of one layer's matrix products (softmax/norms excluded).

    A gated FFN has three projections of width `ffn` (gate, up, down), not two.
    """
    tokens = batch * seq_len
    inner = heads * head_size
    projections = 2 * tokens * hidden * inner * 4
    scores = 2 * batch * heads * seq_len * seq_len * head_size * 2
    mlp = 2 * tokens * hidden * ffn * (3 if gated else 2)
    return projections + scores + mlp


def model_flops(spec: ModelSpec, *, batch: int, seq_len: int) -> int:
    """Counts FLOPs of all layers plus constant-weight MatMuls outside them (per token)."""
    total = 2 * batch * seq_len * spec.other_matmul_macs_per_token
    for layer in spec.layers:
        a, f = layer.attention, layer.ffn
        total += layer_flops(
            hidden=a.q.in_features, heads=a.heads, head_size=a.head_size, ffn=f.width,
            batch=batch, seq_len=seq_len, gated=f.gated,
        )
    return total
