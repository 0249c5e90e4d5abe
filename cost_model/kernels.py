"""Measures ORT kernel choices that decide how planer spells a graph.

`skip_layernorm_costs` times residual Add + LayerNormalization two ways in one process,
interleaved: as ORT fuses it (SkipLayerNormalization) and kept apart (the Add spelled as
Sum, which ORT's fusion does not match); passes.ort_kernels acts on it.
`moe_lowering_costs` times an MoE FFN lowered as planer's gather chain and as ORT's
com.microsoft.MoE kernel, where the kernel fits; passes.ffn_to_moe acts on it. Both run
on one-block models of the real shapes with random weights (speed does not depend on the
values). Each call measures; `KernelTimings` keeps one compile's measurements, keyed by
shape, tokens and threads, so its stages (and a latency search's rounds) time each shape
once, and a new `KernelTimings` asks for fresh timings. Nothing is cached per process.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from planer.compiler.spec import FfnSpec, Linear
from planer.cost_model.timing import SessionOptions, make_session, time_interleaved
from planer.passes.ffn_to_moe import FfnToMoeConfig, MoeLayer, rewrite_ffn
from planer.passes.moe_fit import ROUTER_HIDDEN, Router, cluster_experts


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """Median microseconds of the fused and unfused spelling of one residual LayerNorm."""

    fused_us: float
    unfused_us: float

    @property
    def unfuse(self) -> bool:
        """True when keeping Add and LayerNormalization apart measured faster."""
        return self.unfused_us < self.fused_us

    def to_dict(self) -> dict[str, float | bool]:
        return {"fused_us": round(self.fused_us, 1), "unfused_us": round(self.unfused_us, 1),
                "unfuse": self.unfuse}


def skip_layernorm_costs(width: int, tokens: int, threads: int, *,
                         repeats: int = 60) -> KernelChoice:
    """Times fused vs unfused residual LayerNorm on [1, tokens, width] (ORT CPU, "all")."""
    rng = np.random.default_rng(0)
    models = {kind: _residual_layernorm(width, kind, rng) for kind in ("Add", "Sum")}
    opts = SessionOptions(threads=threads)
    sessions = {kind: make_session(m, opts) for kind, m in models.items()}
    feed = {name: rng.standard_normal((1, tokens, width)).astype(np.float32)
            for name in ("x", "skip")}
    timings = time_interleaved(sessions, feed, warmup=5, repeats=repeats)
    return KernelChoice(timings["Add"].median_ms * 1e3, timings["Sum"].median_ms * 1e3)


def _residual_layernorm(width: int, residual_op: str,
                        rng: np.random.Generator) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), name)
             for name in ("bias", "gamma", "beta")]
    nodes = [helper.make_node("Add", ["x", "bias"], ["biased"]),
             helper.make_node(residual_op, ["biased", "skip"], ["total"]),
             helper.make_node("LayerNormalization", ["total", "gamma", "beta"], ["y"],
                              axis=-1, epsilon=1e-12)]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", "S", width])
          for n in ("x", "skip", "y")]
    graph = helper.make_graph(nodes, "residual_layernorm", io[:2], io[2:], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# ---------------------------------------------------------------- MoE lowering


@dataclasses.dataclass(frozen=True)
class MoeLoweringChoice:
    """Median microseconds of one MoE FFN in each "ort" lowering, and of the dense FFN."""

    dense_us: float
    gather_us: float
    kernel_us: float

    @property
    def lowering(self) -> str:
        """The faster lowering: "kernel" (com.microsoft.MoE) or "gather"."""
        return "kernel" if self.kernel_us < self.gather_us else "gather"

    def to_dict(self) -> dict[str, float | str]:
        return {"dense_us": round(self.dense_us, 1), "gather_us": round(self.gather_us, 1),
                "kernel_us": round(self.kernel_us, 1), "lowering": self.lowering}


def moe_lowering_costs(width: int, ffn_width: int, experts: int, top_k: int, activation: str,
                       tokens: int, threads: int, *, repeats: int = 40) -> MoeLoweringChoice:
    """Times dense vs gather vs kernel MoE FFNs on [1, tokens, width] (ORT CPU, "all")."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((width, ffn_width)) / np.sqrt(width)).astype(np.float32)
    w2 = (rng.standard_normal((ffn_width, width)) / np.sqrt(ffn_width)).astype(np.float32)
    dense = standalone_ffn(w1, np.zeros(ffn_width, np.float32), w2,
                           np.zeros(width, np.float32), activation)
    hidden = ROUTER_HIDDEN
    router = Router((rng.standard_normal((width, hidden)) / np.sqrt(width)).astype(np.float32),
                    np.zeros(hidden, np.float32),
                    rng.standard_normal((hidden, experts)).astype(np.float32),
                    np.zeros(experts, np.float32))
    layer = MoeLayer(cluster_experts(w1, experts), router, top_k=top_k)
    models = {"dense": dense, **{lowering: standalone_moe(dense, activation, layer, lowering)
                                 for lowering in ("gather", "kernel")}}
    sessions = {k: make_session(m, SessionOptions(threads=threads)) for k, m in models.items()}
    feed: dict[str, np.ndarray] = {
        "x": rng.standard_normal((1, tokens, width)).astype(np.float32),
        "attention_mask": np.ones((1, tokens), np.int64),
    }
    timings = time_interleaved(sessions, feed, warmup=5, repeats=repeats)
    return MoeLoweringChoice(*(timings[k].median_ms * 1e3 for k in ("dense", "gather",
                                                                   "kernel")))


class KernelTimings:
    """The kernel measurements of one compile, keyed by everything they depend on.

    Pass the same object to every stage (and every round of a latency search) that asks:
    each shape is timed once. A fresh object measures again.
    """

    def __init__(self) -> None:
        self._skip: dict[tuple[int, int, int, int], KernelChoice] = {}
        self._moe: dict[tuple[int, int, int, int, str, int, int, int], MoeLoweringChoice] = {}

    def skip_layernorm(self, width: int, tokens: int, threads: int, *,
                       repeats: int = 60) -> KernelChoice:
        """Returns `skip_layernorm_costs` for this shape, measured on first request."""
        key = (width, tokens, threads, repeats)
        if key not in self._skip:
            self._skip[key] = skip_layernorm_costs(width, tokens, threads, repeats=repeats)
        return self._skip[key]

    def moe_lowering(self, width: int, ffn_width: int, experts: int, top_k: int,
                     activation: str, tokens: int, threads: int, *,
                     repeats: int = 40) -> MoeLoweringChoice:
        """Returns `moe_lowering_costs` for this shape, measured on first request."""
        key = (width, ffn_width, experts, top_k, activation, tokens, threads, repeats)
        if key not in self._moe:
            self._moe[key] = moe_lowering_costs(width, ffn_width, experts, top_k, activation,
                                                tokens, threads, repeats=repeats)
        return self._moe[key]


_ACTIVATION_NODES = {
    # Each as exporters spell it, from h (W1's output with bias) to a.
    "relu": [("Relu", ["h"], "a")],
    # torch's dynamo export of erf-GELU: h·0.5·(1 + erf(h/√2)).
    "gelu": [("Mul", ["h", "half"], "g0"), ("Div", ["h", "sqrt2"], "g1"),
             ("Erf", ["g1"], "g2"), ("Add", ["g2", "one"], "g3"), ("Mul", ["g0", "g3"], "a")],
    # gelu_new / gelu_pytorch_tanh: 0.5·h·(1 + tanh(√(2/π)·(h + 0.044715·h³))).
    "gelu_tanh": [("Pow", ["h", "three"], "t0"), ("Mul", ["t0", "cubic"], "t1"),
                  ("Add", ["h", "t1"], "t2"), ("Mul", ["t2", "sqrt_2_over_pi"], "t3"),
                  ("Tanh", ["t3"], "t4"), ("Add", ["t4", "one"], "t5"),
                  ("Mul", ["h", "t5"], "t6"), ("Mul", ["t6", "half"], "a")],
}
_ACTIVATION_CONSTS = {"half": 0.5, "one": 1.0, "sqrt2": np.sqrt(2.0), "three": 3.0,
                      "cubic": 0.044715, "sqrt_2_over_pi": np.sqrt(2.0 / np.pi)}


def standalone_ffn(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray,
                   activation: str) -> onnx.ModelProto:
    """Builds x_BSD ─ MatMul ─ Add ─ activation ─ MatMul ─ Add ─ y_BSD as one model.

    `attention_mask` [B, S] passes through to an output, so the MoE lowerings can read
    which tokens are real. `standalone_ffn_spec` describes the FFN for the passes.
    """
    d, f = w1.shape
    spelled = _ACTIVATION_NODES[activation]
    used = {name for _, inputs, _ in spelled for name in inputs}
    inits = [numpy_helper.from_array(np.asarray(a, np.float32), n)
             for a, n in [(w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2")]]
    inits += [numpy_helper.from_array(np.array(v, np.float32), n)
              for n, v in _ACTIVATION_CONSTS.items() if n in used]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h"], name="fc1_add"),
             *(helper.make_node(op, inputs, [out], name=f"act{i}")
               for i, (op, inputs, out) in enumerate(spelled)),
             helper.make_node("MatMul", ["a", "w2"], ["y0"], name="fc2"),
             helper.make_node("Add", ["y0", "b2"], ["y"], name="fc2_add"),
             helper.make_node("Identity", ["attention_mask"], ["mask_out"], name="keep_mask")]
    graph = helper.make_graph(
        nodes, "ffn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", d]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", d]),
         helper.make_tensor_value_info("mask_out", TensorProto.INT64, ["B", "S"])],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def standalone_ffn_spec(model: ir.Model, activation: str) -> FfnSpec:
    """Describes a `standalone_ffn` model's FFN (block "layer0/ffn") for the passes."""
    nodes = {n.name: n for n in model.graph}
    init = model.graph.initializers

    def linear(matmul: str, w: str, b: str) -> Linear:
        return Linear(init[w], init[b], nodes[matmul], slice(None))  # the whole width

    acts = [nodes[f"act{i}"] for i in range(len(_ACTIVATION_NODES[activation]))]
    return FfnSpec(block="layer0/ffn", x=model.graph.inputs[0], out=nodes["fc2_add"].outputs[0],
                   w1=linear("fc1", "w1", "b1"), w2=linear("fc2", "w2", "b2"),
                   activation=activation, nodes=acts)


def standalone_moe(dense: onnx.ModelProto, activation: str, layer: MoeLayer, lowering: str,
                   target: str = "ort") -> onnx.ModelProto:
    """Rewrites a `standalone_ffn` model's FFN as `layer` in one lowering."""
    model = ir.from_proto(dense)
    config = FfnToMoeConfig({0: layer}, target=target, lowering=lowering)
    rewrite_ffn(model, standalone_ffn_spec(model, activation), layer, config)
    RemoveUnusedNodesPass()(model)
    TopologicalSortPass()(model)
    return ir.to_proto(model)
