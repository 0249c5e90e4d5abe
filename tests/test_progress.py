"""Progress: plain lines off a terminal, rich bars on one, nothing when quiet; profiling's bar."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console

from planer.compiler.progress import NullProgress, Progress, as_progress, quiet
from planer.cost_model import profile as profile_mod
from planer.cost_model.profile import BlockShape, Measurement, ProfileStore, profile_blocks


def _console(*, terminal: bool) -> tuple[Console, io.StringIO]:
    sink = io.StringIO()
    return Console(file=sink, force_terminal=terminal, width=120, soft_wrap=True), sink


def test_plain_lines_at_start_every_tenth_and_end() -> None:
    console, sink = _console(terminal=False)
    with Progress(console) as progress:
        assert not progress.live
        progress("reading [CLS] tokens")  # brackets are text, not rich markup
        with progress.bar("fitting", total=40) as bar:
            for i in range(40):
                bar.advance(loss=1.0 / (i + 1))
    lines = sink.getvalue().splitlines()
    assert lines[0] == "reading [CLS] tokens"
    assert lines[1] == "fitting: 0/40"
    middle = lines[2:-1]
    assert [int(re.match(r"fitting: (\d+)/40 \(", m).group(1)) for m in middle] == \
        list(range(4, 40, 4))  # one line per 10%
    assert "about" in middle[0] and "loss 0.25" in middle[0]
    assert re.fullmatch(r"fitting: done, 40/40 in \d+\.\d s  loss 0\.025", lines[-1])


def test_plain_bar_says_where_it_stopped() -> None:
    console, sink = _console(terminal=False)
    progress = Progress(console)
    with pytest.raises(ValueError), progress.bar("rounds", total=4) as bar:
        bar.advance()
        raise ValueError("interrupted")
    assert sink.getvalue().splitlines()[-1].startswith("rounds: stopped at 1/4 in ")


def test_terminal_shows_rich_bar_then_a_done_line() -> None:
    console, sink = _console(terminal=True)
    with Progress(console) as progress:
        assert progress.live
        progress("status")
        with progress.bar("profiling", total=5) as bar:
            for _ in range(5):
                bar.advance(fidelity=0.9)
    text = sink.getvalue()
    assert "\x1b[" in text  # drawn with terminal control codes
    assert re.search(r"profiling: done, 5/5 in \d+\.\d s  fidelity 0\.9", text)


def test_null_and_callable_progress() -> None:
    assert as_progress(None) is quiet and isinstance(quiet, NullProgress)
    with quiet.bar("x", total=3) as bar:
        bar.advance(3)  # does nothing, raises nothing
    said: list[str] = []
    wrapped = as_progress(said.append)
    wrapped("status")
    with wrapped.bar("steps", total=2) as bar:
        bar.advance()
        bar.advance()
    assert said[:2] == ["status", "steps: 0/2"]
    assert said[-1].startswith("steps: done, 2/2")
    progress = Progress(_console(terminal=False)[0])
    assert as_progress(progress) is progress


def test_profile_blocks_counts_every_timed_run(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    def fake_measure(kind, shape, units, *, repeats, progress):
        for done in range(1, repeats + 1):
            progress(done, repeats)
        return [Measurement(kind, u, 0.01 * u) for u in units]

    monkeypatch.setattr(profile_mod, "_measure", fake_measure)
    shape = BlockShape(batch=1, tokens=8, hidden=64, head_size=16, threads=1)
    store = ProfileStore(1, tmp_path / "p.sqlite")
    said: list[str] = []
    profile_blocks(shape, [0, 1, 2], [0, 32, 64, 128], store=store, repeats=5,
                   progress=said.append)
    assert said[0] == "timing 2 attention + 3 FFN block variants (5 rounds): 0/25"
    assert said[-1].startswith("timing 2 attention + 3 FFN block variants (5 rounds): done, "
                               "25/25 in ")
    said.clear()
    profile_blocks(shape, [1, 2], [64], store=store, progress=said.append)
    assert said == []  # everything stored: no bar at all
