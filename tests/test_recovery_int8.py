"""Recovery simulates the dynamic INT8 the quantize stage applies after it (recovery.fakequant):
the rounding matches ORT's quantize_dynamic, and the mirror with it tracks the INT8 model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from planer.compiler.calibration import build_calibration, model_input_infos
from planer.compiler.driver.pipeline import compile_plan, read_model
from planer.compiler.loading import load_model
from planer.compiler.plan import parse_plan
from planer.fixtures.build import fixture_path
from planer.passes.quantize import dynamic_int8_weights
from planer.recovery.distill import recover
from planer.recovery.fakequant import dynamic_int8
from planer.recovery.train import RecoveryConfig, build_student
from tests.conftest import needs_vnni, run_ort

INT8 = {"blocks": "both", "mode": "dynamic"}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_rounding_matches_ort_quantize_dynamic(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.2, (48, 24)).astype(np.float32)
    x = (rng.normal(0.3, 1.0, (5, 48))).astype(np.float32)  # asymmetric range: zero point
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 48])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 24])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "f.onnx")
    quantize_dynamic(tmp_path / "f.onnx", tmp_path / "q.onnx", weight_type=QuantType.QInt8)
    (expected,) = run_ort(tmp_path / "q.onnx", {"x": x})
    xq, wq = dynamic_int8(torch.from_numpy(x), torch.from_numpy(w))
    got = (xq @ wq).numpy()
    float_err = np.abs(x @ w - expected).max()
    assert float_err > 1e-3  # INT8 really changes the result, so the check below means something
    assert np.abs(got - expected).max() < 1e-4 * max(1.0, float(np.abs(expected).max()))


def test_gradients_pass_straight_through() -> None:
    x = torch.linspace(-1, 2, 12).reshape(3, 4).requires_grad_()
    w = torch.linspace(-0.5, 0.5, 8).reshape(4, 2).requires_grad_()
    xq, wq = dynamic_int8(x, w)
    (xq @ wq).sum().backward()
    assert x.grad is not None and w.grad is not None
    assert torch.count_nonzero(x.grad) == x.numel() and torch.count_nonzero(w.grad) == w.numel()


def _compile(tmp_path: Path, name: str, plan: dict, calib: tuple[Path, Path]) -> Path:
    text, vocab = calib
    return compile_plan(fixture_path("bert", "dynamo"), tmp_path / name, plan_data=plan,
                        calibration=text, tokenizer=vocab, seq_len=32,
                        ort_kernels="off").model_path


@needs_vnni
def test_mirror_with_simulation_tracks_the_int8_model(
        tmp_path: Path, word_calibration: tuple[Path, Path]) -> None:
    layers = [{"heads": 3, "ffn": 96}, {"heads": 4, "ffn": 64}]
    float_path = _compile(tmp_path, "float", {"layers": layers}, word_calibration)
    int8_plan = {"layers": [{**layer, "int8": INT8} for layer in layers]}
    int8_path = _compile(tmp_path, "int8", int8_plan, word_calibration)
    model, spec = read_model(float_path)
    names = dynamic_int8_weights(model, spec, parse_plan(int8_plan, spec))
    assert len(names) == 12  # q, k, v, o, w1, w2 in both layers

    student = build_student(load_model(float_path), threads=1, int8_weights=names)
    rng = np.random.default_rng(3)
    feed = {"input_ids": rng.integers(4, 44, (2, 12)).astype(np.int64),
            "attention_mask": np.ones((2, 12), np.int64),
            "token_type_ids": np.zeros((2, 12), np.int64)}
    (int8_out,) = run_ort(int8_path, feed)
    entry, aux, mask = student.inputs(feed)
    with torch.no_grad():
        simulated = student.mirror(entry, aux, mask).end.numpy()
        with student.mirror.store.int8.off():
            plain = student.mirror(entry, aux, mask).end.numpy()
    sim_err, plain_err = np.abs(simulated - int8_out).max(), np.abs(plain - int8_out).max()
    assert plain_err > 10 * sim_err, (plain_err, sim_err)
    # The equivalence check compares with the float graph, so simulation is off there.
    assert student.check(load_model(float_path), feed) < 1e-4


def test_recover_reports_simulated_weights(
        tmp_path: Path, word_calibration: tuple[Path, Path]) -> None:
    text, vocab = word_calibration
    layers = [{"heads": 2, "ffn": 64}, {"heads": 2, "ffn": 64}]
    path = _compile(tmp_path, "float", {"layers": layers}, word_calibration)
    model, spec = read_model(path)
    plan = parse_plan({"layers": [{**layer, "int8": INT8} for layer in layers]}, spec)
    names = dynamic_int8_weights(model, spec, plan)
    calib = build_calibration(text, model_input_infos(model), tokenizer=vocab, seq_len=32)
    report = recover(fixture_path("bert", "dynamo"), model, calib, budget_s=None, max_steps=4,
                     config=RecoveryConfig(lr=1e-3, batch_size=16, eval_every=2, threads=1),
                     int8_weights=names)
    assert report.int8_simulated == len(names) == 12
    assert report.mirror_max_abs_diff < 1e-4 and report.written_max_abs_diff < 1e-4
