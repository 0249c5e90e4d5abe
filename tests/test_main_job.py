"""The README's main command, run from a copy of the repository with no ../shared beside it.

A clone on a user's machine has no ../shared: the main job must find its model and its
calibration text inside the package. The copy's own code is imported (PYTHONPATH), so a
file that only exists in this checkout's surroundings cannot make it pass.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from planer.compiler.driver.defaults import CALIBRATION_NOTE

REPO = Path(__file__).resolve().parents[1]


def _copy_tracked(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = REPO / name
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        elif source.is_file():
            shutil.copy2(source, target)


@pytest.mark.slow
def test_the_main_command_runs_from_a_copy_without_shared(tmp_path: Path) -> None:
    copy = tmp_path / "clone" / "planer"
    _copy_tracked(copy)
    assert not (copy.parent / "shared").exists()
    env = {**os.environ, "PYTHONPATH": str(copy)}
    probe = subprocess.run([sys.executable, "-c", "import planer.compiler; "
                            "print(planer.compiler.__file__)"], cwd=copy, env=env,
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip().startswith(str(copy))
    # The README's command, `planer compile --target-latency 50% -o out/minilm`.
    run = subprocess.run([sys.executable, "-m", "planer", "compile", "--target-latency", "50%",
                          "-o", "out/minilm"], cwd=copy, env=env, capture_output=True,
                         text=True, timeout=1800)
    said = run.stdout + run.stderr
    # 3 is an honest miss on a machine too busy to keep its own latency model; anything else
    # is a failure of the job itself.
    assert run.returncode in (0, 3), said
    assert CALIBRATION_NOTE in said
    out = copy / "out" / "minilm"
    report = json.loads((out / "report.json").read_text())
    assert "calibration_en.txt" in report["calibration"]["source"]
    assert (out / "report.html").exists()
    if run.returncode == 0:
        assert (out / "model.onnx").exists()
        assert report["target_met"] is True
        # About 0.87 on held-out bundled sentences on a quiet machine; the bound catches a
        # broken model, not a busy machine's weaker latency model.
        assert report["fidelity"]["pooled_cosine"]["mean"] > 0.5
