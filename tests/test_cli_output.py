"""What the CLI prints: -v before or after the subcommand, uncut piped tables, quiet libraries."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from planer.compiler.driver import pipeline
from planer.compiler.driver.cli import main
from planer.compiler.driver.quiet import quiet_libraries

REPO = Path(__file__).resolve().parents[1]


def _boom(*_args: object, **_kwargs: object) -> None:
    raise RuntimeError("boom inside planer")


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("command", ["inspect", "compile"])
def test_verbose_anywhere_prints_the_trace(where: str, command: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from planer.fixtures.build import fixture_path

    monkeypatch.setattr(pipeline, "read_model" if command == "inspect" else "compile_plan",
                        _boom)
    model = fixture_path("bert")  # a real file: compile checks its input before compiling
    args = [command, str(model)] + (["-o", str(tmp_path / "o")] if command == "compile" else [])
    argv = ["-v", *args] if where == "before" else [*args, "-v"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert "RuntimeError: boom inside planer" in err
    assert err.strip().splitlines()[-1] == "internal error: RuntimeError: boom inside planer"


def test_without_verbose_no_trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(pipeline, "read_model", _boom)
    assert main(["inspect", str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "(run with -v for the trace)" in err


def test_verbose_turns_on_planers_debug_log_and_restores_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    def log_then_fail(*_args: object, **_kwargs: object) -> None:
        logging.getLogger("planer.compiler.driver.pipeline").debug("a debug detail")
        raise RuntimeError("x")

    monkeypatch.setattr(pipeline, "read_model", log_then_fail)
    before = logging.getLogger().level, logging.getLogger("planer").level
    main(["inspect", str(tmp_path / "m.onnx"), "-v"])
    assert "DEBUG planer.compiler.driver.pipeline: a debug detail" in capsys.readouterr().err
    main(["inspect", str(tmp_path / "m.onnx")])
    assert "a debug detail" not in capsys.readouterr().err
    assert (logging.getLogger().level, logging.getLogger("planer").level) == before


@pytest.mark.slow
def test_inspect_piped_prints_every_digit(minilm_dynamo: Path) -> None:
    # A real pipe (not pytest's capture), at the narrow width rich would otherwise assume.
    env = {**os.environ, "COLUMNS": "80"}
    run = subprocess.run([sys.executable, "-m", "planer", "inspect", str(minilm_dynamo)],
                         capture_output=True, text=True, timeout=300, env=env, check=False)
    assert run.returncode == 0, run.stderr
    rows = [line for line in run.stdout.splitlines() if "1,772,928" in line]
    assert len(rows) == 6, run.stdout  # every layer's parameter count, uncut
    assert "…" not in run.stdout
    assert "activation" in run.stdout and "parameters 22,565,382" in run.stdout


def test_quiet_libraries_silences_other_loggers_and_warnings_then_restores() -> None:
    exporter = logging.getLogger("torch.onnx._internal.exporter._registration")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    exporter.addHandler(keep)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with quiet_libraries():
                exporter.warning("torchvision is not installed")
                warnings.warn_explicit("noise", UserWarning, "x.py", 1, module="torch.onnx")
                warnings.warn_explicit("ours", UserWarning, "y.py", 1, module="planer.api")
            warnings.warn_explicit("noise again", UserWarning, "x.py", 2, module="torch.onnx")
        assert records == []
        assert [str(w.message) for w in caught] == ["ours", "noise again"]
        exporter.warning("after the block")
        assert [r.getMessage() for r in records] == ["after the block"]
        with quiet_libraries(verbose=True):
            exporter.warning("verbose shows it")
        assert records[-1].getMessage() == "verbose shows it"
    finally:
        exporter.removeHandler(keep)


def test_quiet_libraries_turns_transformers_bars_off_inside_only() -> None:
    hf_logging = pytest.importorskip("transformers.utils.logging")
    assert hf_logging.is_progress_bar_enabled()
    with quiet_libraries(export=True):
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()


@pytest.mark.parametrize("export", [True, False])
def test_quiet_export_survives_torchs_import_time_logging_setup(export: bool) -> None:
    """Importing torch resets its loggers' levels; quiet_libraries(export=True) imports it first."""
    pytest.importorskip("torch")
    code = ("import logging\n"
            "from planer.compiler.driver.quiet import quiet_libraries\n"
            f"with quiet_libraries(export={export}):\n"
            "    import torch.onnx\n"
            "    logging.getLogger('torch.onnx._internal.exporter._registration')"
            ".warning('torchvision is not installed')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True)
    # Without export=True the warning gets through: the reason the flag exists.
    assert ("torchvision is not installed" in run.stderr) is not export, run.stderr


@pytest.mark.slow
def test_first_use_export_prints_only_planers_lines(tmp_path: Path) -> None:
    """A fresh cache exports the bundled model: no torch or transformers noise on stderr."""
    env = {**os.environ, "PLANER_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-m", "planer", "inspect", "--json"],
                         capture_output=True, text=True, timeout=900, env=env, check=False,
                         cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip().splitlines() == [
        "using the bundled all-MiniLM-L6-v2 (exported to ONNX on first use)"], run.stderr
