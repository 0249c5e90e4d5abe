"""`--passes moe --target-flops R`: the greedy MoE choice honours the ratio R.

It used to compare the model's absolute FLOPs with R, so every R took every move and
gave the same plan; these tests fail on that behaviour.
"""

from __future__ import annotations

import numpy as np
import pytest

from planer.compiler.calibration import build_calibration, model_input_infos
from planer.compiler.driver.pipeline import read_model
from planer.compiler.plan import MoePlan
from planer.compiler.spec import ModelSpec, model_flops
from planer.passes.moe_fit import FittedLayer, choose_moe_plans, fit_layers, moe_ffn_flops
from tests.test_moe import _fixture, _plant_sparse_relu

BATCH, SEQ = 1, 128


@pytest.fixture(scope="module")
def fitted() -> tuple[ModelSpec, dict[int, FittedLayer]]:
    model, spec = read_model(_fixture("bert-relu"))
    _plant_sparse_relu(model, spec)
    calib = build_calibration(None, model_input_infos(model), vocab_size=1000, seq_len=32,
                              max_samples=96, seed=0)
    return spec, fit_layers(model, spec, calib, {0: 8, 1: 8}, steps=200)


def _flops(spec: ModelSpec, plans: dict[int, MoePlan],
           fits: dict[int, FittedLayer]) -> float:
    """The model's FLOPs with `plans` applied, counted independently of choose_moe_plans."""
    total = float(model_flops(spec, batch=BATCH, seq_len=SEQ))
    for index, plan in plans.items():
        width, tokens = spec.layers[index].ffn.width, BATCH * SEQ
        per_token = fits[index].quality(plan).experts_per_token
        total -= 2 * tokens * spec.hidden * width * 2
        total += moe_ffn_flops(width, spec.hidden, plan, per_token, 16, tokens)
    return total


def test_target_ratio_is_honoured(fitted: tuple[ModelSpec, dict[int, FittedLayer]]) -> None:
    spec, fits = fitted
    dense = float(model_flops(spec, batch=BATCH, seq_len=SEQ))
    floor = _flops(spec, choose_moe_plans(spec, fits, target_flops=0.0, batch=BATCH,
                                          seq_len=SEQ, max_error=0.5)[0], fits)
    reachable = floor / dense
    assert reachable < 0.95  # the planted layers do reach below these targets
    chosen = {}
    for ratio in (1.0, 0.98, (1.0 + reachable) / 2, reachable):
        plans, _ = choose_moe_plans(spec, fits, target_flops=ratio, batch=BATCH, seq_len=SEQ,
                                    max_error=0.5)
        assert _flops(spec, plans, fits) <= ratio * dense * (1 + 1e-9), ratio
        chosen[ratio] = plans
    assert chosen[1.0] == {}  # the dense model already meets R = 1
    assert chosen[0.98] != chosen[reachable]  # different R, different plans
    assert len({tuple(sorted(p.items())) for p in chosen.values()}) >= 3


def test_target_ratio_out_of_range_is_refused(
        fitted: tuple[ModelSpec, dict[int, FittedLayer]]) -> None:
    spec, fits = fitted
    with pytest.raises(ValueError, match="ratio"):
        choose_moe_plans(spec, fits, target_flops=float(np.float64(2.5e8)))
