"""The refit never leaves a pruned block's held-out error above plain slicing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from planer.compiler.driver.pipeline import compile_plan
from planer.fixtures.build import fixture_path
from planer.passes.prune_fit import choose_output


def _kept_error(record: dict) -> float:
    return record[f"error_{record['kept']}"]


def test_refit_that_overfits_is_not_kept() -> None:
    # 60 fit tokens for 80 kept units: the refit interpolates the fit tokens and the
    # dropped units' small, independent contribution becomes noise it fits.
    rng = np.random.default_rng(0)
    width, keep_n, out = 100, 80, 16
    x_fit = rng.standard_normal((60, width))
    x_check = rng.standard_normal((2000, width))
    w = rng.standard_normal((width, out))
    w[keep_n:] *= 0.3
    keep = np.arange(keep_n)
    choice = choose_output(x_fit, keep, w, rng.standard_normal(out), x_check=x_check)
    record = choice.record
    assert record["error_refit"] > record["error_sliced"]  # the case the choice guards
    assert record["kept"] in ("sliced", "bias")
    assert _kept_error(record) <= record["error_sliced"]
    if record["kept"] == "sliced":
        assert choice.fit is None


def test_refit_that_helps_is_kept() -> None:
    rng = np.random.default_rng(1)
    kept = rng.standard_normal((3000, 12))
    x = np.concatenate([kept, kept @ rng.standard_normal((12, 20))], axis=1)
    w = rng.standard_normal((32, 8))
    choice = choose_output(x[:2000], np.arange(12), w, np.zeros(8), x_check=x[2000:])
    assert choice.record["kept"] == "refit"
    assert choice.record["error_refit"] < 1e-4 < choice.record["error_sliced"]
    assert choice.fit is not None and choice.fit[0].shape == (12, 8)


def test_dropped_mean_moves_into_the_bias() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4000, 6))
    x[:, 5] = 4.0 + 0.01 * rng.standard_normal(4000)  # a nearly constant unit, dropped
    w = rng.standard_normal((6, 3))
    choice = choose_output(x[:2000], np.arange(5), w, np.ones(3), x_check=x[2000:],
                           reconstruct=True)
    record = choice.record
    assert record["error_bias"] < 0.01 * record["error_sliced"]
    assert record["kept"] in ("bias", "refit")


def test_without_reconstruction_only_slicing_is_measured() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((100, 10))
    choice = choose_output(x, np.arange(5), rng.standard_normal((10, 4)), None,
                           reconstruct=False)
    assert choice.fit is None and choice.record == {"error_sliced": choice.record[
        "error_sliced"], "kept": "sliced"}


def test_compile_records_which_output_each_pruned_block_kept(
        tmp_path: Path, word_calibration: tuple[Path, Path]) -> None:
    text, vocab = word_calibration
    plan = {"layers": [{"heads": 2, "ffn": 48}, {"heads": 3, "ffn": 96}]}
    result = compile_plan(fixture_path("bert", "dynamo"), tmp_path / "out", plan_data=plan,
                          calibration=text, tokenizer=vocab, seq_len=16)
    for layer in result.report["layers"]:
        for key in ("attn", "ffn_fit"):
            record = layer[key]
            assert record["kept"] in ("sliced", "bias", "refit")
            assert _kept_error(record) == min(v for k, v in record.items()
                                              if k.startswith("error_"))
            assert _kept_error(record) <= record["error_sliced"]
