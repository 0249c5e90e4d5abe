"""Token skimming through `planer compile`: plans, FLOPs targets, reports, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from planer.compiler.driver.cli import main
from planer.fixtures.build import fixture_path
from tests.conftest import run_ort, text_feeds


def _compile(tmp_path: Path, calibration: tuple[Path, Path], *extra: str) -> dict:
    text, vocab = calibration
    out = tmp_path / "out"
    code = main(["compile", str(fixture_path("bert", "dynamo")), "--calibration", str(text),
                 "--tokenizer", str(vocab), "--seq-len", "16", "-o", str(out), *extra])
    assert code == 0
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    return json.loads((out / "report.json").read_text())


def test_plan_with_skim_reports_kept_tokens(tmp_path: Path,
                                            word_calibration: tuple[Path, Path]) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"layers": [{"heads": 3}, {"skim_keep": 0.5}]}))
    report = _compile(tmp_path, word_calibration, "--plan", str(plan))
    kept = report["skim"]["mean_kept_tokens_per_layer"]
    assert kept[1] < kept[0] * 0.75  # half of the still-active tokens enter layer 1
    assert report["skim"]["score"] == "fitted"
    assert report["layers"][1]["skim_keep"] == 0.5
    assert report["flops_ratio"] < 1.0
    out = run_ort(tmp_path / "out" / "model.onnx",
                  text_feeds(batch=3, seq_len=16, vocab=44, pad_last=6))[0]
    assert out.shape == (3, 16, 64) and np.isfinite(out).all()
    # The forwarding map the skimmed model measured best on held-out calibration is the
    # one in the graph (passes/skim_forward.py: with or without the kept rows' mean).
    refit = report["skim"]["predictors"]["layer1"]["forward_skimmed"]
    graph = onnx.load(str(tmp_path / "out" / "model.onnx")).graph
    initializers = {i.name for i in graph.initializer}
    if refit["kept"] == "context":
        choice = report["skim"]["forward_choice"]
        scores = choice["holdout_pooled_cosine"]
        assert choice["kept"] == max(scores, key=scores.get)
        assert ("layer1/skim/forward/v" in initializers) == (choice["kept"] == "context")
    else:
        assert "forward_choice" not in report["skim"]
        assert "layer1/skim/forward/v" not in initializers


def test_target_flops_with_skim_only(tmp_path: Path, word_calibration: tuple[Path, Path]) -> None:
    report = _compile(tmp_path, word_calibration, "--target-flops", "0.7", "--passes", "skim")
    assert report["flops_ratio"] <= 0.7
    assert all(la["heads"]["after"] == 4 for la in report["layers"])  # pruning not allowed
    assert any("skim_keep" in la for la in report["layers"])


def test_tensorrt_lowering_has_no_nonzero_or_scatter(tmp_path: Path,
                                                     word_calibration: tuple[Path, Path]) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"layers": [{}, {"skim_keep": 0.5}]}))
    _compile(tmp_path, word_calibration, "--plan", str(plan), "--target-runtime", "tensorrt")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.node}
    assert not ops & {"NonZero", "ScatterND", "ScatterElements"}


def test_skim_before_layer0_needs_calibration(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"layers": [{"skim_keep": 0.5}, {}]}))
    code = main(["compile", str(fixture_path("bert", "dynamo")), "--plan", str(plan),
                 "-o", str(tmp_path / "o")])
    assert code == 2
    assert "needs a fitted predictor" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_skim_before_layer0_compiles_without_dead_mask_nodes(
        tmp_path: Path, word_calibration: tuple[Path, Path]) -> None:
    # Every layer's mask comes from the skim point, so the model's own mask path must go
    # (the stage runner refuses a stage that leaves dead nodes behind).
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"layers": [{"skim_keep": 0.5}, {}]}))
    report = _compile(tmp_path, word_calibration, "--plan", str(plan))
    assert report["layers"][0]["skim_keep"] == 0.5
    out = run_ort(tmp_path / "out" / "model.onnx",
                  text_feeds(batch=2, seq_len=16, vocab=44, pad_last=5))[0]
    assert out.shape == (2, 16, 64) and np.isfinite(out).all()


@pytest.mark.slow
def test_skim_on_a_model_whose_first_output_is_not_the_hidden_states(tmp_path: Path) -> None:
    # paraphrase-MiniLM-L3-v2's output 0 is an Identity of input_ids; skim reports and
    # fidelity must read the hidden states (regression: this crashed with a TypeError).
    from planer.fixtures.build import minilm_tokenizer_dir, paraphrase_l3_path

    try:
        src = paraphrase_l3_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(f"a short sentence number {i} about films and news"
                              for i in range(64)) + "\n")
    out = tmp_path / "out"
    code = main(["compile", str(src), "--calibration", str(text), "--tokenizer",
                 str(minilm_tokenizer_dir()), "--seq-len", "16", "--target-flops", "0.7",
                 "--passes", "skim", "-o", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert 0.0 < report["fidelity"]["pooled_cosine"]["mean"] <= 1.0
    assert "token_cosine" in report["fidelity"]
    assert report["skim"]["mean_kept_tokens_per_layer"][-1] < 16


@pytest.mark.parametrize("scale", [0.0, 3.0])
def test_context_maps_kept_only_where_the_skimmed_model_measures_them_better(
        scale: float, tmp_path: Path, word_calibration: tuple[Path, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The tiny fixture's refit keeps the linear map; context maps are forced in here: a
    # zero context weight ties or wins (the refit on skimmed rows), a large random one loses.
    import dataclasses

    from planer.compiler.driver import stages
    from planer.passes import skim_fit

    def forced(*args: object, **kwargs: object) -> tuple[dict, dict]:
        maps, records = skim_fit.fit_context(*args, **kwargs)
        rng = np.random.default_rng(0)
        maps = {i: dataclasses.replace(m, v=(scale * rng.standard_normal(m.w.shape) / 8)
                                       .astype(np.float32)) for i, m in maps.items()}
        return maps, {i: {**r, "kept": "context"} for i, r in records.items()}

    monkeypatch.setattr(stages, "fit_context", forced)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"layers": [{}, {"skim_keep": 0.5}]}))
    report = _compile(tmp_path, word_calibration, "--plan", str(plan))
    choice = report["skim"]["forward_choice"]
    scores = choice["holdout_pooled_cosine"]
    assert set(scores) == {"linear", "context"}
    assert choice["kept"] == max(scores, key=scores.get)
    if scale:
        assert choice["kept"] == "linear"
    graph = onnx.load(str(tmp_path / "out" / "model.onnx")).graph
    kept_v = "layer1/skim/forward/v" in {i.name for i in graph.initializer}
    assert kept_v == (choice["kept"] == "context")
    # The report's held-out pooled cosine is the kept candidate's own measurement.
    assert report["fidelity"]["pooled_cosine"]["mean"] == pytest.approx(scores[choice["kept"]],
                                                                         abs=1e-4)
