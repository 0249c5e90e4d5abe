"""The ONNX Runtime side of recovery: the frozen prefix, the teacher, the equivalence check.

    feed ─ Prefix  (compiled model cut at the first layer's input) ─ entry_BSD, masks
    feed ─ Teacher (original model, layer outputs exposed)          ─ layers_L×BSD, end_BSD
    feed ─ compiled model in ORT ─ end_BSD  ==  Mirror(entry, masks) within 1e-4  (check)

Both sessions run on serialized copies of canonical models with only the values asked
for as outputs (what nothing reads is removed), so the prefix does not pay for the layers;
ORT's fusions keep every graph output, so they stay on there. The equivalence check runs
the compiled model with optimizations off (ORT's fusions could hide a wrong mirror).
Batches are computed on the fly: nothing is held for the whole corpus.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx_ir.passes.common import RemoveUnusedNodesPass

from planer.compiler.canonicalize import canonicalize
from planer.compiler.capture import main_output
from planer.compiler.errors import UnsupportedModelError
from planer.recovery.structure import Stream, read_stream

Feed = Mapping[str, np.ndarray]


def canonical_copy(model: ir.Model) -> ir.Model:
    """Returns a canonical copy of `model` (planer's ORT spellings read back as standard ONNX).

    Initializer names survive canonicalization, so weights trained on the copy are written
    back into `model` by name.
    """
    ir.external_data.load_to_model(model)
    copy = ir.from_proto(ir.to_proto(model))
    canonicalize(copy)
    return copy


def session_for(model: ir.Model, outputs: Sequence[str], *, threads: int = 1,
                optimize: bool = True) -> ort.InferenceSession:
    """Returns an ORT session over a copy of `model` whose outputs are exactly `outputs`.

    With `optimize`, ORT's graph optimizations are on: the teacher and the prefix are
    frozen, only their named outputs are read (fusions keep every graph output), and the
    teacher's forward pass is a large share of a training step.
    """
    ir.external_data.load_to_model(model)  # bytes cannot point at external data files
    copy = ir.from_proto(ir.to_proto(model))
    values = {str(v.name): v for v in copy.graph.inputs}
    values.update({str(v.name): v for node in copy.graph for v in node.outputs})
    missing = [name for name in outputs if name not in values]
    if missing:
        raise UnsupportedModelError(f"the model has no value named {missing[0]!r}.")
    copy.graph.outputs.clear()
    copy.graph.outputs.extend(values[name] for name in dict.fromkeys(outputs))
    RemoveUnusedNodesPass()(copy)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize \
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    data = ir.to_proto(copy).SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, names: Sequence[str], feed: Feed) -> list[np.ndarray]:
    wanted = {i.name for i in session.get_inputs()}
    return session.run(list(names), {k: v for k, v in feed.items() if k in wanted})


class Prefix:
    """Computes the stream's entry and aux values (embeddings, masks) of a compiled model."""

    def __init__(self, canonical: ir.Model, stream: Stream, *, threads: int = 1):
        self.entry = str(stream.entry.name)
        self.aux = [str(v.name) for v in stream.aux]
        self.session = session_for(canonical, [self.entry, *self.aux], threads=threads)

    def run(self, feed: Feed) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Returns (entry [B, S, D], aux values by name) for one batch."""
        arrays = _run(self.session, [self.entry, *self.aux], feed)
        return arrays[0], dict(zip(self.aux, arrays[1:], strict=True))


@dataclasses.dataclass
class TeacherOutput:
    """The original model's layer outputs (same depth as the student's) and its end value."""

    layers: list[np.ndarray]
    end: np.ndarray


class Teacher:
    """The original model in ORT, with each layer's output exposed."""

    def __init__(self, original: ir.Model, *, threads: int = 1):
        self.stream = read_stream(original)
        self.layers = [str(v.name) for v in self.stream.layer_outputs or []]
        self.end = str(self.stream.end.name)
        self.session = session_for(original, [*self.layers, self.end], threads=threads)
        self.names = list(dict.fromkeys([*self.layers, self.end]))

    def run(self, feed: Feed) -> TeacherOutput:
        arrays = dict(zip(self.names, _run(self.session, self.names, feed), strict=True))
        return TeacherOutput([arrays[n] for n in self.layers], arrays[self.end])


def compiled_session(model: ir.Model, *, threads: int = 1) -> tuple[ort.InferenceSession, str]:
    """Returns an ORT session of `model` as it will ship, and its hidden-state output name."""
    ir.external_data.load_to_model(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session, main_output(session.get_outputs())
