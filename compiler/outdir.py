"""The output folder OUT as one atomic unit: a lock, a commit journal and a manifest.

    lock OUT/.planer.lock (flock; pid inside) ─▶ finish a pending journal, remove the
    temporaries of dead writers ─▶ stage OUT/.planer-tmp-<pid>-*/ (every file, then
    planer-manifest.json naming each with its size and sha256) ─▶ fsync
    ─▶ rename the stage to OUT/.planer-commit        ◀── the commit point
    ─▶ remove the old files the new set replaces, move each file into OUT, the
       manifest last ─▶ remove the journal ─▶ unlock

OUT holds user files too, so it cannot be swapped as a whole folder, and several files
cannot be renamed into it in one step. The journal makes the set atomic all the same:
before the commit point OUT is exactly as it was; from it on, the journal alone holds
what is needed to finish, and whoever takes the lock next (a compile, or `inspect`,
`diff` or a compile reading a model in OUT) rolls it forward before anything else. A
kill at any moment therefore leaves the old complete set or, once finished, the new one.

The lock is held for a whole compile (`output_lock`, re-entrant within a process), so a
second planer writing the same OUT is refused in one sentence naming the holder's pid.
Temporaries carry their writer's pid in their name; those of dead processes are removed
under the lock. `PLANER_TEST_KILL_AT=<checkpoint>` makes the process kill itself at a
named step: the tests kill a commit at every step and read OUT back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from planer.compiler.errors import BadInputError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "planer-manifest.json"
LOCK_NAME = ".planer.lock"
JOURNAL_NAME = ".planer-commit"
TMP_PREFIX = ".planer-tmp-"
SEARCH_PREFIX = ".planer-search-"
_REMOVE_NAME = ".remove.json"  # inside the journal: old planer files the new set replaces
_OWNER = re.compile(r"^\.planer-(?:tmp|search)-(\d+)-")
KILL_ENV = "PLANER_TEST_KILL_AT"


@dataclasses.dataclass
class _Held:
    fd: int
    count: int
    created: list[Path]  # folders this lock created, deepest first


_held: dict[Path, _Held] = {}
_held_guard = threading.Lock()


def checkpoint(name: str) -> None:
    """Kills this process at step `name` when the tests ask for it (PLANER_TEST_KILL_AT)."""
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def output_lock(out_dir: Path) -> Iterator[Path]:
    """Holds OUT's lock for the block, creating OUT; yields OUT's resolved path.

    Re-entrant within a process. On entry a pending journal is finished and dead
    writers' temporaries are removed. On exit the lock file goes, and folders this lock
    created go too if they are still empty (a failed compile writes nothing).

    Raises:
        BadInputError: OUT cannot be created or written, or another process holds it.
    """
    out = resolve_output(out_dir)
    with _held_guard:
        held = _held.get(out)
        if held is not None:
            held.count += 1
    if held is None:
        held = _lock(out, out_dir)
    try:
        yield out
    finally:
        with _held_guard:
            held.count -= 1
            last = held.count == 0
            if last:
                del _held[out]
        if last:
            _release(out, held)


def _lock(out: Path, shown: Path) -> _Held:
    """Creates OUT, takes its lock, finishes a pending commit and clears dead temporaries."""
    created = _make_folder(out, shown)
    try:
        held = _Held(_acquire(out, shown), 1, created)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        checkpoint("locked")
        roll_forward(out)
        remove_stale(out)
    except BaseException:
        _release(out, held)
        raise
    with _held_guard:
        _held[out] = held
    return held


def holds_lock(out_dir: Path) -> bool:
    """Tells whether this process holds OUT's lock."""
    with _held_guard:
        return resolve_output(out_dir) in _held


def resolve_output(out_dir: Path) -> Path:
    """Returns OUT as an absolute path with symbolic links resolved.

    Raises:
        BadInputError: the path is a symbolic link loop or too long.
    """
    try:
        return out_dir.resolve()
    except RuntimeError as exc:  # Python 3.11 reports a symlink loop this way
        raise BadInputError(f"-o {out_dir} is a symbolic link loop.") from exc
    except OSError as exc:
        raise BadInputError(f"-o {out_dir} cannot be used ({_reason(exc)}).") from exc


def staging_folder(out: Path, kind: str = "tmp") -> Path:
    """Creates a temporary folder inside OUT named after this process (cleanable if it dies)."""
    prefix = TMP_PREFIX if kind == "tmp" else SEARCH_PREFIX
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=out))


def commit(staged: Path, out: Path, *, replaces: Iterable[str] = ()) -> dict[str, Any]:
    """Makes the files in `staged` OUT's output set in one atomic step; returns the manifest.

    `staged` must be a folder inside OUT holding only the new files. `replaces` names
    planer's own files of an earlier set; those the new set lacks are removed. The
    caller holds OUT's lock.
    """
    names = sorted(p.name for p in staged.iterdir())
    manifest = {"tool": "planer", "files": {n: file_record(staged / n) for n in names}}
    _write_synced(staged / _REMOVE_NAME,
                  json.dumps(sorted(set(replaces) - set(names) - {MANIFEST_NAME})))
    _write_synced(staged / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    for name in names:
        _fsync(staged / name)
    _fsync(staged)
    checkpoint("staged")
    os.rename(staged, out / JOURNAL_NAME)
    _fsync(out)
    checkpoint("journal")
    roll_forward(out)
    return manifest


def roll_forward(out: Path) -> bool:
    """Finishes a commit a killed writer left in OUT's journal; tells whether there was one."""
    journal = out / JOURNAL_NAME
    if not journal.is_dir():
        return False
    manifest_file = journal / MANIFEST_NAME
    if manifest_file.exists():
        manifest = json.loads(manifest_file.read_text())
        removals = journal / _REMOVE_NAME
        for name in json.loads(removals.read_text()) if removals.exists() else []:
            (out / name).unlink(missing_ok=True)
        for name in manifest["files"]:
            if (journal / name).exists():  # absent: moved before the kill
                os.replace(journal / name, out / name)
                checkpoint(f"moved:{name}")
        os.replace(manifest_file, out / MANIFEST_NAME)
        checkpoint("manifest")
    shutil.rmtree(journal)
    _fsync(out)
    return True


def remove_stale(folder: Path) -> list[Path]:
    """Removes temporaries in `folder` whose writing process is gone; returns them."""
    removed = []
    for entry in folder.iterdir():
        match = _OWNER.match(entry.name)
        legacy = entry.name.startswith((TMP_PREFIX, SEARCH_PREFIX)) and match is None
        if (legacy or (match and not _alive(int(match.group(1))))) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    if removed:
        logger.info("removed %d temporaries of dead planer processes in %s", len(removed),
                    folder)
    return removed


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """Returns OUT's manifest, or None when there is none (or it is not planer's)."""
    try:
        data = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == "planer" else None


def file_record(path: Path) -> dict[str, Any]:
    """Returns a file's size and sha256, as the manifest records them."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def check_readable(model_path: Path) -> None:
    """Makes sure a model inside a planer OUT is read whole, never half of two sets.

    A pending journal is rolled forward first (taking OUT's lock). A model and its data
    file of which only one matches the manifest are a mixed set (written by a planer
    without this journal, or by hand) and are refused; both differing means someone
    replaced the model, which is theirs to do.

    Raises:
        BadInputError: another process is writing the folder, or the set is mixed.
    """
    folder = model_path.parent
    if (folder / JOURNAL_NAME).is_dir():
        try:
            with output_lock(folder):
                pass  # taking the lock rolls the journal forward
        except BadInputError as exc:
            raise BadInputError(
                f"{folder} holds an unfinished planer commit that cannot be finished now "
                f"({str(exc).rstrip('.')}).") from exc
    manifest = read_manifest(folder)
    if manifest is None or model_path.name not in manifest["files"]:
        return
    data = f"{model_path.name}.data"
    if data not in manifest["files"] or not (folder / data).exists():
        return
    same = [file_record(folder / n)["sha256"] == manifest["files"][n]["sha256"]
            for n in (model_path.name, data)]
    if same[0] != same[1]:
        stale = model_path.name if not same[0] else data
        raise BadInputError(
            f"{folder} mixes two output sets: {stale} is not the one its {MANIFEST_NAME} "
            "records beside the other file; compile into this folder again.")


# --- lock and folder -------------------------------------------------------------------


def _make_folder(out: Path, shown: Path) -> list[Path]:
    """Creates OUT and its missing parents; returns those created, deepest first."""
    missing = []
    probe = out
    while not probe.exists():
        if probe.is_symlink():  # a dangling or looping link: creating through it fails
            raise BadInputError(f"-o {shown} goes through the broken symbolic link {probe}.")
        missing.append(probe)
        probe = probe.parent
    if not probe.is_dir():
        raise BadInputError(f"-o {shown} cannot be created: {probe} is a file, not a folder.")
    created = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
    except OSError as exc:
        _remove_empty(list(reversed(created)))
        raise BadInputError(f"planer cannot write to -o {shown} ({_reason(exc)}).") from exc
    return list(reversed(created))


def _acquire(out: Path, shown: Path) -> int:
    path = out / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise BadInputError(f"planer cannot write to -o {shown} ({_reason(exc)}).") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise BadInputError(
                f"{shown} is being written by another planer process (pid {pid}); wait for "
                "it to finish or choose another folder.") from None
        # The previous holder may have unlinked the file between our open and flock.
        if _same_file(fd, path):
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _release(out: Path, held: _Held) -> None:
    with contextlib.suppress(OSError):
        (out / LOCK_NAME).unlink()  # while locked: a waiter then re-checks the inode
    os.close(held.fd)
    _remove_empty(held.created)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_synced(path: Path, text: str) -> None:
    path.write_text(text)
    _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems refuse fsync on folders
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _reason(exc: OSError) -> str:
    return (exc.strerror or type(exc).__name__).lower()
