"""The MoE block's mirror equals the graph for every lowering, and recovery trains through it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
from onnx_ir.passes.common import RemoveUnusedNodesPass

from planer.compiler.blocks import find_blocks
from planer.compiler.calibration import build_calibration, model_input_infos
from planer.compiler.driver.pipeline import compile_plan, read_canonical
from planer.compiler.errors import BadInputError
from planer.compiler.loading import load_model
from planer.compiler.plan import MoePlan, parse_plan
from planer.fixtures.build import example_inputs, fixture_path
from planer.passes.ffn_to_moe import apply_ffn_to_moe, config_from_fits
from planer.passes.moe_fit import activation_root, fit_layers
from planer.recovery import data
from planer.recovery.distill import recover
from planer.recovery.moe import MoeMirror, activation_l1
from planer.recovery.train import RecoveryConfig, Trainer, World, build_student, load_teacher
from tests.conftest import run_ort

ATOL = 1e-4


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _feed(vocab: int = 44) -> dict[str, np.ndarray]:
    return example_inputs("bert", batch=3, seq=16, seed=2, vocab_size=vocab)  # row 1 padded


def _moe_blocks(path: Path) -> list[MoeMirror]:
    student = build_student(load_model(path), threads=1)
    return [b for b in student.mirror.blocks.values() if isinstance(b, MoeMirror)]


@pytest.mark.parametrize(("family", "moe", "target"), [
    ("bert-relu", {"experts": 4, "top_k": 2}, "ort"),
    ("bert", {"experts": 4, "tau": 0.5}, "ort"),          # dynamic-k, erf-GELU as BiasGelu
    ("bert-gelu-tanh", {"experts": 4, "top_k": 1}, "ort"),
    ("bert", {"experts": 4, "top_k": 2}, "tensorrt"),     # capacity per expert
])
def test_moe_mirror_equals_compiled_model(family: str, moe: dict, target: str, tmp_path: Path,
                                          word_calibration: tuple[Path, Path]) -> None:
    text, vocab = word_calibration
    plan = {"layers": [{"moe": moe}, {"heads": 2, "ffn": 64}]}
    path = compile_plan(fixture_path(family, "dynamo"), tmp_path / "out", plan_data=plan,
                        calibration=text, tokenizer=vocab, seq_len=16, target_runtime=target,
                        ort_kernels="off").model_path
    student = build_student(load_model(path), threads=1)
    (block,) = [b for b in student.mirror.blocks.values() if isinstance(b, MoeMirror)]
    assert block.lowering == ("tensorrt" if target == "tensorrt" else "gather")
    assert (block.top_k, block.tau) == (moe.get("top_k"), moe.get("tau"))
    assert student.check(load_model(path), _feed()) <= ATOL
    assert len(student.mirror.layer_names) == 2


def test_kernel_lowering_mirror(tmp_path: Path, word_calibration: tuple[Path, Path]) -> None:
    text, vocab = word_calibration
    model, spec = read_canonical(fixture_path("bert-relu", "dynamo"))
    calib = build_calibration(text, model_input_infos(model), tokenizer=vocab, seq_len=16)
    fitted = fit_layers(model, spec, calib, {0: 4}, steps=50)
    apply_ffn_to_moe(model, spec, config_from_fits(fitted, {0: MoePlan(4, top_k=2)},
                                                   lowering="kernel"))
    student = build_student(model, threads=1)
    (block,) = [b for b in student.mirror.blocks.values() if isinstance(b, MoeMirror)]
    assert block.lowering == "kernel"
    assert student.check(model, _feed()) <= ATOL
    # fc2 carries the factor k in the graph; the mirror trains the initializer as stored.
    assert "layer0/ffn/kernel/fc2" in student.mirror.trained()


def test_wrong_selection_fails_the_check(tmp_path: Path,
                                         word_calibration: tuple[Path, Path]) -> None:
    text, vocab = word_calibration
    plan = {"layers": [{"moe": {"experts": 4, "top_k": 1}}, {}]}
    path = compile_plan(fixture_path("bert-relu", "dynamo"), tmp_path / "out", plan_data=plan,
                        calibration=text, tokenizer=vocab, seq_len=16,
                        ort_kernels="off").model_path
    student = build_student(load_model(path), threads=1)
    (block,) = [b for b in student.mirror.blocks.values() if isinstance(b, MoeMirror)]
    block.top_k = 2
    assert student.check(load_model(path), _feed()) > ATOL


def test_recovery_trains_experts_and_routers(tmp_path: Path,
                                             word_calibration: tuple[Path, Path]) -> None:
    text, vocab = word_calibration
    plan = {"layers": [{"moe": {"experts": 4, "top_k": 1}}, {"moe": {"experts": 4, "top_k": 1}}]}
    src = fixture_path("bert-relu", "dynamo")
    path = compile_plan(src, tmp_path / "out", plan_data=plan, calibration=text, tokenizer=vocab,
                        seq_len=16, ort_kernels="off").model_path
    model = load_model(path)
    calib = build_calibration(text, model_input_infos(model), tokenizer=vocab, seq_len=16)
    report = recover(src, model, calib, budget_s=None, max_steps=30,
                     config=RecoveryConfig(lr=1e-3, batch_size=16, eval_every=10, threads=1))
    assert report.written_max_abs_diff <= ATOL
    assert any("/router/" in name for name in report.written)
    assert any("/expert0/" in name for name in report.written)
    assert report.loss["last"] < report.loss["first"]  # the distillation loss
    assert "router" in report.loss  # the routers' own regression, reported apart
    assert report.fidelity_after["pooled_cosine"] > report.fidelity_before["pooled_cosine"]


# ---------------------------------------------------------------- ReLU-fication (DSTI)


@pytest.mark.parametrize("target", ["ort", "tensorrt"])
def test_relufied_experts_run_relu_and_the_mirror_follows(
        target: str, tmp_path: Path, word_calibration: tuple[Path, Path]) -> None:
    text, vocab = word_calibration
    plan = {"layers": [{"moe": {"experts": 4, "top_k": 2, "activation": "relu"}}, {}]}
    result = compile_plan(fixture_path("bert", "dynamo"), tmp_path / "out", plan_data=plan,
                          calibration=text, tokenizer=vocab, seq_len=16, target_runtime=target,
                          ort_kernels="off")
    model = load_model(result.model_path)
    expert_ops = {n.op_type for n in model.graph if (n.name or "").startswith("layer0/ffn/expert")}
    assert "Relu" in expert_ops and not expert_ops & {"Erf", "BiasGelu", "Gelu"}
    assert result.plan.layers[0].moe.activation == "relu"  # type: ignore[union-attr]
    assert result.report["moe"]["layer0"]["activation"] == "relu"
    student = build_student(model, threads=1)
    (block,) = [b for b in student.mirror.blocks.values() if isinstance(b, MoeMirror)]
    assert block.activation == "relu"
    assert student.check(model, _feed()) <= ATOL


def test_relufied_gelu_ffn_fits_the_moe_kernel(word_calibration: tuple[Path, Path]) -> None:
    text, vocab = word_calibration
    model, spec = read_canonical(fixture_path("bert", "dynamo"))  # erf-GELU
    calib = build_calibration(text, model_input_infos(model), tokenizer=vocab, seq_len=16)
    fitted = fit_layers(model, spec, calib, {0: 4}, steps=50, activations={0: "relu"})
    apply_ffn_to_moe(model, spec, config_from_fits(
        fitted, {0: MoePlan(4, top_k=2, activation="relu")}, lowering="kernel"))
    kernel = next(n for n in model.graph if n.op_type == "MoE")
    assert kernel.attributes["activation_type"].value == "relu"
    student = build_student(model, threads=1)
    assert student.check(model, _feed()) <= ATOL


def test_relufication_error_is_reported_against_the_gelu_ffn(
        word_calibration: tuple[Path, Path]) -> None:
    text, vocab = word_calibration
    model, spec = read_canonical(fixture_path("bert", "dynamo"))
    calib = build_calibration(text, model_input_infos(model), tokenizer=vocab, seq_len=16)
    every = MoePlan(4, top_k=4)
    gelu = fit_layers(model, spec, calib, {0: 4}, steps=20)[0].quality(every)
    relu = fit_layers(model, spec, calib, {0: 4}, steps=20,
                      activations={0: "relu"})[0].quality(every)
    assert gelu.activation == "gelu" and relu.activation == "relu"
    assert gelu.reconstruction_error < 1e-5  # every expert, own activation: exact
    assert relu.reconstruction_error > 0.01  # every expert, but ReLU in place of GELU


def test_l1_penalty_makes_relu_experts_sparser(tmp_path: Path,
                                               word_calibration: tuple[Path, Path]) -> None:
    text, vocab = word_calibration
    src = fixture_path("bert", "dynamo")
    plan = {"layers": [{"moe": {"experts": 4, "top_k": 2, "activation": "relu"}}, {}]}
    path = compile_plan(src, tmp_path / "out", plan_data=plan, calibration=text,
                        tokenizer=vocab, seq_len=16, ort_kernels="off").model_path
    calib = build_calibration(text, model_input_infos(load_model(path)), tokenizer=vocab,
                              seq_len=16)

    def mean_activation(l1: float) -> float:
        """Mean |h| per real token after 20 steps (the trained state, not the best kept)."""
        student = build_student(load_model(path), threads=1)
        config = RecoveryConfig(lr=1e-3, threads=1, layer_weight=0.0, activation_l1=l1)
        trainer = Trainer(student, load_teacher(src, threads=1), config, seed=0, world=World())
        batches = data.cycle_batches(calib, seed=0)
        for step in range(20):
            trainer.train_step(next(batches), step / 20)
        entry, aux, mask = student.inputs(_feed())
        with torch.no_grad():
            student.run(entry, aux, mask)
        (block,) = [b for b in student.mirror.blocks.values() if isinstance(b, MoeMirror)]
        assert block.l1_sum is not None
        return float(block.l1_sum) / float(mask.sum())

    assert mean_activation(1.0) < 0.8 * mean_activation(0.0)


@pytest.mark.parametrize("family", ["bert", "bert-relu"])
def test_experts_not_relufied_get_no_l1_term(family: str, tmp_path: Path,
                                             word_calibration: tuple[Path, Path]) -> None:
    # A ReLU model's own experts train as before: the penalty is ReLU-fication's.
    text, vocab = word_calibration
    plan = {"layers": [{"moe": {"experts": 4, "top_k": 2}}, {}]}
    path = compile_plan(fixture_path(family, "dynamo"), tmp_path / "out", plan_data=plan,
                        calibration=text, tokenizer=vocab, seq_len=16,
                        ort_kernels="off").model_path
    student = build_student(load_model(path), threads=1)
    student.mirror.train()
    entry, aux, mask = student.inputs(_feed())
    student.run(entry, aux, mask)
    assert activation_l1(student.mirror, float(mask.sum())) is None


def test_relufication_without_recovery_warns(tmp_path: Path, word_calibration: tuple[Path, Path],
                                             caplog: pytest.LogCaptureFixture) -> None:
    text, vocab = word_calibration
    plan = {"layers": [{"moe": {"experts": 4, "top_k": 2}}, {}]}
    with caplog.at_level("WARNING"):
        result = compile_plan(fixture_path("bert", "dynamo"), tmp_path / "out", plan_data=plan,
                              calibration=text, tokenizer=vocab, seq_len=16, ort_kernels="off",
                              moe_activation="relu")
    assert "without training" in caplog.text and "--recover" in caplog.text
    assert result.plan.layers[0].moe.activation == "relu"  # type: ignore[union-attr]
    assert '"activation": "relu"' in (tmp_path / "out" / "plan.json").read_text()


def test_moe_activation_needs_moe_layers_and_a_known_name(tmp_path: Path) -> None:
    from planer.compiler.driver.cli import main

    src = str(fixture_path("bert", "dynamo"))
    assert main(["compile", src, "-o", str(tmp_path / "a"), "--moe-activation", "relu"]) == 2
    assert main(["compile", src, "-o", str(tmp_path / "b"), "--target-latency", "50%",
                 "--moe-activation", "relu"]) == 2
    with pytest.raises(BadInputError, match="activation must be 'relu'"):
        parse_plan({"layers": [{"moe": {"experts": 4, "top_k": 2, "activation": "gelu"}}, {}]},
                   find_blocks(load_model(src)))


@pytest.mark.parametrize("lowering", ["gather", "scatter", "kernel"])
def test_relufied_moe_with_every_expert_equals_the_ffn_with_relu(
        lowering: str, tmp_path: Path, word_calibration: tuple[Path, Path]) -> None:
    """The reduced rewrite against an independently built model: GELU swapped for Relu."""
    text, vocab = word_calibration
    model, spec = read_canonical(fixture_path("bert", "dynamo"))
    expected, expected_spec = read_canonical(fixture_path("bert", "dynamo"))
    ffn = expected_spec.layers[0].ffn
    relu = ir.node("Relu", [activation_root(ffn)], name="expected/Relu")
    expected.graph.insert_before(ffn.w2.matmul, relu)
    ffn.w2.matmul.replace_input_with(0, relu.outputs[0])
    RemoveUnusedNodesPass()(expected)
    calib = build_calibration(text, model_input_infos(model), tokenizer=vocab, seq_len=16)
    fitted = fit_layers(model, spec, calib, {0: 4}, steps=20, activations={0: "relu"})
    apply_ffn_to_moe(model, spec, config_from_fits(
        fitted, {0: MoePlan(4, top_k=4, activation="relu")}, lowering=lowering))
    ir.save(model, tmp_path / "moe.onnx")
    ir.save(expected, tmp_path / "expected.onnx")
    feed = _feed()
    (got,), (want,) = run_ort(tmp_path / "moe.onnx", feed), run_ort(tmp_path / "expected.onnx",
                                                                       feed)
    real = feed["attention_mask"].astype(bool)
    assert np.abs(got[real] - want[real]).max() < 1e-4
    (dense,) = run_ort(fixture_path("bert", "dynamo"), feed)
    assert np.abs(dense[real] - want[real]).max() > 1e-2  # ReLU-fication changed the model


def test_compile_with_recover_trains_an_moe_plan(tmp_path: Path,
                                                 word_calibration: tuple[Path, Path]) -> None:
    """The recover stage itself (not recover() called apart) runs on MoE layers."""
    text, vocab = word_calibration
    plan = {"layers": [{"moe": {"experts": 4, "top_k": 2, "activation": "relu"}}, {}]}
    result = compile_plan(fixture_path("bert", "dynamo"), tmp_path / "out", plan_data=plan,
                          calibration=text, tokenizer=vocab, seq_len=16, ort_kernels="off",
                          recover_steps=3)
    assert result.report["recovery"]["steps"] == 3
    assert result.report["recovery"]["written_max_abs_diff"] <= ATOL
