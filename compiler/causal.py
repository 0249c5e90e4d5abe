"""Tells a decoder from an encoder by what its attention lets a position see.

A model is causal when changing the last token leaves every earlier position's output
unchanged. That is the definition, and it is checked as such: the graph is run twice in
ONNX Runtime on 8 random tokens that differ only in the last one. Reading the mask
plumbing instead would have to know every exporter's spelling of it (recent transformers
build even an encoder's padding mask from position comparisons, as a causal mask is).

Only models fed `input_ids` are probed; others (ViT's `pixel_values`) get None.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from planer.compiler.calibration import model_input_infos, random_feeds
from planer.compiler.capture import main_output
from planer.compiler.spec import ModelSpec

logger = logging.getLogger(__name__)

PROBE_TOKENS = 8
_TOLERANCE = 1e-5  # relative to the output's scale; a leak moves earlier rows far more


def probe_causal(path: Path, model: ir.Model, spec: ModelSpec) -> bool | None:
    """Returns whether the model at `path` is causal; None when it cannot be probed."""
    infos = model_input_infos(model)
    if "input_ids" not in {i.name for i in infos}:
        return None
    try:
        feeds = random_feeds(infos, batch=1, seq_len=PROBE_TOKENS,
                             vocab_size=spec.vocab_size, seed=0)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = main_output(session.get_outputs())
        before = session.run([name], feeds)[0]
        changed = dict(feeds)
        ids = feeds["input_ids"].copy()
        other = [t for t in ids[0, :-1] if t != ids[0, -1]]  # another real token of the draw
        if not other:
            return None
        ids[:, -1] = other[0]
        changed["input_ids"] = ids
        after = session.run([name], changed)[0]
    except Exception as error:  # noqa: BLE001 (a probe that cannot run says nothing)
        logger.info("causal probe skipped: %s", error)
        return None
    if before.ndim < 2 or before.shape[1] != PROBE_TOKENS:
        return None  # pooled or per-sequence output: positions cannot be compared
    early = np.abs(after[:, :-1] - before[:, :-1]).max()
    scale = max(float(np.abs(before).max()), 1e-12)
    return bool(early <= _TOLERANCE * scale)


def mark_causal(path: Path, model: ir.Model, spec: ModelSpec) -> None:
    """Sets `spec.causal` by the probe and, when it answers, `spec.kind` from it.

    The finder's guess (fused QKV means decoder) misses decoders with separate projections.
    """
    spec.causal = probe_causal(path, model, spec)
    if spec.causal is not None:
        spec.kind = "decoder" if spec.causal else "encoder"
