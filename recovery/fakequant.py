"""Simulated dynamic INT8 in the mirror, so recovery trains against the error INT8 adds.

The quantize stage runs after recovery (it reads float weights), and the blocks the plan
marks int8 then run as ORT's dynamic quantization computes them:

    x ─ DynamicQuantizeLinear (uint8, per tensor, this batch's range, 0 in it) ─┐
    W ─ int8 symmetric per tensor, scale max|W|/127 (quantize_dynamic) ─────────┴─ MatMulInteger
                                                                         ─ ×scales (+ b)

Without simulation, recovery minimises the float model's error and INT8 adds its own on
top, unseen. Here every int8-planned projection rounds its input and weight the same way
in the forward pass, with straight-through gradients (torch's fake-quantize ops pass the
gradient through inside the range), so the trained float weights are the ones that
quantize well. It is on while training and while measuring held-out fidelity (which
then tracks the deployed INT8 model) and off where the mirror is compared with the
float graph (`Student.check`).

The weights come from passes.quantize.dynamic_int8_weights (resolved as the quantize
stage resolves them). Only dynamic mode is simulated; static QDQ blocks (per-channel
weights, calibrated activation ranges fixed after recovery) train in float.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

W_LEVELS = 127.0  # int8 symmetric range [-127, 127]
X_LEVELS = 255.0  # uint8 [0, 255]


def dynamic_int8(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns `x` and `w` rounded as ORT's dynamic MatMulInteger path rounds them."""
    with torch.no_grad():
        lo = torch.clamp(x.min(), max=0.0)
        hi = torch.clamp(x.max(), min=0.0)
        x_scale = torch.clamp((hi - lo) / X_LEVELS, min=torch.finfo(torch.float32).tiny)
        zero = torch.clamp(torch.round(-lo / x_scale), 0, X_LEVELS).to(torch.int32)
        w_scale = torch.clamp(w.abs().max() / W_LEVELS, min=torch.finfo(torch.float32).tiny)
    xq = torch.fake_quantize_per_tensor_affine(x, x_scale.reshape(1), zero.reshape(1), 0, 255)
    wq = torch.fake_quantize_per_tensor_affine(
        w, w_scale.reshape(1), torch.zeros(1, dtype=torch.int32), -127, 127)
    return xq, wq


class Simulation:
    """Which weights the mirror rounds (by initializer name), and whether it does now."""

    def __init__(self, weights: set[str] | frozenset[str] = frozenset()):
        self.weights = frozenset(weights)
        self.on = bool(self.weights)

    def applies(self, weight: str) -> bool:
        return self.on and weight in self.weights

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        """Runs the block with simulation off (the float graph, as emitted before INT8)."""
        was, self.on = self.on, False
        try:
            yield
        finally:
            self.on = was
