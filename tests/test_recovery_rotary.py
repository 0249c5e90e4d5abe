"""Recovery's torch mirror on rotary attention and RMSNorm (RoFormer, a tiny Llama).

The mirror of a pruned plan (heads and FFN channels) equals the compiled model in ORT
within 1e-4 before any training: RoFormer's interleaved rotary (both exporters, as
exported and as ORT's optimizer rewrites them), the rotate-half, per-head cos/sin,
rotary V and partial-rotary variants of tests/test_rotary, and a tiny Llama's
rotate-half, decomposed RMSNorm and SwiGLU FFN (TorchScript export, as
tests/test_gated_ffn builds it). A mirror without the rotation, with the other
rotation style or with a norm step changed fails the same check, and a short recovery
run lowers the distillation loss on the Llama and raises its held-out fidelity.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from planer.compiler.calibration import build_calibration, model_input_infos
from planer.compiler.driver.pipeline import compile_plan
from planer.compiler.loading import load_model
from planer.fixtures.build import example_inputs, fixture_path
from planer.recovery.mirror import AttentionMirror, RotaryRef
from planer.recovery.train import RecoveryConfig, Student, build_student

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4
PLAN = {"layers": [{"heads": 2, "ffn": 64}, {"heads": 3, "ffn": 96}]}
VOCAB, HEADS = 1000, 4


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # tiny tensors: threads only contend on a shared machine


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/test_gated_ffn's tiny Llama (hidden 64, 4 heads, FFN 128, 2 layers), TorchScript."""
    from planer.fixtures.decoders import export_lm, lm_wrapper, tiny_llama

    model = tiny_llama(heads=HEADS, width=128, vocab=VOCAB)
    path = tmp_path_factory.mktemp("llama") / "llama_torchscript.onnx"
    export_lm(lm_wrapper(model), "torchscript", path)
    return path


def _text_feed(seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((3, 20), np.int64)
    mask[1, 14:] = 0  # a padded row: only real tokens are compared
    return {"input_ids": rng.integers(3, VOCAB, (3, 20)).astype(np.int64),
            "attention_mask": mask}


def _student(path: Path) -> Student:
    return build_student(load_model(path), threads=1)


def _attentions(student: Student) -> list[AttentionMirror]:
    return [m for m in student.mirror.blocks.values() if isinstance(m, AttentionMirror)]


def _set_rotary(student: Student, change: Any) -> None:
    for attn in _attentions(student):
        attn.rotary = {role: r for role, r in ((role, change(r)) for role, r
                                               in attn.rotary.items()) if r is not None}


def _other_style(rotary: RotaryRef) -> RotaryRef:
    style = "interleaved" if rotary.style == "half" else "half"
    return dataclasses.replace(rotary, style=style)


def _assert_wrong_rotaries_fail(path: Path, feed: dict[str, np.ndarray]) -> None:
    model = load_model(path)
    for change in (lambda r: None, _other_style):  # rotation disabled, other style
        student = _student(path)
        _set_rotary(student, change)
        assert student.check(model, feed) > ATOL


@pytest.mark.parametrize("form", ["exported", "ort-optimized"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_roformer_mirror_equals_compiled_model(exporter: str, form: str, tmp_path: Path) -> None:
    # ORT's optimizer fuses the norms and (dynamo) moves K's head Transpose past its Mul
    # by cos; the finder reads cos back in Q/K's own layout.
    from planer.fixtures.fused import optimized_path

    source = fixture_path("roformer", exporter) if form == "exported" \
        else optimized_path("roformer", exporter)
    path = compile_plan(source, tmp_path / "out", plan_data=PLAN, ort_kernels="on").model_path
    student = _student(path)
    feed = example_inputs("roformer", batch=3, seq=20, seed=1)
    assert student.check(load_model(path), feed) <= ATOL
    assert [(a.heads, sorted(a.rotary), {r.style for r in a.rotary.values()})
            for a in _attentions(student)] == [(2, ["k", "q"], {"interleaved"}),
                                               (3, ["k", "q"], {"interleaved"})]
    # cos/sin are computed from positions before the stream: ORT hands them over per batch.
    assert {r.cos[0] for a in _attentions(student) for r in a.rotary.values()} == {"aux"}
    _assert_wrong_rotaries_fail(path, feed)


@pytest.mark.parametrize(("variant", "config", "roles"), [
    ("half_style", {}, ["k", "q"]),
    ("per_head", {}, ["k", "q"]),
    (None, {"rotary_value": True}, ["k", "q", "v"]),
    ("partial", {}, ["k", "q"]),
], ids=["rotate-half", "per-head-cos-sin", "rotary-value", "partial-rotary"])
def test_rotary_variant_mirror_equals_compiled_model(
        variant: str | None, config: dict[str, Any], roles: list[str], tmp_path: Path) -> None:
    from tests import test_rotary

    rotate = getattr(test_rotary, variant) if variant is not None else None
    _, source = test_rotary._variant(rotate, tmp_path / "model.onnx", **config)
    plan = {"layers": [{"heads": 1, "ffn": 64}, {"heads": 3, "ffn": 96}]}
    path = compile_plan(source, tmp_path / "out", plan_data=plan, ort_kernels="on").model_path
    student = _student(path)
    feed = _text_feed()
    assert student.check(load_model(path), feed) <= ATOL
    assert [sorted(a.rotary) for a in _attentions(student)] == [roles] * 2
    if variant == "partial":
        assert {r.span for a in _attentions(student) for r in a.rotary.values()} == {8}
    if variant == "per_head":
        # One cos row per kept head, gathered by head pruning before the stream.
        _, aux, _ = student.inputs(feed)
        rows = [aux[a.rotary["q"].cos[1]].shape[-3] for a in _attentions(student)]
        assert rows == [1, 3]
    _assert_wrong_rotaries_fail(path, feed)


def test_llama_mirror_equals_compiled_model(llama_path: Path, tmp_path: Path) -> None:
    path = compile_plan(llama_path, tmp_path / "out", plan_data=PLAN,
                        ort_kernels="on").model_path
    student = _student(path)
    model, feed = load_model(path), _text_feed()
    assert student.check(model, feed) <= ATOL
    assert [(a.heads, sorted(a.rotary), {r.style for r in a.rotary.values()})
            for a in _attentions(student)] == [(2, ["k", "q"], {"half"}),
                                               (3, ["k", "q"], {"half"})]
    # The stream starts at the residual before layer 0's RMSNorm, so every RMSNorm
    # (five of them, the final one included) is replayed and its weight trained.
    assert str(student.stream.entry.name).endswith("layers.0/input_layernorm/Cast_output_0")
    kinds = [kind for kind, _ in student.mirror.described]
    assert kinds.count("ReduceMean") == kinds.count("Sqrt") == 5
    trained = student.mirror.trained()
    assert {f"model.model.layers.{i}.{n}.weight" for i in (0, 1)
            for n in ("input_layernorm", "post_attention_layernorm")} <= set(trained)
    assert "model.model.norm.weight" in trained
    assert not any("MatMul" in name and "proj" not in name for name in trained)  # LM head
    _assert_wrong_rotaries_fail(path, feed)
    # A norm replayed without its square root fails the check too.
    sqrt = next(key for (kind, key, *_) in student.mirror.program if kind == "Sqrt")
    student.mirror.stream_fns[sqrt] = lambda x: x
    assert student.check(model, feed) > ATOL


def test_recovery_lowers_the_loss_on_llama(llama_path: Path, tmp_path: Path,
                                           word_calibration: tuple[Path, Path]) -> None:
    from planer.recovery.distill import recover

    text, vocab = word_calibration
    path = compile_plan(llama_path, tmp_path / "out", plan_data=PLAN,
                        ort_kernels="on").model_path
    model = load_model(path)
    calib = build_calibration(text, model_input_infos(model), tokenizer=vocab, seq_len=32)
    config = RecoveryConfig(lr=1e-3, batch_size=16, eval_every=10, threads=1)
    report = recover(llama_path, model, calib, budget_s=None, max_steps=30, config=config)
    assert report.steps == 30
    assert report.loss["last"] < 0.5 * report.loss["first"]  # measured: 0.406 -> 0.049
    before, after = report.fidelity_before["pooled_cosine"], report.fidelity_after["pooled_cosine"]
    assert after > before  # on held-out calibration texts (measured: 0.800 -> 0.972)
    assert report.mirror_max_abs_diff <= ATOL and report.written_max_abs_diff <= ATOL
