"""The MoE block's mirror equals the graph for every lowering, and recovery trains through it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from planer.compiler.calibration import build_calibration, model_input_infos
from planer.compiler.driver.pipeline import compile_plan, read_canonical
from planer.compiler.loading import load_model
from planer.compiler.plan import MoePlan
from planer.fixtures.build import example_inputs, fixture_path
from planer.passes.ffn_to_moe import apply_ffn_to_moe, config_from_fits
from planer.passes.moe_fit import fit_layers
from planer.recovery.distill import recover
from planer.recovery.moe import MoeMirror
from planer.recovery.train import RecoveryConfig, build_student

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
