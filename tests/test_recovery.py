"""Recovery training on tiny fixtures: it learns, writes back in place, and refuses bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from planer.compiler.calibration import (
    CalibrationSet,
    build_calibration,
    load_tokenizer,
    model_input_infos,
)
from planer.compiler.driver.pipeline import compile_plan
from planer.compiler.errors import BadInputError
from planer.compiler.loading import load_model
from planer.fixtures.build import fixture_path
from planer.recovery.data import TextBatches, holdout_texts, trim
from planer.recovery.distill import recover
from planer.recovery.train import RecoveryConfig
from tests.conftest import run_ort

# Layer 0 loses its attention and all but 8 FFN channels, layer 1 its FFN and 3 of 4 heads.
PLAN = {"layers": [{"heads": 0, "ffn": 8}, {"heads": 1, "ffn": 0}]}
# The random fixture's blocks barely move its post-LN residual stream, so pruning alone
# leaves a pooled cosine of ~0.9999; seeded noise on the kept projections stands in for a
# poor rewrite and gives recovery something to undo (pooled cosine ~0.9).
NOISE = {"layer0/ffn/w2/weight": 0.1, "layer1/attn/o/weight": 0.1, "layer1/attn/v/weight": 0.1}
CONFIG = RecoveryConfig(lr=1e-3, batch_size=16, eval_every=10, threads=1)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def noisy_compiled(tmp_path: Path, text: Path, vocab: Path) -> Path:
    """Compiles the bert fixture to PLAN and adds NOISE; returns the model's path."""
    src = fixture_path("bert", "dynamo")
    # ort_kernels "off": the compile's kernel stage re-reads the model with find_blocks,
    # which refuses a layer without an FFN.
    result = compile_plan(src, tmp_path / "out", plan_data=PLAN, calibration=text,
                          tokenizer=vocab, seq_len=32, ort_kernels="off")
    model = load_model(result.model_path)
    ir.external_data.load_to_model(model)  # saved again below as one self-contained file
    rng = np.random.default_rng(0)
    for name, scale in NOISE.items():
        value = model.graph.initializers[name]
        array = value.const_value.numpy()  # type: ignore[union-attr]
        noisy = array + rng.normal(0.0, scale, array.shape).astype(array.dtype)
        value.const_value = ir.tensor(noisy, name=name)
    path = tmp_path / "noisy.onnx"
    ir.save(model, path)
    return path


@pytest.fixture
def compiled(tmp_path: Path, word_calibration: tuple[Path, Path]) -> tuple[Path, CalibrationSet]:
    text, vocab = word_calibration
    path = noisy_compiled(tmp_path, text, vocab)
    calib = build_calibration(text, model_input_infos(load_model(path)), tokenizer=vocab,
                              seq_len=32)
    return path, calib


def _structure(model: ir.Model) -> list[tuple[Any, ...]]:
    nodes = [(n.op_type, n.name, tuple(v.name if v is not None else None for v in n.inputs),
              tuple(v.name for v in n.outputs)) for n in model.graph]
    inits = [(name, tuple(v.const_value.shape.numpy()), v.const_value.dtype)  # type: ignore
             for name, v in sorted(model.graph.initializers.items())]
    return [*nodes, *inits]


def test_recovery_lowers_the_loss_and_raises_fidelity(compiled: tuple[Path, CalibrationSet]
                                                      ) -> None:
    path, calib = compiled
    model = load_model(path)
    report = recover(fixture_path("bert", "dynamo"), model, calib, budget_s=None, max_steps=60,
                     config=CONFIG)
    assert report.steps == 60 and report.stopped == "steps"
    assert report.loss["last"] < 0.5 * report.loss["first"]
    before, after = report.fidelity_before["pooled_cosine"], report.fidelity_after["pooled_cosine"]
    assert before < 0.99 and after > before + 0.5 * (1 - before)
    assert report.mirror_max_abs_diff <= 1e-4 and report.written_max_abs_diff <= 1e-4
    assert report.layer_loss and report.tokens > 0
    json.dumps(report.to_dict())  # serialisable for report.json


def test_write_back_keeps_structure_and_names(compiled: tuple[Path, CalibrationSet],
                                             tmp_path: Path) -> None:
    path, calib = compiled
    model, original = load_model(path), load_model(path)
    ir.external_data.load_to_model(original)
    report = recover(fixture_path("bert", "dynamo"), model, calib, budget_s=None, max_steps=5,
                     config=CONFIG)
    assert _structure(model) == _structure(original)
    changed = [name for name, v in model.graph.initializers.items()
               if not np.array_equal(v.const_value.numpy(),  # type: ignore[union-attr]
                                     original.graph.initializers[name].const_value.numpy())]
    assert set(changed) <= set(report.written) and len(changed) > 10
    out = tmp_path / "recovered.onnx"
    ir.save(model, out)
    onnx.checker.check_model(onnx.load(out), full_check=True)
    feeds = {k: v for k, v in calib.holdout[0].items()}
    (recovered,) = run_ort(out, feeds)
    assert np.isfinite(recovered).all()


def test_time_budget_stops_training(compiled: tuple[Path, CalibrationSet]) -> None:
    path, calib = compiled
    # No early stop: only the clock may end this run.
    report = recover(fixture_path("bert", "dynamo"), load_model(path), calib, budget_s=8.0,
                     max_steps=None, config=dataclasses.replace(CONFIG, patience=0))
    assert report.stopped == "budget"
    assert report.wall_s < 8.0 + 4.0  # the reserve covers the final check; slack for load


def test_progress_reaches_a_callable_and_a_bar(compiled: tuple[Path, CalibrationSet]) -> None:
    path, calib = compiled
    lines: list[str] = []
    recover(fixture_path("bert", "dynamo"), load_model(path), calib, budget_s=None,
            max_steps=10, config=CONFIG, progress=lines.append)
    assert len(lines) == 10 and "loss" in lines[0] and "fidelity" in lines[-1]

    class Bar:
        def __init__(self) -> None:
            self.calls: list[tuple[int, dict[str, Any]]] = []

        def advance(self, n: int, **fields: Any) -> None:
            self.calls.append((n, fields))

    class Progress:
        def __init__(self) -> None:
            self.bars: list[tuple[str, int, Bar]] = []

        def bar(self, label: str, total: int) -> Bar:
            self.bars.append((label, total, Bar()))
            return self.bars[-1][2]

    progress = Progress()
    recover(fixture_path("bert", "dynamo"), load_model(path), calib, budget_s=None,
            max_steps=10, config=CONFIG, progress=progress)
    ((_, total, bar),) = progress.bars
    assert total == 10 and sum(n for n, _ in bar.calls) == 10
    assert "fidelity" in bar.calls[-1][1]


def test_recovery_refuses_without_calibration_or_budget(
        compiled: tuple[Path, CalibrationSet]) -> None:
    path, calib = compiled
    src = fixture_path("bert", "dynamo")
    with pytest.raises(BadInputError, match="calibration"):
        recover(src, load_model(path), None, budget_s=10, max_steps=None)
    with pytest.raises(BadInputError, match="budget"):
        recover(src, load_model(path), calib, budget_s=None, max_steps=None)
    with pytest.raises(BadInputError, match="tokenizer"):
        recover(src, load_model(path), calib, budget_s=10, max_steps=None, texts=["a b"])


def test_text_stream_pads_per_batch_and_leaves_out_the_holdout(
        compiled: tuple[Path, CalibrationSet], word_calibration: tuple[Path, Path]) -> None:
    path, calib = compiled
    _, vocab = word_calibration
    texts = calib.texts or []
    held = holdout_texts(calib)
    assert held and len(held) <= calib.holdout_samples()
    kept = [t for t in texts if t not in held]
    stream = iter(TextBatches(kept, load_tokenizer(vocab), model_input_infos(load_model(path)),
                              batch_size=8, seed=0, pool=4))
    batches = [next(stream) for _ in range(-(-len(kept) // 8))]  # one epoch
    assert sum(b["input_ids"].shape[0] for b in batches) == len(kept)
    for batch in batches:
        mask = batch["attention_mask"]
        assert mask[:, -1].any()  # padded to its own longest text, no further
        assert trim(batch)["input_ids"].shape == batch["input_ids"].shape
    widths = {b["input_ids"].shape[1] for b in batches}
    assert len(widths) > 1


def test_recover_streams_texts(compiled: tuple[Path, CalibrationSet],
                               word_calibration: tuple[Path, Path]) -> None:
    path, calib = compiled
    text, vocab = word_calibration
    texts = text.read_text().splitlines()
    report = recover(fixture_path("bert", "dynamo"), load_model(path), calib, budget_s=None,
                     max_steps=20, config=CONFIG, texts=texts, tokenizer=vocab)
    # Full batches but the last of each epoch (the ~90 fitting texts make 5 of 16 and one of 10).
    assert 0.9 * 20 * CONFIG.batch_size <= report.sequences <= 20 * CONFIG.batch_size
    assert report.fidelity_after["pooled_cosine"] > report.fidelity_before["pooled_cosine"]


def test_error_weighting_puts_weight_where_the_error_is(
        compiled: tuple[Path, CalibrationSet]) -> None:
    from planer.recovery.train import Holdout, Trainer, World, build_student, load_teacher

    path, calib = compiled
    src = fixture_path("bert", "dynamo")
    student, teacher = build_student(load_model(path), threads=1), load_teacher(src, threads=1)
    holdout = Holdout.build(student, teacher.run, calib.holdout)
    uniform = Trainer(student, teacher, CONFIG, seed=0, world=World())
    uniform.set_scales(holdout)
    weighted = Trainer(student, teacher, RecoveryConfig(layer_weighting="error"), seed=0,
                       world=World())
    weighted.set_scales(holdout)
    assert uniform.scales is not None and weighted.scales is not None
    # A term's weight is 1 / scale: the ratio between the two runs is the layer's error share.
    ratio = np.asarray(uniform.scales) / np.asarray(weighted.scales)
    error = np.asarray(holdout.layer_error)
    np.testing.assert_allclose(ratio, error / error.mean(), rtol=1e-6)
    assert error[1] > error[0]  # the noisy layer-1 projections: the larger error
