"""OUT/report.html: the compile report page, rendered from real compiles of a tiny model.

The latency page comes from a real `--target-latency` compile (a tiny BERT at 32 tokens,
word-level calibration so every round has a fidelity figure); it is opened in headless
Chromium as tests/test_diff_browser.py opens the diff page (offline, a throwaway profile,
the page's own error counter read back from the dumped DOM) and a screenshot lands in
artifacts/. The plan page comes from compile_plan and is checked as text.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import planer
from planer.compiler.driver.pipeline import compile_plan
from planer.compiler.driver.report_html import render_report_html
from tests.test_diff_browser import ARTIFACTS, _browser, _chromium


@pytest.fixture(scope="module")
def latency_compile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, planer.CompileResult]:
    from planer.fixtures.build import fixture_path

    root = tmp_path_factory.mktemp("report")
    text, vocab = _word_calibration(root)
    model = fixture_path("bert")
    try:
        result = planer.compile(model, out=root / "out", target_latency="60%", seq_len=32,
                                calibration=text, tokenizer=vocab)
    except planer.TargetUnreachableError as exc:  # a busy machine: the page shows a miss
        result = exc.result
    return model, result


def _word_calibration(root: Path) -> tuple[Path, Path]:
    import numpy as np

    rng = np.random.default_rng(0)
    text = root / "calib.txt"
    text.write_text("\n".join(" ".join(f"w{j}" for j in rng.integers(0, 40, rng.integers(4, 14)))
                              for _ in range(120)))
    vocab = root / "tok"
    vocab.mkdir()
    (vocab / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
                                               + [f"w{i}" for i in range(40)]) + "\n")
    return text, vocab


def test_latency_report_renders_offline_without_errors(
        latency_compile: tuple[Path, planer.CompileResult], tmp_path: Path) -> None:
    binary = _chromium()
    model, result = latency_compile
    report = result.report
    page = tmp_path / "report.html"
    page.write_text(render_report_html(report, model, result.model_path), encoding="utf-8")
    text = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:|//)""", text)
    assert "@import" not in text and "url(" not in text

    dom = _browser(binary, tmp_path / "profile", "--enable-logging=stderr", "--v=0",
                   "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert not [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    html = dom.stdout
    assert 'data-js-errors="0"' in html and 'data-ready="1"' in html
    # Plan per layer, one row each, with the compiled head counts.
    plan_rows = re.findall(r"<tr class=\"(?:changed|same)\"><td>(\d)</td><td>([^<]*)</td>", html)
    assert [int(i) for i, _ in plan_rows] == [0, 1]
    for (_, heads), layer in zip(plan_rows, report["layers"], strict=True):
        h = layer["heads"]
        assert heads == (str(h["before"]) if h["before"] == h["after"]
                         else f"{h['before']} → {h['after']}")
    # Latency target, measured and predicted, as the report has them.
    for card, key in (("card-target", "target_ms"), ("card-measured", "measured_ms"),
                      ("card-predicted", "predicted_ms"), ("card-dense", "baseline_ms")):
        assert re.search(rf'id="{card}">[^<]*<b[^>]*>{report[key]:.2f} ms</b>', html), card
    # The plot: one point per round, the chosen one ringed, the target line.
    assert html.count('class="round') == len(report["rounds"]) >= 1
    assert html.count('class="round chosen"') == 1
    assert 'id="target-line"' in html
    # Fidelity figures, and the block diff's view wired by its script.
    pooled = report["fidelity"]["pooled_cosine"]
    assert re.search(rf"pooled cosine</td><td>{pooled['mean']:.4f}</td><td>{pooled['p5']:.4f}",
                     html)
    assert html.count('class="layer"') == 2
    assert re.search(r'id="js-summary"[^>]*>2 layer rows; \d+ changed', html)

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report_tiny_bert.png"
    shot.unlink(missing_ok=True)
    run = _browser(binary, tmp_path / "profile", f"--screenshot={shot}",
                   "--window-size=1400,1800", page.as_uri())
    assert run.returncode == 0, run.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000  # a blank page compresses to a few kilobytes


def test_plan_report_without_latency_target(tmp_path: Path) -> None:
    from planer.fixtures.build import fixture_path

    model = fixture_path("bert")
    plan = {"layers": [{"heads": 2, "ffn": 64}, {"heads": 4, "ffn": 96}]}
    result = compile_plan(model, tmp_path / "out", plan_data=plan, seq_len=16)
    html = render_report_html(result.report, model, result.model_path)
    assert "No latency target was given" in html and "id='tradeoff'" not in html
    assert "4 → 2" in html and "128 → 64" in html and "128 → 96" in html
    assert "No held-out fidelity" in html  # compiled without calibration
    assert html.count("class='layer'") == 2  # the block view still compares both models


def test_unreadable_compiled_model_leaves_a_note(tmp_path: Path) -> None:
    from planer.fixtures.build import fixture_path

    model = fixture_path("bert")
    result = compile_plan(model, tmp_path / "out", seq_len=16)
    broken = tmp_path / "broken.onnx"
    broken.write_text("not a model")
    html = render_report_html(result.report, model, broken)
    assert "id='diff-unavailable'" in html and "broken.onnx" in html
    assert "document.body.dataset.ready='1'" in html


def test_latency_report_shows_the_search(
        latency_compile: tuple[Path, planer.CompileResult]) -> None:
    model, result = latency_compile
    report = result.report
    search = report["search"]
    assert [la["index"] for la in search["layers"]] == [0, 1]
    for layer, applied in zip(search["layers"], report["plan"]["layers"], strict=True):
        assert layer["chosen"]["variant"] == applied  # the variant chosen is the one applied
        assert layer["measured"]["heads"] and layer["measured"]["ffn"]
        assert layer["alternatives"]  # what the search weighed against it
        assert all(a["variant"] != applied for a in layer["alternatives"])
    assert search["recovery"] and set(search["weights"]) == {"prune", "int8", "moe", "skim"}
    page = render_report_html(report, model, result.model_path)
    assert "id='search-layers'" in page
    assert page.count("<tr class='changed'><td class='l'>") == 2  # one chosen row per layer
