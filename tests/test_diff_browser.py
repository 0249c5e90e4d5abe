"""The `planer diff --html` page in a real headless Chromium: self-contained, no JS errors.

Chromium runs offline (no network flags, a throwaway profile); the page records its own
script errors on `<body data-js-errors>`, read back from the DOM Chromium dumps after the
scripts ran. The screenshot lands in artifacts/ (gitignored) for a human to look at.
Install the browser with scripts/install-browser.sh; without it the test skips.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_diff import minilm_pair, run_cli  # noqa: F401  (fixture re-export)

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--hide-scrollbars"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("chromium is not installed (run scripts/install-browser.sh)")


def _browser(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
def test_html_page_renders_offline_without_errors(
        minilm_pair: tuple[Path, Path, Path], tmp_path: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    binary = _chromium()
    dense, compiled, inputs = minilm_pair
    page = tmp_path / "diff.html"
    code, _, _ = run_cli(["diff", str(dense), str(compiled), "--inputs", str(inputs),
                          "--html", str(page)], capsys)
    assert code == 0
    text = page.read_text()
    # Self-contained: nothing is fetched from anywhere.
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:|//)""", text)
    assert "@import" not in text and "url(" not in text

    dom = _browser(binary, tmp_path / "profile", "--enable-logging=stderr", "--v=0",
                   "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console  # no console messages at all (errors, CSP refusals)
    html = dom.stdout
    assert 'data-js-errors="0"' in html
    assert 'data-ready="1"' in html  # the script ran to its end
    assert html.count("class=\"layer\"") == 6  # one row per layer in the side-by-side SVG
    assert "attn 8h" in html and "FFN 640" in html  # layer 1 on the B side
    assert re.search(r'id="js-summary"[^>]*>6 layer rows; \d+ changed', html)
    assert "First divergent node" in html and "layer1/attn/o/" in html
    assert 'id="planer-plan"' in html and 'id="layer-5"' in html

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "diff_minilm.png"
    shot.unlink(missing_ok=True)
    run = _browser(binary, tmp_path / "profile", f"--screenshot={shot}",
                   "--window-size=1400,900", page.as_uri())
    assert run.returncode == 0, run.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1400, 900)
    assert len(data) > 20_000  # a blank page compresses to a few kilobytes
