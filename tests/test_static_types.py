"""mypy checks the package, and it sees planer's types (it cannot pass blind).

Under an import hook (the old editable install) every `planer.*` import was `Any`, so
mypy passed whatever the code did. The planted file below assigns an int to a
ModelSpec: mypy must report it, which it can only do when it follows `planer.*` imports
to their source. Both runs use the project's own configuration (pyproject.toml).

Slow: a cold mypy run over the package takes minutes on a small CPU (about 6 s warm).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "pyproject.toml"

pytestmark = pytest.mark.slow


def _mypy(args: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[str, int]:
    api = pytest.importorskip("mypy.api", reason="mypy comes with the dev extras")
    # From the repository root: the config's `files` and package bases are relative to it.
    monkeypatch.chdir(ROOT)
    stdout, stderr, status = api.run(["--config-file", str(CONFIG), *args])
    return stdout + stderr, status


def test_package_is_type_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    output, status = _mypy([], monkeypatch)
    assert status == 0, output


def test_mypy_reports_a_planted_type_error(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # A fresh module name: mypy's cache would otherwise replay an earlier run's verdict.
    planted = tmp_path / f"planted_{uuid.uuid4().hex}.py"
    planted.write_text("from planer.compiler.spec import ModelSpec\n\nx: ModelSpec = 3\n")
    output, status = _mypy([str(planted)], monkeypatch)
    assert status == 1, output
    assert (f"{planted}:3: error: Incompatible types in assignment (expression has type "
            '"int", variable has type "ModelSpec")') in output, output
