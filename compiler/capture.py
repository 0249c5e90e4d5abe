"""Captures intermediate activations through ONNX Runtime, as token rows for fitting.

Passes fit on what the model actually computes: the values they need are exposed as
extra graph outputs on a serialized copy of the model and read batch by batch (never a
second framework). Only real tokens are kept (attention_mask = 1), and a seeded
subsample bounds memory: every value gets the same rows, so an input and an output
captured together stay paired row for row.

Graph optimizations are off so every named intermediate survives to be read.

A value some exporters keep flattened to token rows (TorchScript's GPT-2 Conv1D reads
its input as Reshape(x, [-1, K]), and nothing restores [B, S, K] before the output
projection) is handed back as [B, S, W], so every reader sees one layout:

    ctx_(B·S)W ─▶ reshape to the feed's [B, S] ─▶ ctx_BSW
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

logger = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]


class ActivationReader:
    """An ORT session over a copy of `model` that also outputs `values`.

    Args:
        model: the (canonical) model; it is not changed.
        values: intermediate values to expose; each must be [B, S, W] for token rows.
        threads: intra-op threads for the session.
    """

    def __init__(self, model: ir.Model, values: Sequence[ir.Value], *, threads: int = 0):
        self.names = [_ensure_name(v, i) for i, v in enumerate(values)]
        original = list(model.graph.outputs)
        self.model_outputs = [str(v.name) for v in original]
        extra = [v for v in values if v not in original]
        # Bytes cannot reference external data files: hold the weights in memory (the model
        # is read whole for fitting anyway; models over 2 GB cannot be captured this way).
        ir.external_data.load_to_model(model)
        model.graph.outputs.extend(extra)
        try:
            data = ir.to_proto(model).SerializeToString()
        finally:
            # pop(), not `del outputs[i:]`: onnx-ir 0.1's del leaves the values flagged as
            # graph outputs, and later rewrites would then rename them as outputs.
            while len(model.graph.outputs) > len(original):
                model.graph.outputs.pop()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.main_output = main_output(self.session.get_outputs()[:len(original)])

    def run(self, feed: Feed) -> dict[str, np.ndarray]:
        """Runs one batch; returns every requested value and the model outputs by name.

        Requested values flattened to [B·S, W] token rows come back as [B, S, W].
        """
        names = list(dict.fromkeys([*self.names, *self.model_outputs]))
        arrays = self.session.run(names, {k: v for k, v in feed.items() if k in self.input_names})
        out = dict(zip(names, arrays, strict=True))
        tokens = token_shape(feed)
        if tokens is not None:
            for name in self.names:
                out[name] = unflatten_tokens(out[name], tokens)
        return out


def token_shape(feed: Feed) -> tuple[int, int] | None:
    """Returns the feed's [B, S] (from its token ids or mask), or None for other inputs."""
    for key in ("input_ids", "attention_mask"):
        array = feed.get(key)
        if array is not None and np.ndim(array) == 2:
            batch, seq = np.shape(array)
            return int(batch), int(seq)
    return None


def unflatten_tokens(array: np.ndarray, tokens: tuple[int, int]) -> np.ndarray:
    """Reshapes [B·S, W] token rows to [B, S, W]; any other array is returned as it is."""
    batch, seq = tokens
    if array.ndim == 2 and array.shape[0] == batch * seq and batch * seq > 0:
        return array.reshape(batch, seq, array.shape[1])
    return array


def main_output(outputs: Sequence[ort.NodeArg]) -> str:
    """Names the output that carries the model's result: the first float [B, S, D] one.

    Some exports put other tensors first (paraphrase-MiniLM-L3-v2's output 0 is an
    Identity of input_ids); failing a rank-3 float output, the first float one.
    """
    floats = [o for o in outputs if o.type in ("tensor(float)", "tensor(float16)",
                                               "tensor(double)", "tensor(bfloat16)")]
    hidden = [o for o in floats if o.shape is not None and len(o.shape) == 3]
    chosen = (hidden or floats or list(outputs))[:1]
    if not chosen:
        raise ValueError("the model has no outputs.")
    return str(chosen[0].name)


def capture_tokens(
    model: ir.Model,
    values: Sequence[ir.Value],
    batches: Iterable[Feed],
    *,
    max_tokens: int = 8192,
    seed: int = 0,
) -> list[np.ndarray]:
    """Returns, per value, a [N, W] float32 matrix of real-token rows from all batches.

    Rows are the same tokens for every value. When the batches hold more than
    `max_tokens` real tokens, a seeded, uniform subsample of them is kept.
    """
    reader = ActivationReader(model, values)
    rng = np.random.default_rng(seed)
    collected: list[list[np.ndarray]] = [[] for _ in values]
    seen = 0
    for feed in batches:
        outputs = reader.run(feed)
        rows = real_token_rows(feed)
        if rows is None:
            first = outputs[reader.names[0]]
            rows = np.arange(first.shape[0] * first.shape[1])
        seen += rows.size
        for i, name in enumerate(reader.names):
            array = outputs[name]
            if array.ndim != 3:
                raise ValueError(f"value {name} is not [B, S, W] (shape {array.shape})")
            collected[i].append(array.reshape(-1, array.shape[-1])[rows].astype(np.float32))
    if not collected or not collected[0]:
        raise ValueError("no calibration batches to capture from")
    total = sum(part.shape[0] for part in collected[0])
    keep = None
    if total > max_tokens:
        keep = np.sort(rng.choice(total, size=max_tokens, replace=False))
        logger.info("kept %d of %d calibration tokens", max_tokens, total)
    result = []
    for parts in collected:
        matrix = np.concatenate(parts, axis=0)
        result.append(matrix[keep] if keep is not None else matrix)
    return result


def real_token_rows(feed: Feed) -> np.ndarray | None:
    """Returns the flat [B*S] indices of non-padding tokens, or None without a mask."""
    mask = feed.get("attention_mask")
    if mask is None:
        return None
    return np.flatnonzero(np.asarray(mask).reshape(-1) != 0)


def _ensure_name(value: ir.Value, index: int) -> str:
    if not value.name:
        value.name = f"planer/capture_{index}"
    return value.name
