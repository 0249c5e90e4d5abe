"""OUT is one atomic unit: kill -9 at every step, concurrent compiles, stale temporaries.

A compile is killed (PLANER_TEST_KILL_AT, compiler/outdir.py) at each step of writing
and committing a second, different output set over a first one. Right after the kill
OUT must hold the old set exactly, or a commit journal that the next reader finishes;
after a read (`planer inspect OUT/model.onnx`) it holds the old or the new set exactly,
with a manifest that matches every file, and no temporary is left.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from planer.compiler import emit, outdir
from planer.compiler.driver.cli import main
from planer.compiler.errors import BadInputError

TIMEOUT_S = 300
HALF_PLAN = {"layers": [{"heads": 2, "ffn": 64}, {"heads": 4, "ffn": 32}]}
# Every step of write_outputs + commit, in order, for a set with an external data file.
STEPS = ["locked", "saved", "staged", "journal", "moved:model.onnx", "moved:model.onnx.data",
         "moved:plan.json", "moved:report.json", "manifest"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT with its weights in model.onnx.data, so a set has four files."""
    from planer.fixtures.build import fixture_path

    folder = tmp_path_factory.mktemp("external")
    proto = onnx.load(str(fixture_path("bert", "torchscript")))
    onnx.save_model(copy.deepcopy(proto), str(folder / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    return folder / "model.onnx"


def _compile(model: Path, out: Path, *extra: str, kill_at: str | None = None,
             wait: bool = True) -> subprocess.Popen[str] | subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != outdir.KILL_ENV}
    if kill_at is not None:
        env[outdir.KILL_ENV] = kill_at
    argv = [sys.executable, "-m", "planer.compiler.driver.cli", "compile", str(model), "-o",
            str(out), "--ort-kernels", "off", *extra]
    if not wait:
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def _snapshot(out: Path) -> dict[str, str]:
    """planer's visible files in OUT (its outputs and manifest) and their sha256."""
    names = {*emit.OWN_FILES, outdir.MANIFEST_NAME}
    return {p.name: outdir.file_record(p)["sha256"] for p in out.iterdir() if p.name in names}


def _consistent(out: Path) -> dict[str, str]:
    """Checks every file matches the manifest and no other planer file is there; returns
    the model, data and plan hashes (report.json carries the compile's timing)."""
    manifest = outdir.read_manifest(out)
    assert manifest is not None
    files = _snapshot(out)
    listed = {name: record["sha256"] for name, record in manifest["files"].items()}
    assert files == {**listed, outdir.MANIFEST_NAME: files[outdir.MANIFEST_NAME]}
    return _stable(files)


def _stable(files: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in files.items() if k in ("model.onnx", "model.onnx.data", "plan.json")}


@pytest.fixture(scope="module")
def two_sets(model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, Path]:
    """The old (neutral plan) and new (smaller plan) output sets, compiled undisturbed."""
    root = tmp_path_factory.mktemp("sets")
    plan = root / "plan.json"
    plan.write_text(json.dumps(HALF_PLAN))
    sets = []
    for name, extra in (("old", ()), ("new", ("--plan", str(plan)))):
        done = _compile(model, root / name, *extra)
        assert done.returncode == 0, done.stderr[-2000:]
        sets.append(_consistent(root / name))
    assert sets[0]["model.onnx"] != sets[1]["model.onnx"]
    return sets[0], sets[1], plan


@pytest.mark.parametrize("step", STEPS)
def test_kill_at_any_step_leaves_one_whole_set(step: str, model: Path, two_sets: tuple,
                                               tmp_path: Path) -> None:
    old, new, plan = two_sets
    out = tmp_path / "out"
    shutil.copytree(plan.parent / "old", out)
    (out / "notes.txt").write_text("the user's")
    killed = _compile(model, out, "--plan", str(plan), kill_at=step)
    assert killed.returncode == -9, killed.stderr[-2000:]
    committed = STEPS.index(step) >= STEPS.index("journal")
    assert (out / outdir.JOURNAL_NAME).is_dir() == committed
    if not committed:
        assert _stable(_snapshot(out)) == old
        assert _snapshot(out) == _snapshot(plan.parent / "old")
    # A reader finishes a committed set before reading it.
    assert main(["inspect", str(out / "model.onnx")]) == 0
    assert _consistent(out) == (new if committed else old)
    # The next writer to take the lock removes what the dead one left.
    with outdir.output_lock(out):
        pass
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert (out / "notes.txt").read_text() == "the user's"


def test_second_compile_into_a_locked_out_is_refused(model: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from planer.compiler.outdir import output_lock\n"
         f"with output_lock(Path({str(out)!r})):\n print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert main(["compile", str(model), "-o", str(out), "--ort-kernels", "off"]) == 2
        err = capsys.readouterr().err
        assert f"is being written by another planer process (pid {holder.pid})" in err
        assert sorted(p.name for p in out.iterdir()) == [outdir.LOCK_NAME]
    finally:
        holder.communicate("", timeout=TIMEOUT_S)
    assert not out.exists()  # the holder created OUT, wrote nothing, and removed it again


def test_two_concurrent_compiles_never_mix(model: Path, two_sets: tuple, tmp_path: Path) -> None:
    old, new, plan = two_sets
    out = tmp_path / "out"
    runs = [_compile(model, out, wait=False), _compile(model, out, "--plan", str(plan),
                                                       wait=False)]
    results = [run.communicate(timeout=TIMEOUT_S) for run in runs]
    codes = [run.returncode for run in runs]
    assert sorted(codes) in ([0, 0], [0, 2]), [r[1][-1500:] for r in results]
    for code, (_, err) in zip(codes, results, strict=True):
        if code == 2:
            assert "is being written by another planer process (pid" in err
    assert _consistent(out) in (old, new)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_stale_temporaries_of_dead_processes_go(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = out / f"{outdir.TMP_PREFIX}{dead.stdout.strip()}-abc"
    legacy = out / f"{outdir.TMP_PREFIX}xyz123"  # planer before pids in the name
    mine = out / f"{outdir.TMP_PREFIX}{os.getpid()}-live"
    for folder in (stale, legacy, mine):
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"\0" * 1024)
    with outdir.output_lock(out):
        pass
    assert sorted(p.name for p in out.iterdir()) == [mine.name]


def test_failed_compile_leaves_nothing(model: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "deep" / "out"
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"layers": [{"heads": 9}] * 2}))
    assert main(["compile", str(model), "-o", str(out), "--plan", str(plan)]) == 2
    assert "asks for 9 heads" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_commit_folder_renames_the_model_and_replaces_the_old_set(model: Path,
                                                                  tmp_path: Path) -> None:
    """The latency search's path: a verified round becomes OUT under another name."""
    out, round_ = tmp_path / "out", tmp_path / "round"
    assert main(["compile", str(model), "-o", str(out), "--ort-kernels", "off"]) == 0
    assert main(["compile", str(model), "-o", str(round_), "--ort-kernels", "off"]) == 0
    renamed = {emit.MODEL_NAME: emit.UNREACHABLE_NAME,
               emit.DATA_NAME: f"{emit.UNREACHABLE_NAME}.data"}
    expected = sorted(renamed.get(name, name) for name in _snapshot(round_))
    emit.commit_folder(round_, out, model_name=emit.UNREACHABLE_NAME,
                       report={"tool": "planer", "target_met": False})
    _consistent(out)
    assert sorted(_snapshot(out)) == expected  # model.onnx and its data are gone
    moved = onnx.load(str(out / emit.UNREACHABLE_NAME))  # reads the renamed data file
    assert moved.graph.initializer[0].raw_data
    assert json.loads((out / "report.json").read_text())["target_met"] is False


def test_reader_refuses_a_model_beside_another_sets_data(model: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    out = tmp_path / "out"
    assert main(["compile", str(model), "-o", str(out), "--ort-kernels", "off"]) == 0
    data = out / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[-4:] = b"\x7f\x7f\x7f\x7f"  # another set's bytes, same size
    data.write_bytes(bytes(raw))
    assert main(["inspect", str(out / "model.onnx")]) == 2
    assert "mixes two output sets: model.onnx.data" in capsys.readouterr().err
    with pytest.raises(BadInputError, match="mixes two output sets"):
        outdir.check_readable(out / "model.onnx")
