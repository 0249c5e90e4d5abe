"""Keeps what a compile measures on its calibration data, so a second compile reads it back.

    source model bytes + calibration feeds + settings ─▶ key (sha256)
      ─ <cache>/activations/<key>.npz  the layers' captured activations (capture_layers)
      ─ <cache>/quality/<key>.json     the quality model's single-change losses
      ─ <cache>/quality/<key>.plans.json  whole plans' measured losses (its interaction fit)

Each depends only on what its key holds: a change to the model's bytes, the calibration
text or its tokenization (the feeds are hashed, so the sequence length they are padded
to counts), or a version below misses the cache and measures again. Files are written
beside their final name and renamed in, so a reader never sees half of one, and two
compiles writing the same key leave one whole file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from planer.compiler.cache import cache_dir
from planer.passes.prune_fit import LayerActivations

logger = logging.getLogger(__name__)

ACTIVATIONS_VERSION = 1  # bump when what capture_layers captures changes
MAX_ACTIVATION_BYTES = 1 << 30  # a larger capture is recomputed each time, not stored
_FIELDS = ("ctx", "attn_residual", "act", "ffn_residual")

Feed = Mapping[str, np.ndarray]


def data_digest(model: ir.Model, feeds: Iterable[Feed]) -> Any:
    """Returns a sha256 object fed with the model's serialized bytes and the feeds' arrays.

    The model's external data is loaded first (as capturing and probing it do anyway), so
    the bytes hashed are its weights rather than a reference to a file beside it.
    """
    ir.external_data.load_to_model(model)
    digest = hashlib.sha256(ir.to_proto(model).SerializeToString())
    _update(digest, feeds)
    return digest


def feeds_digest(feeds: Iterable[Feed]) -> str:
    """Returns the sha256 (hex) of the feeds' names, dtypes, shapes and values."""
    digest = hashlib.sha256()
    _update(digest, feeds)
    return digest.hexdigest()


def _update(digest: Any, feeds: Iterable[Feed]) -> None:
    for feed in feeds:
        for name in sorted(feed):
            array = np.ascontiguousarray(feed[name])
            digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
            digest.update(array.tobytes())


def cached_activations(
    model: ir.Model, batches: Sequence[Feed], capture: Callable[[], list[LayerActivations]],
    *, progress: Callable[[str], None],
) -> list[LayerActivations]:
    """Returns the activations `capture` computes, read from the cache when stored."""
    digest = data_digest(model, batches)
    digest.update(f"activations-v{ACTIVATIONS_VERSION}".encode())
    path = cache_dir("activations") / f"{digest.hexdigest()[:32]}.npz"
    if path.exists():
        acts = _read_activations(path)
        if acts is not None:
            progress("reusing the calibration activations (cached)")
            return acts
    progress("capturing calibration activations")
    acts = capture()
    if sum(getattr(a, f).nbytes for a in acts for f in _FIELDS) <= MAX_ACTIVATION_BYTES:
        arrays = {f"{i}/{f}": getattr(a, f) for i, a in enumerate(acts) for f in _FIELDS}
        scratch = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        with scratch.open("wb") as handle:
            np.savez(handle, **arrays)
        os.replace(scratch, path)
    return acts


def _read_activations(path: Path) -> list[LayerActivations] | None:
    """Reads what cached_activations wrote; None when the file is unreadable."""
    try:
        with np.load(path) as data:
            layers = len(data.files) // len(_FIELDS)
            return [LayerActivations(*(data[f"{i}/{f}"] for f in _FIELDS))
                    for i in range(layers)]
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("ignoring the unreadable activation cache %s: %s", path, exc)
        return None


class PlanLosses:
    """Whole plans' measured losses, stored beside the quality measurements they belong to.

    The key is the plan as JSON; the file's own name holds the model, calibration and
    settings (its quality file's key), and the compiled plan's loss depends on nothing
    else: kernel spellings and thread counts change only rounding.
    """

    def __init__(self, path: Path | None):
        self.path = path

    def get(self, plan: Mapping[str, Any]) -> float | None:
        value = self._read().get(_plan_key(plan))
        return None if value is None else float(value)

    def plans(self) -> list[dict[str, Any]]:
        """The plans whose losses are stored, as their JSON."""
        return [json.loads(key) for key in self._read()]

    def put(self, plan: Mapping[str, Any], loss: float) -> None:
        if self.path is None:
            return
        known = {**self._read(), _plan_key(plan): loss}  # merge what others wrote since
        write_atomic(self.path, json.dumps(known, sort_keys=True))

    def _read(self) -> dict[str, float]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}


def _plan_key(plan: Mapping[str, Any]) -> str:
    return json.dumps(plan, sort_keys=True, separators=(",", ":"))


def write_atomic(path: Path, text: str) -> None:
    """Writes `text` beside `path` and renames it in."""
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    scratch.write_text(text)
    os.replace(scratch, path)
