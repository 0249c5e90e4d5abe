"""Predicts a model's latency from its plan, learned from block measurements on the target.

    latency(plan) = overhead + Σ_layers [ attn(heads_l) + ffn(channels_l) ]

A layer whose plan quantizes a block to INT8 reads that block's INT8 curve instead
(`attn_int8_dynamic(heads_l)`, `ffn_int8_static(channels_l)`, ...; profile_int8
measures them beside the float blocks), so one model predicts plans that mix pruning
and INT8 per layer.

Each block curve is a piecewise-linear interpolation through the measured unit counts
(Kwon et al. fit per-layer latency the same way): GEMM efficiency changes with width,
so a single slope would mispredict narrow blocks. `overhead` (embeddings, LayerNorms,
residual adds, output) is the measured dense model minus its predicted blocks.
`held_out_error` refits on every other measured point and scores the rest: that MAPE
is what `planer profile --report` prints for block configurations.

Stored curves are reused across compiles, but a shared machine's speed moves by tens
of percent between minutes, so their absolute milliseconds are stale by the time a
compile reads them (two 33% targets met at 0.27 of the original, over-pruned), and a
block alone runs at another speed than inside the compiled graph (fusions, the GELU the
ORT-kernels stage emits, cache traffic between blocks). `anchor` keeps only the curves'
shapes and re-anchors them on whole plans compiled as every plan will be and timed at
compile start, interleaved with the original:

    anchors (every layer alike)            fit by least squares
    12/1536, 3/1536, 12/384 float     ─▶   ms(plan) = overhead
    the same three with INT8 blocks              + Σ_kinds scale_k · curves_k(plan)

The anchors change one block kind's units at a time, so the scales separate attention
from FFN and float from INT8, and the overhead is what stays when blocks shrink (a block
that is present costs more than its isolated curve's share; the floor plan with every
block removed runs faster than this overhead, so it is not an anchor).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from planer.compiler.plan import Int8Plan, LayerPlan, Plan
from planer.cost_model.profile import Measurement
from planer.cost_model.profile_int8 import int8_kind


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

    def scaled(self, factor: float) -> BlockCurve:
        """The same curve with every latency multiplied by `factor`."""
        return BlockCurve(self.units, tuple(ms * factor for ms in self.ms))

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
    """Whole-model latency as fixed overhead plus per-layer block curves.

    `int8` holds the INT8 curves by store kind (`attn_int8_dynamic`, ...); a plan that
    quantizes a block whose curve is missing cannot be predicted (ValueError).
    """

    attn: BlockCurve
    ffn: BlockCurve
    overhead_ms: float
    int8: Mapping[str, BlockCurve] = dataclasses.field(default_factory=dict)
    scales: Mapping[str, float] = dataclasses.field(default_factory=dict)  # set by `anchor`

    def layer_ms(self, heads: int, channels: int, int8: Int8Plan | None = None) -> float:
        """Predicts one layer: attention at `heads`, FFN at `channels`, INT8 where asked."""
        return sum(ms for _, ms in self._layer_parts(LayerPlan(heads, channels, int8=int8)))

    def predict(self, plan: Plan) -> float:
        """Predicts the median latency (ms) of a model compiled to `plan`."""
        return self.overhead_ms + sum(self.breakdown(plan).values())

    def blocks_ms(self, plan: Plan) -> float:
        """Predicts the plan's blocks alone (the prediction less the overhead)."""
        return self.predict(plan) - self.overhead_ms

    def breakdown(self, plan: Plan) -> dict[str, float]:
        """Predicts each curve's share of the plan, summed over layers.

        Returns:
            curve kind (`attn`, `ffn`, `attn_int8_dynamic`, ...) -> ms.
        """
        parts: dict[str, float] = {}
        for layer in plan.layers:
            for kind, ms in self._layer_parts(layer):
                parts[kind] = parts.get(kind, 0.0) + ms
        return parts

    def _layer_parts(self, layer: LayerPlan) -> list[tuple[str, float]]:
        parts = []
        for block, units in (("attn", layer.heads), ("ffn", layer.ffn)):
            if layer.int8 is not None and block in layer.int8.kinds():
                kind = int8_kind(block, layer.int8.mode)
                parts.append((kind, self._int8(block, layer.int8.mode)(units)))
            else:
                parts.append((block, (self.attn if block == "attn" else self.ffn)(units)))
        return parts

    def _int8(self, kind: str, mode: str) -> BlockCurve:
        curve = self.int8.get(int8_kind(kind, mode))
        if curve is None:
            raise ValueError(f"the latency model has no {mode} INT8 {kind} measurements; "
                             f"profile them first (cost_model.profile_int8)")
        return curve


def fit_latency_model(
    attn: Sequence[Measurement], ffn: Sequence[Measurement], dense_ms: float, dense: Plan,
    int8: Mapping[str, Sequence[Measurement]] | None = None,
) -> LatencyModel:
    """Fits the block curves and the overhead that makes the dense prediction exact.

    Args:
        attn: float attention measurements by head count.
        ffn: float FFN measurements by width.
        dense_ms: the measured latency of `dense` compiled (the neutral plan).
        dense: the plan `dense_ms` belongs to; its prediction sets the overhead.
        int8: INT8 measurements by store kind (profile_int8.profile_int8_blocks).
    """
    curves = {kind: BlockCurve.fit(points) for kind, points in (int8 or {}).items()}
    model = LatencyModel(BlockCurve.fit(attn), BlockCurve.fit(ffn), 0.0, curves)
    overhead = dense_ms - model.predict(dense)
    return dataclasses.replace(model, overhead_ms=max(overhead, 0.0))


def anchor(model: LatencyModel, anchors: Sequence[tuple[Plan, float]]) -> LatencyModel:
    """Re-anchors the stored curves on whole models timed now (see the module docstring).

    Fits, by least squares over the anchor plans, the overhead and one scale per curve
    kind they use: ms(plan) = overhead + Σ_kinds scale_k · curves_k(plan) (an overhead
    fitted below 0 is refitted at 0). Curves no anchor uses take the median scale.
    Returns `model` unchanged when a scale comes out at or below 0 (a tiny model lost in
    timing noise).

    Args:
        model: the stored curves (fit_latency_model).
        anchors: (plan, measured ms) pairs, each kind at two unit counts at least
            (`compiler.driver.latency.anchor_plans`).
    """
    parts = [model.breakdown(plan) for plan, _ in anchors]
    kinds = sorted({k for part in parts for k, ms in part.items() if ms > 0})
    if not kinds:
        return model
    matrix = np.array([[1.0, *(part.get(k, 0.0) for k in kinds)] for part in parts])
    measured = np.array([ms for _, ms in anchors])
    solved = np.linalg.lstsq(matrix, measured, rcond=None)[0]
    if solved[0] < 0:  # the overhead is an extrapolation: noise can push it below 0
        solved = np.concatenate([[0.0], np.linalg.lstsq(matrix[:, 1:], measured,
                                                        rcond=None)[0]])
    overhead, factors = float(solved[0]), solved[1:]
    if not np.all(np.isfinite(solved)) or np.any(factors <= 0):
        return model
    scales = dict(zip(kinds, (float(x) for x in factors), strict=True))
    rest = float(np.median(factors))
    int8 = {k: curve.scaled(scales.get(k, rest)) for k, curve in model.int8.items()}
    return LatencyModel(model.attn.scaled(scales.get("attn", rest)),
                        model.ffn.scaled(scales.get("ffn", rest)), overhead, int8,
                        scales=scales)


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
