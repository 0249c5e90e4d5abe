"""Predicts a model's latency from its plan, learned from block measurements on the target.

    latency(plan) = overhead + Σ_layers [ attn(heads_l) + ffn(channels_l) ]

Each block curve is a piecewise-linear interpolation through the measured unit counts
(Kwon et al. fit per-layer latency the same way): GEMM efficiency changes with width,
so a single slope would mispredict narrow blocks. `overhead` (embeddings, LayerNorms,
residual adds, output) is the measured dense model minus its predicted blocks.
`held_out_error` refits on every other measured point and scores the rest: that MAPE
is what `planer profile --report` prints for block configurations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from planer.compiler.plan import Plan
from planer.cost_model.profile import Measurement


@dataclasses.dataclass(frozen=True)
class BlockCurve:
    """Latency of one block kind against its unit count (0 units = dropped = 0 ms)."""

    units: tuple[int, ...]
    ms: tuple[float, ...]

    @staticmethod
    def fit(measurements: Sequence[Measurement]) -> BlockCurve:
        points = sorted({m.units: m.median_ms for m in measurements}.items())
        if not points or points[0][0] != 0:
            points.insert(0, (0, 0.0))
        return BlockCurve(tuple(u for u, _ in points), tuple(ms for _, ms in points))

    def __call__(self, units: float) -> float:
        if units <= 0:
            return 0.0
        xs, ys = np.asarray(self.units, float), np.asarray(self.ms, float)
        if units > xs[-1]:  # extrapolate along the last segment
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else 0.0
            return float(ys[-1] + slope * (units - xs[-1]))
        return float(np.interp(units, xs, ys))


@dataclasses.dataclass(frozen=True)
class LatencyModel:
    """Whole-model latency as fixed overhead plus per-layer block curves."""

    attn: BlockCurve
    ffn: BlockCurve
    overhead_ms: float

    def layer_ms(self, heads: int, channels: int) -> float:
        return self.attn(heads) + self.ffn(channels)

    def predict(self, plan: Plan) -> float:
        """Predicts the median latency (ms) of a model compiled to `plan`."""
        return self.overhead_ms + sum(self.layer_ms(la.heads, la.ffn) for la in plan.layers)


def fit_latency_model(
    attn: Sequence[Measurement], ffn: Sequence[Measurement], dense_ms: float, dense: Plan
) -> LatencyModel:
    """Fits the block curves and the overhead that makes the dense prediction exact."""
    model = LatencyModel(BlockCurve.fit(attn), BlockCurve.fit(ffn), 0.0)
    overhead = dense_ms - model.predict(dense)
    return dataclasses.replace(model, overhead_ms=max(overhead, 0.0))


def held_out_error(measurements: Sequence[Measurement]) -> float:
    """Returns the MAPE of a curve fit on even-indexed points, scored on the odd ones."""
    points = sorted((m for m in measurements if m.units > 0), key=lambda m: m.units)
    train = points[::2]
    test = points[1::2]
    if len(train) < 2 or not test:
        return float("nan")
    # Keep the largest point in the fit so the test points lie inside its range.
    if points[-1] not in train:
        train.append(points[-1])
        test = [m for m in test if m is not points[-1]]
    curve = BlockCurve.fit(train)
    errors = [abs(curve(m.units) - m.median_ms) / m.median_ms for m in test if m.median_ms > 0]
    return float(np.mean(errors)) if errors else float("nan")
