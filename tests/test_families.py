"""Every fixture family, both exporters: the finder reads it right and the neutral plan is exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from planer.compiler.driver.cli import main
from planer.compiler.driver.pipeline import compile_plan
from planer.fixtures.build import example_inputs, fixture_meta, fixture_path
from tests.conftest import run_ort

READABLE = ["bert", "bert-relu", "bert-gelu-tanh", "roberta", "xlm-roberta", "distilbert",
            "electra", "vit", "gpt2", "albert"]
EXPORTERS = ["dynamo", "torchscript"]
ACTIVATION = {"gelu": "gelu", "gelu_new": "gelu_tanh", "relu": "relu"}
PRE_LN = {"vit", "gpt2"}


def _feeds(family: str, *, batch: int, seq: int) -> dict[str, np.ndarray]:
    feeds = example_inputs(family, batch=batch, seq=seq, seed=3)
    if "attention_mask" in feeds:
        feeds["attention_mask"][-1, seq // 2:] = 0  # padding in the last row
    return feeds


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("family", READABLE)
def test_inspect_matches_config(family: str, exporter: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    config = fixture_meta(family, exporter)["config"]
    assert main(["inspect", str(fixture_path(family, exporter)), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(la["heads"], la["hidden"], la["ffn"], la["head_size"]) for la in data["layers"]] == [
        (config["heads"], config["hidden"], config["ffn"], config["head_size"])
    ] * config["layers"]
    assert {la["activation"] for la in data["layers"]} == {ACTIVATION[config["activation"]]}
    assert {la["norm"] for la in data["layers"]} == {"pre" if family in PRE_LN else "post"}
    assert data["kind"] == ("decoder" if family == "gpt2" else "encoder")
    assert data["shared_weights"] == (family == "albert" and exporter == "torchscript")


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("family", READABLE)
def test_neutral_plan_is_exact(family: str, exporter: str, tmp_path: Path) -> None:
    src = fixture_path(family, exporter)
    # ort_kernels "on": the rewrite is checked whichever LayerNorm form times faster here.
    result = compile_plan(src, tmp_path / "out", plan_data=None, ort_kernels="on")
    seq = 17 if family == "vit" else 64  # ViT's sequence is its 16 patches + [CLS]
    feeds = _feeds(family, batch=2, seq=seq)
    for expected, actual in zip(run_ort(src, feeds), run_ort(result.model_path, feeds),
                                strict=True):
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("family", READABLE)
def test_reduced_plan_runs_and_drops_work(family: str, exporter: str, tmp_path: Path) -> None:
    plan = {"layers": [{"heads": 2, "ffn": 64}, {"heads": 0, "ffn": 0}]}
    result = compile_plan(fixture_path(family, exporter), tmp_path / "out", plan_data=plan)
    assert result.report["flops_ratio"] < 0.4
    (out,) = run_ort(result.model_path, _feeds(family, batch=2, seq=17), optimize=True)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_deberta_is_rejected_by_name(exporter: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["compile", str(fixture_path("deberta", exporter)), "-o", str(tmp_path / "o")])
    assert code == 2
    assert "DeBERTa-style relative-position attention" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
