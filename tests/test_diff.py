"""`planer diff`: correspondence, per-layer deltas, divergence, and honest failure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from planer.compiler.diff import diff_models
from planer.compiler.errors import PlanerError
from tests.conftest import cnn_model

PLAN = {"layers": [{"heads": 12, "ffn": 1536}, {"heads": 8, "ffn": 640},
                   {"heads": 6, "ffn": 1024}, {"heads": 12, "ffn": 512},
                   {"heads": 4, "ffn": 1536}, {"heads": 10, "ffn": 768}]}


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Runs `planer diff` through the real CLI when it is wired, else through diff_cli alone."""
    import argparse

    from planer.compiler.driver import cli
    from planer.compiler.driver.diff_cli import add_parser

    sub_actions = [a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction)]
    if sub_actions and "diff" in sub_actions[0].choices:
        code = cli.main(argv)
    else:
        parser = argparse.ArgumentParser(prog="planer")
        add_parser(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(argv)
        try:
            code = int(args.run(args))
        except PlanerError as exc:
            print(f"error: {exc}", file=__import__("sys").stderr)
            code = exc.exit_code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_feeds(path: Path, *, vocab: int, batch: int = 2, seq_len: int = 24,
                token_types: bool = True) -> Path:
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(1000 if vocab > 2000 else 5, vocab, (batch, seq_len)),
             "attention_mask": np.ones((batch, seq_len), dtype=np.int64)}
    if token_types:
        feeds["token_type_ids"] = np.zeros((batch, seq_len), dtype=np.int64)
    np.savez(path, **{k: v.astype(np.int64) for k, v in feeds.items()})
    return path


@pytest.fixture(scope="module")
def minilm_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Returns (dense MiniLM, the model compiled to PLAN, sample inputs)."""
    from planer.compiler.driver.pipeline import compile_plan
    from planer.fixtures.build import minilm_path

    root = tmp_path_factory.mktemp("diff")
    result = compile_plan(minilm_path("dynamo"), root / "out", plan_data=PLAN)
    return minilm_path("dynamo"), result.model_path, write_feeds(root / "x.npz", vocab=30522)


@pytest.mark.slow
def test_minilm_json_names_every_layer_and_the_first_divergent_node(
        minilm_pair: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    dense, compiled, inputs = minilm_pair
    code, out, _ = run_cli(["diff", str(dense), str(compiled), "--json", "--inputs", str(inputs)],
                           capsys)
    assert code == 0
    data = json.loads(out)
    assert [(r["a"], r["b"]) for r in data["layers"]] == [(i, i) for i in range(6)]
    assert [r["heads"] for r in data["layers"]] == [[12, p["heads"]] for p in PLAN["layers"]]
    assert [r["ffn"] for r in data["layers"]] == [[1536, p["ffn"]] for p in PLAN["layers"]]
    assert data["layers"][1]["changes"][:2] == ["heads 12->8", "FFN 1536->640"]
    assert data["layers"][1]["projections"] == dict.fromkeys(("q", "k", "v", "o", "w1", "w2"),
                                                             "sliced")
    # ort_kernels spells layer 1's attention residual Add as Sum (block layer1/attn).
    assert sorted(data["layers"][1]["passes"]) == ["head_pruning", "ort_kernels"]
    assert data["unmatched"]["layers_a"] == [] and data["unmatched"]["layers_b"] == []
    assert data["totals"]["params"][1] < data["totals"]["params"][0]
    assert data["totals"]["flops"][1] < data["totals"]["flops"][0]
    assert data["plan"] == PLAN and data["report"]["tool"] == "planer"
    div = data["divergence"]
    # Layer 0 keeps everything; layer 1 is the first whose numbers change.
    assert [b["diverged"] for b in div["boundaries"][:4]] == [False] * 4
    assert div["first_divergent_boundary"]["name"] == "layer1/attn/out"
    assert div["first_divergent_node"]["name"].startswith("layer1/attn/o/")
    assert div["outputs"][0]["diverged"]


@pytest.mark.slow
def test_minilm_text_output(minilm_pair: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    from rich.console import Console

    from planer.compiler.driver import diff_cli

    monkeypatch.setattr(diff_cli, "out", Console(width=200, soft_wrap=True))
    dense, compiled, inputs = minilm_pair
    code, out, _ = run_cli(["diff", str(dense), str(compiled), "--inputs", str(inputs)], capsys)
    assert code == 0
    for text in ("heads 12->8, FFN 1536->640", "FFN 1536->512", "heads 12->4", "totals:",
                 "first divergent node: layer1/attn/o/", "written by planer"):
        assert text in out, text


def test_model_against_itself_reports_no_changes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from planer.fixtures.build import fixture_path

    bert = fixture_path("bert", "dynamo")
    inputs = write_feeds(tmp_path / "x.npz", vocab=1000)
    code, out, _ = run_cli(["diff", str(bert), str(bert), "--json", "--inputs", str(inputs)],
                           capsys)
    assert code == 0
    data = json.loads(out)
    assert data["identical"]
    assert all(r["changes"] == [] and r["status"] == "paired" for r in data["layers"])
    assert data["totals"]["nodes"]["changed"] == 0
    assert data["totals"]["nodes"]["added"] == data["totals"]["nodes"]["removed"] == 0
    assert data["divergence"]["first_divergent_node"] is None
    assert all(b["max_abs"] == 0.0 for b in data["divergence"]["boundaries"])


def test_unrelated_models_are_reported_unmatched(capsys: pytest.CaptureFixture[str]) -> None:
    from planer.fixtures.build import fixture_path

    bert, gpt2 = fixture_path("bert", "dynamo"), fixture_path("gpt2", "dynamo")
    code, out, _ = run_cli(["diff", str(bert), str(gpt2), "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["unmatched"]["layers_a"] == [0, 1]
    assert not data["identical"]
    assert all(r["status"] == "unmatched" for r in data["layers"])
    # Whatever the block finder makes of GPT-2, none of its layers pairs with BERT's.
    assert data["unmatched"]["layers_b"] == list(range(data["b"]["layers"] or 0))
    assert data["unmatched"]["nodes_a"] and data["unmatched"]["nodes_b"]


def test_models_without_layers_diff_node_by_node(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    a, b = cnn_model(tmp_path / "a.onnx", 0), cnn_model(tmp_path / "b.onnx", 1)
    x = tmp_path / "x.npz"
    np.savez(x, x=np.ones((1, 3, 8, 8), dtype=np.float32))
    code, out, _ = run_cli(["diff", str(a), str(b), "--json", "--inputs", str(x)], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["layers"] == [] and any("no Transformer layers" in n for n in data["notes"])
    statuses = {n["a"]: (n["status"], n["why"]) for n in data["outside"]["node_list"]}
    assert statuses["conv"] == ("changed", "weights") and statuses["relu"][0] == "same"
    assert data["divergence"]["first_divergent_node"]["name"] == "conv"


def test_diff_finds_no_layers_without_crashing_in_code(tmp_path: Path) -> None:
    a = cnn_model(tmp_path / "a.onnx", 0)
    diff = diff_models(a, a)
    assert diff.to_dict()["identical"]


def test_bad_input_is_one_sentence_and_exit_2(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    a = cnn_model(tmp_path / "a.onnx", 0)
    code, _, err = run_cli(["diff", str(a), str(tmp_path / "missing.onnx")], capsys)
    assert code == 2 and "does not exist" in err
    bad = tmp_path / "x.npz"
    np.savez(bad, y=np.ones(3))
    code, _, err = run_cli(["diff", str(a), str(a), "--inputs", str(bad)], capsys)
    assert code == 2 and "has no array 'x'" in err
