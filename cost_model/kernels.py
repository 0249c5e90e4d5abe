"""Measures ORT kernel choices that decide how planer spells a graph (passes.ort_kernels).

`skip_layernorm_costs` times residual Add + LayerNormalization two ways in one process,
interleaved: as ORT fuses it (SkipLayerNormalization) and kept apart (the Add spelled as
Sum, which ORT's fusion does not match). Results are cached per process and shape.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from planer.cost_model.timing import SessionOptions, make_session, time_interleaved


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


@functools.cache
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
