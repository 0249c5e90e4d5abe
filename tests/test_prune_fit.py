"""Calibrated pruning: importance, allocation, least-squares refit, and the CLI around them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from planer.compiler.driver.cli import main
from planer.compiler.driver.pipeline import compile_plan, read_model
from planer.compiler.spec import model_flops
from planer.fixtures.build import fixture_path, minilm_tokenizer_dir
from planer.passes.prune_fit import allocate, capture_layers, importance, refit, relative_error
from tests.conftest import DATA, needs_shared, run_ort, text_feeds

SST2 = DATA / "sst2" / "train.tsv"


def _calibration(model: ir.Model, vocab: int, *, seq_len: int = 24):
    batches = [text_feeds(batch=8, seq_len=seq_len, vocab=vocab, seed=s, pad_last=5)
               for s in range(4)]
    return batches


def test_planted_dead_head_ranks_last() -> None:
    model, spec = read_model(fixture_path("bert", "dynamo"))
    attn = spec.layers[1].attention
    d = attn.head_size
    wo = attn.o.w().copy()
    wo[2 * d:3 * d, :] = 0.0  # head 2 writes nothing into the residual stream
    attn.o.weight.const_value = ir.tensor(wo)
    acts = capture_layers(model, spec, _calibration(model, 1000))
    scores = importance(spec, acts)
    assert int(np.argmin(scores.heads[1])) == 2
    assert scores.heads[1][2] == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.delete(scores.heads[1], 2) > 0)


def test_refit_recovers_a_planted_low_rank_layer() -> None:
    rng = np.random.default_rng(0)
    kept = rng.standard_normal((2000, 12))
    mix = rng.standard_normal((12, 20))
    dropped = kept @ mix  # the dropped units are exact combinations of the kept ones
    x = np.concatenate([kept, dropped], axis=1)
    w = rng.standard_normal((32, 8))
    y = x @ w + 0.5
    sliced = kept @ w[:12] + 0.5
    w_fit, b_fit = refit(kept, y, ridge=1e-9)
    assert relative_error(sliced, y) > 0.5
    assert relative_error(kept @ w_fit + b_fit, y) < 1e-6


def test_refit_folds_a_constant_unit_into_the_bias() -> None:
    rng = np.random.default_rng(1)
    kept = rng.standard_normal((500, 4))
    x = np.concatenate([kept, np.full((500, 1), 3.0)], axis=1)
    y = x @ rng.standard_normal((5, 3))
    w_fit, b_fit = refit(kept, y, ridge=1e-9)
    assert relative_error(kept @ w_fit + b_fit, y) < 1e-8


def test_allocation_meets_budget_and_differs_by_layer_sensitivity() -> None:
    model, spec = read_model(fixture_path("bert", "dynamo"))
    scores = importance(spec, capture_layers(model, spec, _calibration(model, 1000)))
    scores.heads[0] *= 100.0  # layer 0 made far more sensitive than layer 1
    scores.channels[0] *= 100.0
    counts = allocate(spec, scores, 0.5, batch=1, seq_len=64)
    flops = model_flops(spec, batch=1, seq_len=64)
    kept = sum(
        2 * 64 * spec.hidden * (4 * h * 16 + 2 * f) + 4 * 64 * 64 * h * 16 for h, f in counts
    ) + 2 * 64 * spec.other_matmul_macs_per_token
    assert kept <= 0.5 * flops
    assert counts[0][0] > counts[1][0] and counts[0][1] > counts[1][1]
    assert allocate(spec, scores, 1.0, batch=1, seq_len=64) == [(4, 128), (4, 128)]


def test_all_kept_plan_with_calibration_is_exact(tmp_path: Path) -> None:
    src = fixture_path("bert", "dynamo")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(f"sentence number {i} about things" for i in range(40)))
    result = compile_plan(src, tmp_path / "out", plan_data={"layers": [{}, {}]},
                          calibration=calib, tokenizer=_tiny_tokenizer(tmp_path), seq_len=16)
    feeds = text_feeds(batch=2, seq_len=16, vocab=1000, pad_last=4)
    for a, b in zip(run_ort(src, feeds), run_ort(result.model_path, feeds), strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


def _tiny_tokenizer(tmp_path: Path) -> Path:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "sentence", "number", "about",
             "things", *[str(i) for i in range(10)]]
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return folder


@needs_shared
@pytest.mark.slow
def test_target_flops_report(tmp_path: Path, minilm_torchscript: Path) -> None:
    result = compile_plan(minilm_torchscript, tmp_path / "out", target_flops=0.6,
                          calibration=SST2, tokenizer=minilm_tokenizer_dir(), seq_len=64)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report == result.report
    assert 0.55 <= report["flops_ratio"] <= 0.6
    assert report["calibration"]["holdout_samples"] > 0
    assert report["fidelity"]["pooled_cosine"]["mean"] > 0.8
    pruned = [la for la in report["layers"] if la["ffn"]["after"] < la["ffn"]["before"]]
    assert pruned and all(la["ffn_fit"]["error_refit"] <= la["ffn_fit"]["error_sliced"]
                          for la in pruned)


@needs_shared
@pytest.mark.slow
def test_calibrated_choice_beats_magnitude(tmp_path: Path, minilm_dynamo: Path) -> None:
    common = dict(target_flops=0.5, calibration=SST2, tokenizer=minilm_tokenizer_dir(),
                  seq_len=128)
    calibrated = compile_plan(minilm_dynamo, tmp_path / "c", **common)
    plan = json.loads((tmp_path / "c" / "plan.json").read_text())
    magnitude = compile_plan(minilm_dynamo, tmp_path / "m", plan_data=plan, calibration=SST2,
                             tokenizer=minilm_tokenizer_dir(), seq_len=128, method="magnitude",
                             reconstruct=False)
    c = calibrated.report["fidelity"]["pooled_cosine"]["mean"]
    m = magnitude.report["fidelity"]["pooled_cosine"]["mean"]
    assert c > m + 0.05, (c, m)


@needs_shared
@pytest.mark.parametrize(("args", "message"), [
    (["--target-flops", "0"], "--target-flops must be in (0, 1]"),
    (["--target-flops", "1.5"], "--target-flops must be in (0, 1]"),
    (["--calibration", "{empty}"], "empty"),
    (["--calibration", "{missing}"], "does not exist"),
    (["--calibration", str(SST2), "--tokenizer", "{bigtok}"], "rows"),
])
def test_bad_calibration_input(args: list[str], message: str, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.txt").write_text("\n\n")
    big = tmp_path / "bigtok"
    big.mkdir()
    (big / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] +
                                             [f"w{i}" for i in range(1200)]) + "\n")
    values = {"{empty}": str(tmp_path / "empty.txt"), "{missing}": str(tmp_path / "no.tsv"),
              "{bigtok}": str(big)}
    args = [values.get(a, a) for a in args]
    if "--tokenizer" not in args and "--calibration" in args:
        args += ["--tokenizer", str(big)]
    code = main(["compile", str(fixture_path("bert", "dynamo")), "-o", str(tmp_path / "o"),
                 *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert not (tmp_path / "o").exists()
