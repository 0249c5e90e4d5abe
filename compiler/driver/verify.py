"""Measures a written model against the original before it is committed to OUT.

Random inputs first (every output, ORT optimizations off, so its fusions cannot hide a
bad rewrite), then the held-out calibration share (fidelity: cosine per token and of
mean-pooled sequences, top-1 agreement for logits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from planer.compiler.capture import main_output


def compare_outputs(original: Path, compiled: Path, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """Runs both models on `feeds` in ORT (optimizations off) and compares every output."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    results = []
    for path in (original, compiled):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        results.append(session.run(None, feeds))
    max_abs, cosines = 0.0, []
    for a, b in zip(*results, strict=True):
        a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        max_abs = max(max_abs, float(np.max(np.abs(a64 - b64))) if a64.size else 0.0)
        denom = np.linalg.norm(a64) * np.linalg.norm(b64)
        cosines.append(float(a64 @ b64 / denom) if denom else 1.0)
    return {"inputs": "random", "max_abs_diff": max_abs, "min_cosine": min(cosines)}


def fidelity(
    original: Path, compiled: Path, batches: list[dict[str, np.ndarray]]
) -> dict[str, Any]:
    """Compares the compiled model's outputs with the original's on held-out batches.

    Hidden-state outputs [B, S, D]: cosine per real token and of mean-pooled sequences.
    Logit outputs [B, C]: cosine per row and top-1 agreement. Means and 5th percentiles.
    """
    options = ort.SessionOptions()
    sessions = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                for p in (original, compiled)]
    names = {i.name for i in sessions[0].get_inputs()}
    result_name = main_output(sessions[0].get_outputs())
    token_cos, pooled_cos, agree = [], [], []
    for feed in batches:
        feed = {k: v for k, v in feed.items() if k in names}
        a, b = (s.run([result_name], feed)[0].astype(np.float64) for s in sessions)
        if a.ndim == 3:
            mask = feed.get("attention_mask", np.ones(a.shape[:2])).astype(bool)
            token_cos.extend(_cos(a[mask], b[mask]))
            weights = mask[..., None].astype(np.float64)
            pooled_cos.extend(_cos((a * weights).sum(1), (b * weights).sum(1)))
        else:
            pooled_cos.extend(_cos(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)))
            if a.ndim == 2:
                agree.extend((a.argmax(-1) == b.argmax(-1)).tolist())
    result: dict[str, Any] = {"holdout_samples": sum(len(next(iter(f.values()))) for f in batches)}
    for key, values in (("token_cosine", token_cos), ("pooled_cosine", pooled_cos)):
        if values:
            result[key] = {"mean": round(float(np.mean(values)), 5),
                           "p5": round(float(np.percentile(values, 5)), 5)}
    if agree:
        result["top1_agreement"] = round(float(np.mean(agree)), 5)
    return result


def _cos(a: np.ndarray, b: np.ndarray) -> list[float]:
    num = np.sum(a * b, axis=-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (num / np.where(den == 0, 1.0, den)).tolist()
