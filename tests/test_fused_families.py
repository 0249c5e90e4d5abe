"""Every fixture family as ORT's transformer optimizer writes it, and BERTs in ORT's attention
kernels: inspect reads the true sizes, the neutral plan is exact, a 50% FLOPs compile verifies.

planer reads these through compiler.support.prepare (expand the fused kernels, fold
weight-only quantization) before canonicalizing; the tests call it explicitly.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from planer.compiler.driver.cli import main
from planer.compiler.driver.pipeline import compile_plan
from planer.compiler.loading import load_model
from planer.compiler.support import prepare
from planer.fixtures.build import example_inputs, fixture_meta
from planer.fixtures.fused import fused_bert_path, optimized_path
from tests.conftest import run_ort
from tests.test_families import ACTIVATION, EXPORTERS, PRE_LN, READABLE

MS = "com.microsoft"
FAST_HALF = {("bert", "torchscript"), ("gpt2", "dynamo"), ("distilbert", "dynamo"),
             ("vit", "torchscript")}


def prepared(src: Path, folder: Path) -> Path:
    """Writes `src` as planer reads it (fused kernels spelled out) to `folder`."""
    model = load_model(src)
    counts = prepare(model)
    assert counts["expanded_ops"] > 0
    folder.mkdir(parents=True, exist_ok=True)
    ir.save(model, str(folder / "model.onnx"))
    return folder / "model.onnx"


def _feeds(family: str, *, seq: int = 40) -> dict[str, np.ndarray]:
    feeds = example_inputs(family, batch=2, seq=17 if family == "vit" else seq, seed=3)
    if "attention_mask" in feeds:
        feeds["attention_mask"][-1, seq - 10:] = 0  # right padding in the last row
    return feeds


def _inspect(path: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _assert_neutral_exact(src: Path, path: Path, family: str, tmp_path: Path) -> None:
    result = compile_plan(path, tmp_path / "neutral", ort_kernels="on")
    feeds = _feeds(family)
    for want, got in zip(run_ort(src, feeds), run_ort(result.model_path, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def _assert_half_flops_verifies(path: Path, family: str, tmp_path: Path) -> None:
    result = compile_plan(path, tmp_path / "half", target_flops=0.5)
    report = result.report
    assert report["flops_ratio"] <= 0.5
    assert report["verification"]["min_cosine"] > 0.5  # written only after ORT ran it
    (out,) = run_ort(result.model_path, _feeds(family), optimize=True)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("family", READABLE)
def test_optimized_family_reads_true_sizes_and_neutral_is_exact(
        family: str, exporter: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = optimized_path(family, exporter)
    fused = {n.op_type for n in onnx.load(str(src)).graph.node if n.domain == MS}
    assert "SkipLayerNormalization" in fused
    path = prepared(src, tmp_path / "read")
    config = fixture_meta(family, exporter)["config"]
    data = _inspect(path, capsys)
    assert [(la["heads"], la["hidden"], la["ffn"], la["head_size"]) for la in data["layers"]] == [
        (config["heads"], config["hidden"], config["ffn"], config["head_size"])
    ] * config["layers"]
    assert {la["activation"] for la in data["layers"]} == {ACTIVATION[config["activation"]]}
    assert {la["norm"] for la in data["layers"]} == {"pre" if family in PRE_LN else "post"}
    assert data["supported"] is True and all(la["supported"] for la in data["layers"])
    _assert_neutral_exact(src, path, family, tmp_path)


# Four families run in the fast suite; the rest of the matrix is marked slow.
HALF_CASES = [pytest.param(f, e, marks=() if (f, e) in FAST_HALF else pytest.mark.slow)
              for f in READABLE for e in EXPORTERS]


@pytest.mark.parametrize(("family", "exporter"), HALF_CASES)
def test_optimized_family_half_flops_compile_verifies(family: str, exporter: str,
                                                     tmp_path: Path) -> None:
    _assert_half_flops_verifies(prepared(optimized_path(family, exporter), tmp_path / "read"),
                                family, tmp_path)


@pytest.mark.parametrize("variant", ["cpu-o2", "gpu"])
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_optimizer_variants_read_and_neutral_is_exact(family: str, variant: str,
                                                      tmp_path: Path) -> None:
    src = optimized_path(family, "dynamo", variant)
    _assert_neutral_exact(src, prepared(src, tmp_path / "read"), family, tmp_path)


@pytest.mark.parametrize("kind", ["attention", "mha"])
def test_bert_in_attention_kernels(kind: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    src = fused_bert_path(kind)
    fused = {n.op_type for n in onnx.load(str(src)).graph.node if n.domain == MS}
    assert ("Attention" if kind == "attention" else "MultiHeadAttention") in fused
    path = prepared(src, tmp_path / "read")
    data = _inspect(path, capsys)
    assert [(la["heads"], la["hidden"], la["ffn"]) for la in data["layers"]] == [(4, 64, 128)] * 2
    assert data["kind"] == "encoder"
    _assert_neutral_exact(src, path, "bert", tmp_path)
    _assert_half_flops_verifies(path, "bert", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_optimized_minilm(exporter: str, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    src = optimized_path("minilm", exporter)
    path = prepared(src, tmp_path / "read")
    data = _inspect(path, capsys)
    assert [(la["heads"], la["hidden"], la["ffn"]) for la in data["layers"]] == \
        [(12, 384, 1536)] * 6
    result = compile_plan(path, tmp_path / "neutral", ort_kernels="on")
    feeds = _feeds("bert", seq=64)
    for want, got in zip(run_ort(src, feeds), run_ort(result.model_path, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_reading_twice_changes_nothing(tmp_path: Path) -> None:
    path = prepared(optimized_path("gpt2", "dynamo"), tmp_path / "read")
    again = load_model(path)
    assert prepare(again) == {"dequantized_weights": 0, "expanded_ops": 0}


def test_opset14_optimizer_output_reads(tmp_path: Path) -> None:
    # Below opset 17 ORT's optimizer writes LayerNormalization into the default domain,
    # which the ONNX checker rejects; prepare spells it (and the fused ones) out.
    import torch
    from onnxruntime.transformers.optimizer import optimize_model

    from planer.fixtures.build import build_torch_model

    export, names = tmp_path / "export.onnx", ["input_ids", "attention_mask", "token_type_ids"]
    feeds = example_inputs("bert", batch=2, seq=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(build_torch_model("bert"), tuple(torch.from_numpy(feeds[n])
                                                           for n in names),
                          str(export), dynamo=False, opset_version=14, input_names=names,
                          output_names=["last_hidden_state"],
                          dynamic_axes={n: {0: "b", 1: "s"} for n in [*names,
                                                                      "last_hidden_state"]})
    src = tmp_path / "optimized.onnx"
    optimize_model(str(export), model_type="bert", num_heads=0,
                   hidden_size=0).save_model_to_file(str(src))
    model = ir.load(str(src))  # load_model's checker refuses the default-domain LayerNorm
    assert prepare(model)["expanded_ops"] > 0
    ir.save(model, str(tmp_path / "read.onnx"))
    onnx.checker.check_model(str(tmp_path / "read.onnx"), full_check=True)
    _assert_neutral_exact(src, tmp_path / "read.onnx", "bert", tmp_path)
