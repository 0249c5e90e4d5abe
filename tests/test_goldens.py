"""Golden structure of each rewrite's emitted graph: MoE (every lowering), skim, ORT kernels.

Each test runs one pass on a tiny random-weight fixture and compares the printed graph
(tests/goldens.structure: nodes, names, wiring, provenance; no weights) with a file
under tests/golden/. A change to what a pass emits shows up as a reviewable diff;
`pytest --update-goldens` rewrites the files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from planer.compiler.driver.pipeline import read_canonical, read_model
from planer.fixtures.build import fixture_path
from planer.passes.ffn_to_moe import FfnToMoeConfig, MoeLayer, apply_ffn_to_moe
from planer.passes.moe_fit import Router, cluster_experts
from planer.passes.ort_kernels import OrtKernelsConfig, apply_ort_kernels
from planer.passes.token_skim import TokenSkimConfig, apply_token_skim
from tests.goldens import check_golden, structure

Golden = Callable[[str, str], None]


def _router(d: int, e: int, hidden: int = 16) -> Router:
    rng = np.random.default_rng(0)
    return Router(rng.standard_normal((d, hidden)).astype(np.float32),
                  rng.standard_normal(hidden).astype(np.float32),
                  rng.standard_normal((hidden, e)).astype(np.float32),
                  rng.standard_normal(e).astype(np.float32))


@pytest.mark.parametrize("lowering", ["gather", "scatter", "kernel", "tensorrt"])
def test_moe_lowering_golden(lowering: str, golden: Golden) -> None:
    model, spec = read_model(fixture_path("bert-relu", "dynamo"))
    ffn = spec.layers[0].ffn
    layer = MoeLayer(cluster_experts(ffn.w1.w(), 4, seed=0), _router(spec.hidden, 4),
                     top_k=2, capacity=8)
    config = FfnToMoeConfig({0: layer}, target="tensorrt") if lowering == "tensorrt" else \
        FfnToMoeConfig({0: layer}, target="ort", lowering=lowering)
    assert apply_ffn_to_moe(model, spec, config) == 1
    golden(f"moe_{lowering}_bert_relu.txt", structure(model))


@pytest.mark.parametrize("lowering", ["ort", "tensorrt"])
def test_token_skim_lowering_golden(lowering: str, golden: Golden) -> None:
    model, spec = read_canonical(fixture_path("bert", "dynamo"))
    assert apply_token_skim(model, spec, TokenSkimConfig(keep={1: 0.5}, lowering=lowering)) == 1
    golden(f"skim_{lowering}_bert.txt", structure(model))


def test_ort_kernels_golden(golden: Golden) -> None:
    model, _ = read_canonical(fixture_path("bert", "dynamo"))
    assert apply_ort_kernels(model, OrtKernelsConfig()) == {"residual_sum": 4, "gelu": 2}
    golden("ort_kernels_bert.txt", structure(model))


def test_a_missing_golden_fails_and_is_not_written(tmp_path: Path) -> None:
    path = tmp_path / "absent.txt"
    with pytest.raises(pytest.fail.Exception, match="--update-goldens"):
        check_golden(path, "graph\n", update=False)
    assert not path.exists()
    check_golden(path, "graph\n", update=True)
    assert path.read_text() == "graph\n"
    with pytest.raises(AssertionError, match="differs"):
        check_golden(path, "other graph\n", update=False)
