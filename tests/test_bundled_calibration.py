"""The bundled calibration text: shipped in the package, licensed, and used when none is given."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from planer.compiler.driver.cli import main
from planer.compiler.driver.defaults import (
    CALIBRATION_NOTE,
    bundled_calibration,
    default_calibration,
)

REPO = Path(__file__).resolve().parents[1]


def test_corpus_is_thousands_of_distinct_english_sentences() -> None:
    lines = bundled_calibration().read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3000
    assert len(set(lines)) == len(lines)
    assert all(line.strip() == line and len(line.split()) >= 6 for line in lines)
    assert all(line.isascii() and line[0].isupper() for line in lines)
    words = {w.lower().strip(".,;?!'`") for line in lines for w in line.split()}
    assert len(words) > 5000  # diverse text, not one template repeated


def test_source_and_licence_travel_with_the_text() -> None:
    note = (bundled_calibration().parent / "CALIBRATION_SOURCE.md").read_text()
    assert "WordNet 3.0" in note and "Princeton University" in note
    assert "Permission to use, copy, modify and distribute" in note  # the licence itself
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    shipped = data["tool"]["setuptools"]["package-data"]["planer"]
    assert "data/*.txt" in shipped and "data/*.md" in shipped


def test_default_applies_only_where_a_plan_is_fitted_from_readable_text(tmp_path: Path) -> None:
    tok, mine = tmp_path / "tok", tmp_path / "mine.txt"
    assert default_calibration(None, tok, fits=True) == bundled_calibration()
    assert default_calibration(mine, tok, fits=True) == mine  # the user's file wins
    assert default_calibration(None, None, fits=True) is None  # no tokenizer: text unusable
    assert default_calibration(None, tok, fits=False) is None  # neutral plan: nothing to fit


@pytest.mark.slow
def test_compile_without_calibration_uses_the_bundled_text(
        minilm_torchscript: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from planer.fixtures.build import minilm_tokenizer_dir

    out = tmp_path / "out"
    code = main(["compile", str(minilm_torchscript), "--tokenizer", str(minilm_tokenizer_dir()),
                 "--plan", str(REPO / "examples" / "minilm-half.json"), "-o", str(out)])
    assert code == 0
    assert CALIBRATION_NOTE in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["synthetic"] is False
    assert "calibration_en.txt" in report["calibration"]["source"]
    assert report["fidelity"]["pooled_cosine"]["mean"] > 0.5  # calibrated refit, real text
