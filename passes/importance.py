"""Scores heads and FFN channels for pruning.

Weight magnitude is the data-free fallback: a head's V and O weights (what it can write
into the residual stream) and a channel's W1 column and W2 row
(and gate column, in a gated FFN). Calibrated, label-free
importance (`passes.prune_fit.importance`, from captured activations) is preferred when
calibration data exists.
"""

from __future__ import annotations

import numpy as np

from planer.compiler.spec import AttentionSpec, FfnSpec


def magnitude_head_scores(attn: AttentionSpec) -> np.ndarray:
    """Returns one score per head: ‖W_V,h‖·‖W_O,h‖ (Frobenius), higher is more important."""
    d = attn.head_size
    wv, wo = attn.v.w(), attn.o.w()
    return np.array([
        np.linalg.norm(wv[:, h * d:(h + 1) * d]) * np.linalg.norm(wo[h * d:(h + 1) * d, :])
        for h in range(attn.heads)
    ])


def magnitude_channel_scores(ffn: FfnSpec) -> np.ndarray:
    """Returns one score per channel: ‖w1[:, j]‖·‖w2[j, :]‖, higher is more important.

    A gated FFN's channel also scales with its gate column: ‖gate[:, j]‖·‖w1[:, j]‖·‖w2[j, :]‖.
    """
    scores = np.linalg.norm(ffn.w1.w(), axis=0) * np.linalg.norm(ffn.w2.w(), axis=1)
    if ffn.gate is not None:
        scores = scores * np.linalg.norm(ffn.gate.w(), axis=0)
    return scores


def top_indices(scores: np.ndarray, count: int) -> tuple[int, ...]:
    """Returns the sorted indices of the `count` highest scores (ties broken by index)."""
    order = np.lexsort((np.arange(scores.size), -scores))
    return tuple(sorted(int(i) for i in order[:count]))
