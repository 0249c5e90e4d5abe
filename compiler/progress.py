"""Progress a long step reports: status lines, and bars with counts and an ETA.

The CLI makes one `Progress` and hands it down as `progress=`; code below only calls it.

    code                              on a terminal                  piped (CI logs, files)
    progress("fitting routers")    ─▶ spinner line, replaced      "fitting routers"
    with progress.bar("fit", 30) as bar:
        bar.advance(loss=0.12)     ─▶ ━━━━╸━━ 12/30 0:04 loss 0.12  "fit: 3/30 (10%) ... loss 0.12"
                                                                    at start, every ~10%, at end

A `Progress` is a `Callable[[str], None]`, so it fits every existing `progress=` parameter.
Code that wants bars takes `progress: ProgressLike | None` and opens with
`progress = as_progress(progress)`: None becomes `quiet` (a `NullProgress`), a plain callable
gets bars reported through it as status lines, a `Progress` passes through. Example:

    def fit_all(layers, *, progress: ProgressLike | None = None) -> None:
        progress = as_progress(progress)
        progress("fitting layers")
        with progress.bar("fitting layers", total=len(layers)) as bar:
            for layer in layers:
                bar.advance(loss=fit(layer))
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress
from rich.text import Text

ProgressLike = Callable[[str], None]
PLAIN_STEPS = 10  # plain output prints a bar about every 1/PLAIN_STEPS of its total


class Bar:
    """One counted step; `advance` moves it (the null bar: does nothing)."""

    def advance(self, n: int = 1, **fields: Any) -> None:
        """Counts `n` more items done; `fields` (loss=..., fidelity=...) are shown beside."""

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(failed=kind is not None)

    def close(self, *, failed: bool = False) -> None:
        """Ends the bar (called by the `with` block)."""


class NullProgress:
    """Progress that shows nothing: the default of library calls, and `quiet`."""

    def __call__(self, message: str) -> None:
        """Shows a status line (here: nothing)."""

    def bar(self, label: str, total: int) -> Bar:
        """Returns a context manager counting `total` items of the step `label`."""
        return Bar()


quiet = NullProgress()


class CallbackProgress(NullProgress):
    """Progress through a plain `Callable[[str], None]`: bars become status lines."""

    def __init__(self, say: ProgressLike):
        self.say = say

    def __call__(self, message: str) -> None:
        self.say(message)

    def bar(self, label: str, total: int) -> Bar:
        return _PlainBar(self.say, label, total)


def as_progress(progress: ProgressLike | NullProgress | None) -> NullProgress:
    """Returns `progress` as an object with `bar()`: None is `quiet`, a callable is wrapped."""
    if progress is None:
        return quiet
    if isinstance(progress, NullProgress):
        return progress
    return CallbackProgress(progress)


class Progress(NullProgress):
    """Progress on a console: rich bars on a terminal, plain lines otherwise.

    Use it as a context manager; the live display runs only inside the `with` block (outside
    it, and whenever the console is not a terminal, it prints plain lines).
    """

    def __init__(self, console: Console | None = None, *, live: bool | None = None):
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.live = self.console.is_terminal if live is None else live
        self._rich: RichProgress | None = None
        self._status: TaskID | None = None

    def __enter__(self) -> Progress:
        if self.live:
            self._rich = RichProgress(
                SpinnerColumn(), TextColumn("{task.description}"), _Counted(BarColumn()),
                _Counted(MofNCompleteColumn()), _Counted(TimeElapsedColumn()),
                _Counted(TimeRemainingColumn()), TextColumn("{task.fields[info]}"),
                console=self.console, transient=True)
            self._rich.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._rich is not None:
            self._rich.stop()
        self._rich = self._status = None

    def __call__(self, message: str) -> None:
        if self._rich is None:
            self.console.print(message, markup=False, highlight=False)
        elif self._status is None:
            self._status = self._rich.add_task(message, total=None, info="")
        else:
            self._rich.update(self._status, description=message)

    def bar(self, label: str, total: int) -> Bar:
        if self._rich is None:
            return _PlainBar(self._plain, label, total)
        return _RichBar(self._rich, self.console, label, total)

    def _plain(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False)


class _Counted(ProgressColumn):
    """Shows `inner` for counted tasks only, so a status line is a spinner and text."""

    def __init__(self, inner: ProgressColumn):
        super().__init__()
        self.inner = inner

    def render(self, task: Task) -> Any:
        return self.inner.render(task) if task.total is not None else Text("")


def _fields_text(fields: dict[str, Any]) -> str:
    return "  ".join(f"{k.replace('_', ' ')} {v:.4g}" if isinstance(v, float)
                     else f"{k.replace('_', ' ')} {v}" for k, v in fields.items())


class _RichBar(Bar):
    def __init__(self, rich: RichProgress, console: Console, label: str, total: int):
        self.rich, self.console, self.label, self.total = rich, console, label, total
        self.fields: dict[str, Any] = {}
        self.done = 0
        self.started = time.perf_counter()
        self.task = rich.add_task(label, total=total, info="")

    def advance(self, n: int = 1, **fields: Any) -> None:
        self.done += n
        self.fields.update(fields)
        self.rich.update(self.task, advance=n, info=_fields_text(self.fields))

    def close(self, *, failed: bool = False) -> None:
        done = self.done
        self.rich.remove_task(self.task)
        seconds = time.perf_counter() - self.started
        verdict = "stopped at" if failed else "done,"
        extra = f"  {_fields_text(self.fields)}" if self.fields else ""
        self.console.print(f"{self.label}: {verdict} {done}/{self.total} in {seconds:.1f} s"
                           f"{extra}", markup=False, highlight=False)


class _PlainBar(Bar):
    """Prints the bar as lines: at the start, each time another ~10% is done, at the end."""

    def __init__(self, say: ProgressLike, label: str, total: int):
        self.say, self.label, self.total = say, label, max(0, total)
        self.done, self.shown = 0, 0
        self.fields: dict[str, Any] = {}
        self.started = time.perf_counter()
        say(f"{label}: 0/{self.total}")

    def advance(self, n: int = 1, **fields: Any) -> None:
        self.done += n
        self.fields.update(fields)
        step = max(1, self.total // PLAIN_STEPS)
        if self.done - self.shown >= step and self.done < self.total:
            self.shown = self.done
            elapsed = time.perf_counter() - self.started
            eta = elapsed / self.done * (self.total - self.done)
            extra = f"  {_fields_text(self.fields)}" if self.fields else ""
            self.say(f"{self.label}: {self.done}/{self.total} ({self.done / self.total:.0%}) "
                     f"{elapsed:.1f} s, about {eta:.0f} s left{extra}")

    def close(self, *, failed: bool = False) -> None:
        seconds = time.perf_counter() - self.started
        verdict = "stopped at" if failed else "done,"
        extra = f"  {_fields_text(self.fields)}" if self.fields else ""
        self.say(f"{self.label}: {verdict} {self.done}/{self.total} in {seconds:.1f} s{extra}")


@contextlib.contextmanager
def counted(progress: ProgressLike | NullProgress | None, label: str,
            total: int) -> Iterator[Bar]:
    """Opens a bar on any progress argument (None, a callable or a Progress)."""
    with as_progress(progress).bar(label, total) as bar:
        yield bar
