"""Bad input: exit code 2, one clear sentence, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from planer.compiler.driver.cli import main
from planer.fixtures.build import fixture_path
from tests.conftest import cnn_model


# The tiny random BERT has the real MiniLM's file layout (dynamo: external data beside the
# graph; torchscript: one file) at a fraction of the cost, so these run in the default suite.
@pytest.fixture(scope="module")
def tiny_dynamo() -> Path:
    return fixture_path("bert", "dynamo")


@pytest.fixture(scope="module")
def tiny_torchscript() -> Path:
    return fixture_path("bert", "torchscript")


def _fails(args: list[str], capsys: pytest.CaptureFixture[str], *, contains: str) -> str:
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines  # one sentence, last, no trace
    assert contains in errors[0], errors[0]
    return errors[0]


def test_not_onnx(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model\n" * 10)
    _fails(["inspect", str(bad)], capsys, contains="not a readable ONNX model")
    _fails(["compile", str(bad), "-o", str(tmp_path / "out")], capsys, contains="ONNX")
    assert not (tmp_path / "out").exists()


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(["inspect", str(tmp_path / "nope.onnx")], capsys, contains="does not exist")


def test_truncated_file(tiny_torchscript: Path, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    data = tiny_torchscript.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    _fails(["compile", str(cut), "-o", str(tmp_path / "out")], capsys, contains="cut.onnx")
    assert not (tmp_path / "out").exists()


def test_missing_external_data(tiny_dynamo: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    lone = tmp_path / "model.onnx"
    shutil.copy(tiny_dynamo, lone)
    _fails(["inspect", str(lone)], capsys, contains="missing beside it")


def test_truncated_external_data(tiny_dynamo: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(tiny_dynamo, tmp_path / "model.onnx")
    data = (tiny_dynamo.parent / "model.onnx.data").read_bytes()
    (tmp_path / "model.onnx.data").write_bytes(data[: len(data) // 3])
    _fails(["inspect", str(tmp_path / "model.onnx")], capsys, contains="truncated")


def test_cnn_has_no_transformer_layers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cnn = cnn_model(tmp_path / "cnn.onnx")
    _fails(["compile", str(cnn), "-o", str(tmp_path / "out")], capsys,
           contains="no Transformer layers were found")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("plan", "message"), [
    ({"layers": [{"heads": 2, "ffn": 64}] * 1}, "the plan has 1 layers but the model has 2"),
    ({"layers": [{"heads": 5, "ffn": 64}] * 2}, "asks for 5 heads, but that layer has 4"),
    ({"layers": [{"heads": 2, "ffn": 4000}] * 2}, "asks for 4000 ffn"),
    ({"layers": [{"heads": 2, "experts": 4}] * 2}, "unknown field(s) experts"),
    ({"layers": [{"heads": "two"}] * 2}, "must be a whole number"),
    ({"stages": []}, '"layers" list'),
])
def test_plan_that_does_not_fit(plan: dict, message: str, tiny_torchscript: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    _fails(["compile", str(tiny_torchscript), "--plan", str(path), "-o", str(tmp_path / "out")],
           capsys, contains=message)
    assert not (tmp_path / "out").exists()


def test_plan_not_json(tiny_torchscript: Path, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "plan.json"
    path.write_text("{heads: 6")
    _fails(["compile", str(tiny_torchscript), "--plan", str(path), "-o", str(tmp_path / "o")],
           capsys, contains="not valid JSON")


def test_output_is_the_input(tiny_dynamo: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(tiny_dynamo, folder / "model.onnx")
    shutil.copy(tiny_dynamo.parent / "model.onnx.data", folder / "model.onnx.data")
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    _fails(["compile", str(folder / "model.onnx"), "-o", str(folder / "model.onnx")], capsys,
           contains="points at the input model")
    _fails(["compile", str(folder / "model.onnx"), "-o", str(folder)], capsys,
           contains="would overwrite the input model")
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_output_folder_with_user_files(tiny_torchscript: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text('{"mine": true}')
    _fails(["compile", str(tiny_torchscript), "-o", str(out)], capsys,
           contains="that planer did not write")
    assert json.loads((out / "report.json").read_text()) == {"mine": True}


def test_recompile_into_own_output_replaces_it(tiny_torchscript: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["compile", str(tiny_torchscript), "-o", str(out)]) == 0
    (out / "notes.txt").write_text("keep me")
    assert main(["compile", str(tiny_torchscript), "-o", str(out)]) == 0
    assert (out / "notes.txt").read_text() == "keep me"
    assert not [p for p in out.iterdir() if p.name.startswith(".planer-tmp")]


@pytest.mark.parametrize("target", [["--target-flops", "0.5"], ["--target-latency", "50%"]])
def test_calibration_samples_too_few(target: list[str], tiny_torchscript: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    # Refused before any profiling or fitting: one sample leaves nothing held out.
    _fails(["compile", str(tiny_torchscript), *target, "--calibration-samples", "1",
            "-o", str(tmp_path / "out")], capsys,
           contains="--calibration-samples must be at least 2")
    assert not (tmp_path / "out").exists()


def test_calibration_samples_read(tiny_torchscript: Path, tmp_path: Path) -> None:
    import numpy as np

    from planer.compiler.calibration import model_input_infos, random_feeds
    from planer.compiler.loading import load_model

    feeds = random_feeds(model_input_infos(load_model(tiny_torchscript)), batch=40, seq_len=16,
                         vocab_size=100, seed=0)
    np.savez(tmp_path / "inputs.npz", **feeds)
    out = tmp_path / "out"
    assert main(["compile", str(tiny_torchscript), "--target-flops", "0.7", "--calibration",
                 str(tmp_path / "inputs.npz"), "--calibration-samples", "12", "--seq-len", "16",
                 "-o", str(out)]) == 0
    calibration = json.loads((out / "report.json").read_text())["calibration"]
    assert (calibration["fit_samples"], calibration["holdout_samples"]) == (9, 3)
