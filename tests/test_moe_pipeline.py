"""FFN -> MoE through `planer compile`: plans, all-experts exactness, reports, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from planer.compiler.driver.cli import main
from planer.compiler.loading import load_model
from planer.compiler.targets import check_ops
from planer.fixtures.build import fixture_path
from tests.conftest import run_ort, text_feeds


@pytest.fixture
def calibration(word_calibration: tuple[Path, Path]) -> list[str]:
    text, vocab = word_calibration
    return ["--calibration", str(text), "--tokenizer", str(vocab), "--seq-len", "16"]


def _compile(tmp_path: Path, layers: list[dict], calibration: list[str], *extra: str) -> dict:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"layers": layers}))
    out = tmp_path / "out"
    code = main(["compile", str(fixture_path("bert-relu", "dynamo")), "--plan", str(plan),
                 "-o", str(out), *calibration, *extra])
    assert code == 0
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    return json.loads((out / "report.json").read_text())


def test_all_experts_reproduce_the_dense_model(tmp_path: Path, calibration: list[str]) -> None:
    report = _compile(tmp_path, [{"moe": {"experts": 4, "top_k": 4}}] * 2, calibration)
    feeds = text_feeds(batch=2, seq_len=16, vocab=44, pad_last=5)
    dense = run_ort(fixture_path("bert-relu", "dynamo"), feeds)[0]
    moe = run_ort(tmp_path / "out" / "model.onnx", feeds)[0]
    real = feeds["attention_mask"].astype(bool)
    np.testing.assert_allclose(moe[real], dense[real], rtol=0, atol=1e-4)
    assert report["flops_ratio"] == pytest.approx(1.0, abs=1e-3)


def test_top_k_plan_reports_router_quality(tmp_path: Path, calibration: list[str]) -> None:
    report = _compile(tmp_path, [{"moe": {"experts": 4, "top_k": 1}}, {}], calibration)
    quality = report["moe"]["layer0"]
    assert 0.0 <= quality["router_recall"] <= 1.0
    assert quality["experts_per_token"] == pytest.approx(1.0)
    assert report["layers"][0]["moe"] == {"experts": 4, "top_k": 1}
    assert report["flops_ratio"] < 1.0


def test_auto_lowering_is_the_one_measured_faster(tmp_path: Path, calibration: list[str],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    report = _compile(tmp_path, [{"moe": {"experts": 4, "top_k": 2}}, {}], calibration)
    layer = report["moe"]["layer0"]
    costs = layer["lowering_us"]
    faster = "kernel" if costs["kernel_us"] < costs["gather_us"] else "gather"
    assert layer["lowering"] == faster
    ops = {n.op_type for n in onnx.load(tmp_path / "out" / "model.onnx").graph.node}
    assert ("MoE" in ops) == (faster == "kernel")
    # The summary says so when even the faster lowering lost to the dense FFN.
    slower = costs[f"{faster}_us"] >= costs["dense_us"]
    assert ("layer0: its MoE FFN measured slower" in capsys.readouterr().out) == slower


def test_without_measuring_the_lowering_is_gather(tmp_path: Path,
                                                 calibration: list[str]) -> None:
    report = _compile(tmp_path, [{"moe": {"experts": 4, "top_k": 2}}, {}], calibration,
                      "--ort-kernels", "on")
    assert report["moe"]["layer0"]["lowering"] == "gather"
    assert "lowering_us" not in report["moe"]["layer0"]
    ops = {n.op_type for n in onnx.load(tmp_path / "out" / "model.onnx").graph.node}
    assert "MoE" not in ops


def test_tensorrt_lowering_uses_only_tensorrt_ops(tmp_path: Path,
                                                  calibration: list[str]) -> None:
    _compile(tmp_path, [{"moe": {"experts": 4, "top_k": 2}}] * 2, calibration,
             "--target-runtime", "tensorrt")
    assert check_ops(load_model(tmp_path / "out" / "model.onnx"), "tensorrt") == []


@pytest.mark.parametrize(("layers", "message"), [
    ([{"moe": {"experts": 4, "top_k": 2}}, {}], "pass --calibration"),
    ([{"moe": {"experts": 5, "top_k": 2}}, {}], "must divide"),
    ([{"moe": {"experts": 4}}, {}], "exactly one of"),
])
def test_bad_moe_plans(layers: list[dict], message: str, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"layers": layers}))
    code = main(["compile", str(fixture_path("bert-relu", "dynamo")), "--plan", str(plan),
                 "-o", str(tmp_path / "o")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_inspecting_a_moe_output_says_why_it_cannot(tmp_path: Path, calibration: list[str],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    _compile(tmp_path, [{"moe": {"experts": 4, "top_k": 2}}, {}], calibration)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "out" / "model.onnx")]) == 2
    assert "already split into experts by planer" in capsys.readouterr().err
