"""The real all-MiniLM-L6-v2 (both exporters) and the third-party paraphrase-MiniLM-L3-v2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from planer.compiler.driver.cli import main
from planer.compiler.driver.pipeline import compile_plan
from tests.conftest import run_ort, text_feeds

pytestmark = pytest.mark.slow  # every test here loads a real MiniLM


@pytest.fixture(scope="module")
def paraphrase_l3() -> Path:
    from planer.fixtures.build import paraphrase_l3_path

    return paraphrase_l3_path()


def _inspect(path: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("which", ["minilm_dynamo", "minilm_torchscript"])
def test_inspect_minilm(which: str, request: pytest.FixtureRequest,
                        capsys: pytest.CaptureFixture[str]) -> None:
    data = _inspect(request.getfixturevalue(which), capsys)
    dims = [(la["heads"], la["hidden"], la["ffn"]) for la in data["layers"]]
    assert dims == [(12, 384, 1536)] * 6
    assert {la["activation"] for la in data["layers"]} == {"gelu"}
    assert {la["norm"] for la in data["layers"]} == {"post"}
    assert data["vocab_size"] == 30522
    # 6 layers x (4·384² + 2·384·1536 weights + biases) plus embeddings and norms.
    assert 22_000_000 < data["params"] < 23_000_000


def test_exports_have_the_expected_form(minilm_dynamo: Path, minilm_torchscript: Path) -> None:
    dyn = onnx.load(str(minilm_dynamo), load_external_data=False)
    ts = onnx.load(str(minilm_torchscript), load_external_data=False)
    assert {o.version for o in dyn.opset_import if o.domain == ""} == {18}
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in dyn.graph.initializer)
    assert {o.version for o in ts.opset_import if o.domain == ""} == {17}
    dims = [d.dim_param for d in ts.graph.input[0].type.tensor_type.shape.dim]
    assert all(dims), "TorchScript export should have dynamic batch and sequence axes"


def test_inspect_third_party_paraphrase(paraphrase_l3: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    data = _inspect(paraphrase_l3, capsys)
    dims = [(la["heads"], la["hidden"], la["ffn"]) for la in data["layers"]]
    assert dims == [(12, 384, 1536)] * 3


@pytest.mark.parametrize("which", ["minilm_dynamo", "minilm_torchscript", "paraphrase_l3"])
def test_neutral_plan_reproduces_outputs(which: str, request: pytest.FixtureRequest,
                                         tmp_path: Path) -> None:
    src = request.getfixturevalue(which)
    result = compile_plan(src, tmp_path / "out", plan_data=None)
    feeds = text_feeds(batch=2, seq_len=64, vocab=30522, pad_last=20)
    expected = run_ort(src, feeds)
    actual = run_ort(result.model_path, feeds)
    for e, a in zip(expected, actual, strict=True):
        np.testing.assert_allclose(a, e, rtol=0, atol=1e-4)


def test_half_plan_halves_flops_and_runs_optimized(minilm_dynamo: Path, tmp_path: Path) -> None:
    plan = {"layers": [{"heads": 6, "ffn": 768}] * 6}
    result = compile_plan(minilm_dynamo, tmp_path / "out", plan_data=plan)
    assert result.report["flops_ratio"] == pytest.approx(0.5, abs=0.01)
    assert (tmp_path / "out" / "model.onnx.data").exists(), "external data in, external data out"
    feeds = text_feeds(batch=1, seq_len=128, vocab=30522)
    (optimized,) = run_ort(result.model_path, feeds, optimize=True)
    (plain,) = run_ort(result.model_path, feeds, optimize=False)
    np.testing.assert_allclose(optimized, plain, rtol=0, atol=1e-4)
    assert json.loads((tmp_path / "out" / "plan.json").read_text()) == plan
