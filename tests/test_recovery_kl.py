"""A classification head is found in the graph, mirrored frozen, and distilled through KL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from planer.compiler.calibration import build_calibration, model_input_infos
from planer.compiler.driver.pipeline import compile_plan
from planer.compiler.loading import load_model
from planer.fixtures.build import example_inputs, fixture_path
from planer.fixtures.classifier import LABELS, classifier_path
from planer.recovery.distill import recover
from planer.recovery.train import RecoveryConfig, build_student, logits_kl

ATOL = 1e-4
PLAN = {"layers": [{"heads": 1, "ffn": 32}, {"heads": 1, "ffn": 32}]}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _feed() -> dict[str, np.ndarray]:
    return example_inputs("bert", batch=3, seq=16, seed=2, vocab_size=44)  # row 1 padded


@pytest.fixture
def compiled(tmp_path: Path, word_calibration: tuple[Path, Path]) -> Path:
    text, vocab = word_calibration
    return compile_plan(classifier_path(), tmp_path / "out", plan_data=PLAN, calibration=text,
                        tokenizer=vocab, seq_len=16, ort_kernels="off").model_path


def test_the_head_is_mirrored_and_the_stream_ends_before_it(compiled: Path) -> None:
    student = build_student(load_model(compiled), threads=1)
    assert student.head is not None
    assert student.head.described == "Gather ─ MatMul ─ Add ─ Tanh ─ MatMul ─ Add"
    assert student.stream.end.producer().op_type == "LayerNormalization"  # type: ignore[union-attr]
    assert student.check(load_model(compiled), _feed()) <= ATOL
    assert student.parts()["head"]["loss"] == "KL on logits"
    # The head stays frozen: none of its weights is trained or written back.
    assert not any("classifier" in n or "pooler" in n for n in student.mirror.trained())


def test_a_wrong_head_fails_the_check(compiled: Path) -> None:
    student = build_student(load_model(compiled), threads=1)
    assert student.head is not None
    bias = next(n for n in student.head.consts if "classifier" in n)
    student.head.consts[bias] = student.head.consts[bias] + 0.01
    assert student.check(load_model(compiled), _feed()) > ATOL


def test_hidden_state_models_have_no_head() -> None:
    student = build_student(load_model(fixture_path("bert", "dynamo")), threads=1)
    assert student.head is None


def test_logits_kl_is_the_tempered_kl_and_only_for_logits() -> None:
    rng = np.random.default_rng(0)
    teacher = rng.standard_normal((4, LABELS)).astype(np.float32)
    student = torch.from_numpy(rng.standard_normal((4, LABELS)).astype(np.float32))
    got = logits_kl(student, teacher, 2.0, 4.0)
    assert got is not None
    p = F.softmax(torch.from_numpy(teacher) / 2, -1)
    expected = (p * (p.log() - F.log_softmax(student / 2, -1))).sum() * 4 / 4
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    assert float(logits_kl(torch.from_numpy(teacher), teacher, 2.0, 4.0)) == pytest.approx(  # type: ignore[arg-type]
        0.0, abs=1e-6)
    assert logits_kl(student[:, None, :], teacher[:, None, :], 2.0, 4.0) is None  # [B, S, D]
    assert logits_kl(student[:, :1], teacher[:, :1], 2.0, 4.0) is None  # one output: no classes


def test_kl_alone_trains_the_layers_through_the_head(compiled: Path,
                                                      word_calibration: tuple[Path, Path]) -> None:
    text, vocab = word_calibration
    model = load_model(compiled)
    calib = build_calibration(text, model_input_infos(model), tokenizer=vocab, seq_len=16)
    config = RecoveryConfig(lr=1e-3, batch_size=16, eval_every=10, threads=1, layer_weight=0.0,
                            output_weight=0.0, kl_weight=1.0)
    report = recover(classifier_path(), model, calib, budget_s=None, max_steps=30, config=config)
    assert report.written_max_abs_diff <= ATOL
    assert any("/attn/" in name or "encoder.layer" in name for name in report.written)
    assert report.loss["first"] > 0  # the KL is the whole loss here
    assert report.loss["last"] < report.loss["first"]
    assert report.fidelity_after["pooled_cosine"] > report.fidelity_before["pooled_cosine"]
