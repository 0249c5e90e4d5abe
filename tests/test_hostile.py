"""The hostile-input corpus (tests/hostile/make_corpus.py) through `planer inspect/compile`.

Every run ends with exit 2 and one sentence naming the real cause (a keyword per case),
or with a correct acceptance; never exit 1, never a hang; nothing is written into -o on
a refusal and no planer temporary is left anywhere. Runs that would hang or exhaust
memory if planer regressed (FIFOs, /dev/zero, inf/nan targets, huge lengths) always run
in a subprocess with a timeout and an address-space cap; the rest run in-process, and
the slow test runs every one of them as a real process too.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from planer.compiler import outdir
from planer.compiler.driver.cli import main
from tests.hostile.make_corpus import Run, corpus_runs, write_corpus

ROOT = Path("/corpus-root")  # placeholder at collection; runs are rebased onto the real root
RUNS = {run.name: run for run in corpus_runs(ROOT)}
TIMEOUT_S = 180  # generous: a loaded 2-core machine; a hang never ends at all
MEMORY_CAP = 6 << 30


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    write_corpus(root)
    return root


def _argv(run: Run, root: Path, out: Path) -> list[str]:
    return [a.replace(str(ROOT), str(root)).replace("{out}", str(out)) for a in run.argv]


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def _in_subprocess(argv: list[str], cwd: Path) -> tuple[int, str]:
    try:
        done = subprocess.run([sys.executable, "-m", "planer.compiler.driver.cli", *argv],
                              capture_output=True, text=True, timeout=TIMEOUT_S, cwd=cwd,
                              stdin=subprocess.DEVNULL, preexec_fn=_cap_memory)
    except subprocess.TimeoutExpired:
        pytest.fail(f"planer {' '.join(argv)} still ran after {TIMEOUT_S} s (a hang)")
    return done.returncode, done.stderr


def _check(run: Run, code: int, stderr: str, out: Path, root: Path) -> None:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if run.expect == "accept":
        assert code == 0, lines[-3:]
        if run.argv[0] == "compile":
            manifest = outdir.read_manifest(out)
            assert manifest is not None
            assert {n: outdir.file_record(out / n) for n in manifest["files"]} == \
                manifest["files"]
    else:
        assert code == 2, (code, lines[-5:])
        last = lines[-1]
        # The CLI's own sentence, or argparse's one line for a value it refuses to parse.
        assert last.startswith(("error:", "planer compile: error:", "planer inspect: error:"))
        assert sum("error:" in line for line in lines) == 1, lines
        assert "Traceback" not in stderr and "WARNING" not in stderr, stderr
        assert run.keyword.lower() in last.lower(), last
        assert not out.exists(), sorted(p.name for p in out.iterdir())
    strays = list(root.rglob(".planer*"))
    assert strays == [], strays


@pytest.mark.parametrize("name", sorted(RUNS))
def test_hostile_input(name: str, corpus: Path, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    run = RUNS[name]
    out = tmp_path / "out"
    argv = _argv(run, corpus, out)
    if run.subprocess:
        code, stderr = _in_subprocess(argv, tmp_path)
    else:
        cwd = Path.cwd()
        os.chdir(tmp_path)  # `-o ''` must not write into the repository if it regressed
        try:
            code = _main(argv)
        finally:
            os.chdir(cwd)
        stderr = capsys.readouterr().err
    _check(run, code, stderr, out, corpus)
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["out"])


def _main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse refuses a value by exiting
        return int(exc.code or 0)


@pytest.mark.slow
def test_every_run_as_a_process(corpus: Path, tmp_path: Path) -> None:
    """The whole corpus as a user runs it: one capped, timed process per run, two at a time."""
    def one(run: Run) -> tuple[Run, int, str, Path]:
        folder = tmp_path / run.name
        folder.mkdir()
        code, stderr = _in_subprocess(_argv(run, corpus, folder / "out"), folder)
        return run, code, stderr, folder / "out"

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(one, RUNS.values()))
    failures = []
    for run, code, stderr, out in results:
        try:
            _check(run, code, stderr, out, corpus)
        except AssertionError as exc:
            failures.append(f"{run.name}: {str(exc)[:300]}")
    assert failures == [], "\n".join(failures)


def test_corpus_script_lists_every_run(tmp_path: Path) -> None:
    """`python -m tests.hostile.make_corpus DIR` writes the corpus and prints its runs."""
    done = subprocess.run([sys.executable, "-m", "tests.hostile.make_corpus", str(tmp_path)],
                          capture_output=True, text=True, timeout=TIMEOUT_S,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    names = [json.loads(line)["name"] for line in done.stdout.splitlines()]
    assert sorted(names) == sorted(RUNS)
    assert (tmp_path / "good" / "model.onnx").is_file()
