"""planer's Python API: the README example runs, results are typed, errors are planer's own."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import planer
from planer.compiler.driver.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
MODEL_LINE = re.compile(r"^model = None  #.*$", re.MULTILINE)


def readme_example() -> str:
    """Returns the ```python block of the README's "Python API" section."""
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 1, "the Python API section should hold one python example"
    return blocks[0]


def _run(code: str, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(cwd)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    return printed.getvalue()


@pytest.fixture(scope="module")
def tiny() -> Path:
    from planer.fixtures.build import fixture_path

    return fixture_path("bert")


def test_readme_example_runs_on_a_tiny_model(tiny: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    code = readme_example()
    assert MODEL_LINE.search(code), "the example names its model on one `model = None` line"
    printed = _run(MODEL_LINE.sub(f"model = {str(tiny)!r}", code), tmp_path, monkeypatch)
    assert "2 encoder layers, 139,397 parameters" in printed
    assert (tmp_path / "out" / "api-flops50" / "model.onnx").is_file()
    assert not (tmp_path / "out" / "never").exists()
    assert re.search(r"refused \(exit code 2\): target_latency '0%'", printed)
    assert "layer 0: heads [4, " in printed


@pytest.mark.slow
def test_readme_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    printed = _run(readme_example(), tmp_path, monkeypatch)
    assert "6 encoder layers, 22,565,382 parameters" in printed
    report = json.loads((tmp_path / "out" / "api-flops50" / "report.json").read_text())
    assert "calibration_en.txt" in report["calibration"]["source"]  # the bundled text
    assert report["flops_ratio"] <= 0.5


def test_inspect_matches_the_cli_json(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = planer.inspect(tiny, seq_len=64)
    assert main(["inspect", str(tiny), "--json", "--seq-len", "64"]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert summary.to_dict() == cli
    assert [layer.heads for layer in summary.layers] == [la["heads"] for la in cli["layers"]]
    assert summary.layers[1].flops == cli["layers"][1]["flops"] and summary.path == tiny


def test_compile_with_a_plan_returns_a_typed_result(tiny: Path, tmp_path: Path) -> None:
    plan = {"layers": [{"heads": 2, "ffn": 64}, {"heads": 4, "ffn": 128}]}
    result = planer.compile(tiny, out=tmp_path / "out", plan=plan, seq_len=16)
    assert isinstance(result, planer.CompileResult)
    assert result.model_path == tmp_path / "out" / "model.onnx" and result.model_path.is_file()
    assert [(la.heads, la.ffn) for la in result.plan.layers] == [(2, 64), (4, 128)]
    assert result.target_met is None and result.measured_ms is None
    assert result.report == json.loads((tmp_path / "out" / "report.json").read_text())
    assert result.calibration is None  # no tokenizer for this model: nothing to default to
    again = planer.diff(tiny, result.model_path)
    assert not again.identical
    assert [row["heads"] for row in again.layers] == [[4, 2], [4, 4]]
    assert "<!DOCTYPE html>" in again.html()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"plan": {"layers": []}, "target_flops": 0.5}, "give one of plan, target_flops"),
    ({"target_flops": 0.5, "passes": ["prune", "fold"]}, "unknown pass(es) fold"),
    ({"target_flops": 0.5, "batch": 0}, "batch must be a whole number"),
    ({"target_latency": "fast"}, "is not a latency"),
    ({"target_latency": "nan%"}, "is not a latency"),
    ({"target_latency": "150%"}, "is not a latency"),
    ({"plan": {"layers": [{"heads": 9, "ffn": 64}] * 2}}, "asks for 9 heads"),
])
def test_bad_arguments_raise_planers_error(tiny: Path, tmp_path: Path, kwargs: dict,
                                           message: str) -> None:
    with pytest.raises(planer.BadInputError, match=re.escape(message)) as caught:
        planer.compile(tiny, out=tmp_path / "out", **kwargs)
    assert caught.value.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_unreachable_latency_carries_the_written_result(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(planer.TargetUnreachableError) as caught:
        planer.compile(tiny, out=tmp_path / "out", target_latency="0.001ms", seq_len=16)
    result = caught.value.result
    assert isinstance(result, planer.CompileResult) and result.target_met is False
    assert result.model_path.name == "fastest-missed-target.onnx" and result.model_path.is_file()
    assert caught.value.exit_code == 3


def test_import_planer_stays_cheap() -> None:
    code = ("import sys, planer; planer.compile; planer.CompileResult; planer.PlanerError; "
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'onnx_ir', 'numpy') "
            "if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert run.stdout.strip() == "[]"


def test_compile_calibration_samples_default_is_the_clis() -> None:
    # Written out in the signature so `import planer` stays cheap (no numpy import).
    import inspect

    from planer.compiler.calibration import DEFAULT_SAMPLES

    default = inspect.signature(planer.compile).parameters["calibration_samples"].default
    assert default == DEFAULT_SAMPLES
