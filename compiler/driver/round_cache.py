"""Keeps the latency rounds' compiled plans, so a later compile measures them without compiling.

    round plan ─ key: the source model's bytes, the calibration feeds, the plan, planer's
                 version and emission version, batch, sequence length, threads and the
                 ORT-kernel spelling (anchors.kernel_spelling)
      ─ compiled, verified and written once per key, then copied into <cache>/rounds/<key>/
        (atomically: a folder renamed in)
      ─ copied into the round's folder by a later compile with the same key, and timed
        afresh like every round

What a plan compiles to depends only on the key: the kept units and refits are fitted on
the calibration feeds (their activations are cached exactly, fit_cache), INT8 is dynamic
quantization of fixed weights. How fast it runs does not, so no timing is kept. Plans with
MoE layers are compiled every time: their lowering follows kernel timings of the moment.
The ROUNDS_KEPT entries used last are kept; older ones are deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import planer
from planer.compiler import emit
from planer.compiler.cache import cache_dir
from planer.compiler.driver.pipeline import CompileResult
from planer.compiler.plan import Plan

ROUNDS_KEPT = 12  # compiled plans kept (each a whole model: ~65 MB for MiniLM)
ROUNDS_BYTES = 2 << 30  # and at most this many bytes of them, however large the model


def compile_round(
    plan: Plan, folder: Path, *, key: Mapping[str, Any],
    compile_into: Callable[[Path], CompileResult],
) -> tuple[CompileResult, bool]:
    """Returns `plan` compiled into `folder` (copied from the cache where stored).

    `compile_into(folder)` compiles it when it is not stored. Returns the result and
    whether it came from the cache.
    """
    if any(la.moe is not None for la in plan.layers):
        return compile_into(folder), False
    stored = cache_dir("rounds") / _digest(plan, key)
    if (stored / emit.MODEL_NAME).exists() and (stored / "report.json").exists():
        try:
            shutil.copytree(stored, folder)
            os.utime(stored)  # used now: the last to be evicted
            report = json.loads((folder / "report.json").read_text())
            return CompileResult(folder / emit.MODEL_NAME, plan, report), True
        except (OSError, ValueError):  # evicted or half-read meanwhile: compile it
            shutil.rmtree(folder, ignore_errors=True)
    result = compile_into(folder)
    _store(folder, stored)
    _evict(stored.parent, ROUNDS_KEPT, ROUNDS_BYTES)
    return result, False


def _digest(plan: Plan, key: Mapping[str, Any]) -> str:
    data = {**key, "plan": plan.to_dict(), "planer": planer.__version__,
            "emission": emit.EMISSION_VERSION}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]


def _store(folder: Path, stored: Path) -> None:
    """Copies a compiled round beside `stored` and renames it in (a reader never sees half)."""
    scratch = Path(tempfile.mkdtemp(prefix=".storing-", dir=stored.parent))
    try:
        shutil.copytree(folder, scratch / "round")
        # Another planer may have stored the same round first: keep theirs.
        with contextlib.suppress(OSError):
            os.replace(scratch / "round", stored)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _evict(root: Path, keep: int, max_bytes: int | None = None) -> None:
    """Deletes all but the `keep` entries used last, and older ones past `max_bytes`.

    The newest entry stays whatever its size.
    """
    def used(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:  # evicted by another planer meanwhile
            return 0.0

    entries = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    entries.sort(key=used, reverse=True)
    total = 0
    for i, entry in enumerate(entries):
        total += _size(entry)
        if i >= keep or (i > 0 and max_bytes is not None and total > max_bytes):
            shutil.rmtree(entry, ignore_errors=True)


def _size(folder: Path) -> int:
    try:
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    except OSError:  # evicted by another planer meanwhile
        return 0
