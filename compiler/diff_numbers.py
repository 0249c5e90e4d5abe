"""Runs two diffed models on the same inputs and measures where their numbers part.

    inputs (.npz or calibration file) ─ feeds ─┬─ A in ORT ─┐  (intermediates as extra outputs)
                                               └─ B in ORT ─┴─ divergence per paired tensor

The tensors compared (`tensor_pairs`) come from the correspondence in `diff`: layer
boundaries of paired layers, the model outputs, and outputs of paired nodes that must
compute the same tensor.

A tensor diverges when its relative L2 error exceeds the tolerance or its cosine
similarity falls below 1 - tolerance (`DEFAULT_TOLERANCE`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from planer.compiler.calibration import build_calibration, model_input_infos, read_npz
from planer.compiler.capture import ActivationReader
from planer.compiler.diff import Diff, Side, attributes_key, boundaries
from planer.compiler.errors import BadInputError
from planer.compiler.names import PROVENANCE_PASS, PassName

DEFAULT_TOLERANCE = 1e-4
_CHUNK = 32  # extra outputs fetched per ORT run, to bound memory on long graphs
Feed = Mapping[str, np.ndarray]


def read_feeds(side: Side, npz: str | Path) -> list[dict[str, np.ndarray]]:
    """Reads one batch of inputs from an .npz whose arrays are named after the model inputs."""
    arrays = read_npz(npz, "inputs file")
    feed = {}
    for info in model_input_infos(side.model):
        if info.name not in arrays:
            raise BadInputError(f"inputs file {npz} has no array {info.name!r}, which "
                                f"{side.path.name} takes; it holds {sorted(arrays)}.")
        feed[info.name] = arrays[info.name].astype(info.dtype)
    return [feed]


def calibration_feeds(side: Side, path: str | Path, *, tokenizer: str | Path | None,
                      seq_len: int | None, samples: int) -> list[dict[str, np.ndarray]]:
    """Builds one seeded batch of `samples` inputs from a calibration file."""
    calibration = build_calibration(
        path, model_input_infos(side.model), tokenizer=tokenizer,
        vocab_size=side.spec.vocab_size if side.spec else None, seq_len=seq_len,
        batch_size=samples, max_samples=samples, holdout_fraction=0.0,
    )
    return calibration.batches[:1]


@dataclasses.dataclass
class _Stats:
    """Running divergence of one tensor pair over batches."""

    sq_diff: float = 0.0
    sq_a: float = 0.0
    sq_b: float = 0.0
    dot: float = 0.0
    max_abs: float = 0.0
    skipped: str | None = None

    def update(self, xa: np.ndarray, xb: np.ndarray) -> None:
        if xa.shape != xb.shape:
            self.skipped = f"shapes differ: {list(xa.shape)} vs {list(xb.shape)}"
            return
        a, b = xa.astype(np.float64).ravel(), xb.astype(np.float64).ravel()
        finite = np.isfinite(a) & np.isfinite(b)
        # Masks hold -inf/-FLT_MAX on purpose: equal non-finite entries agree.
        if np.any(~finite & (a != b)):
            self.max_abs = math.inf
        a, b = a[finite], b[finite]
        d = a - b
        self.sq_diff += float(d @ d)
        self.sq_a += float(a @ a)
        self.sq_b += float(b @ b)
        self.dot += float(a @ b)
        if d.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(d))))

    def record(self, tolerance: float) -> dict[str, Any]:
        if self.skipped:
            return {"skipped": self.skipped, "diverged": False}
        rel = math.sqrt(self.sq_diff / self.sq_a) if self.sq_a else math.sqrt(self.sq_diff)
        denom = math.sqrt(self.sq_a * self.sq_b)
        cosine = self.dot / denom if denom else (1.0 if self.sq_diff == 0 else 0.0)
        diverged = math.isinf(self.max_abs) or rel > tolerance or cosine < 1.0 - tolerance
        return {"max_abs": _json_float(self.max_abs), "rel": rel, "cosine": cosine,
                "diverged": bool(diverged)}


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def tensor_pairs(diff: Diff) -> list[dict[str, Any]]:
    """Lists the tensors to compare: layer boundaries, model outputs, paired node outputs."""
    a, b = diff.a, diff.b
    found: list[dict[str, Any]] = []
    if a.spec is not None and b.spec is not None:  # layers pair only where both have one
        for ia, ib in diff.match.layers.items():
            la, lb = a.spec.layers[ia], b.spec.layers[ib]
            for (name, va), (_, vb) in zip(boundaries(la), boundaries(lb), strict=False):
                found.append({"kind": "boundary", "name": name, "values": (va, vb)})
    outputs_b = {v.name: v for v in b.model.graph.outputs}
    for i, va in enumerate(a.model.graph.outputs):
        out_b = outputs_b.get(va.name) or (
            b.model.graph.outputs[i] if i < len(b.model.graph.outputs) else None)
        if out_b is not None:
            found.append({"kind": "output", "name": va.name, "values": (va, out_b)})
    for node in a.nodes:
        pair = diff.match.nodes.get(node)
        # Sequence alignment pairs by op type only, and a structural pair whose attributes
        # differ (a Transpose with another perm) need not compute the same tensor.
        # Nodes planer re-spelled for ORT's kernels (ort_kernels) compute the same function
        # through other intermediates: only the tensors around them compare.
        if pair is None or pair[1] == "sequence" or (
                pair[1] == "structure" and attributes_key(node) != attributes_key(pair[0])) \
                or pair[0].metadata_props.get(PROVENANCE_PASS) == PassName.ORT_KERNELS:
            continue
        for va, vb in zip(node.outputs, pair[0].outputs, strict=False):
            if va.dtype is not None and not va.dtype.is_floating_point():
                continue
            found.append({"kind": "node", "name": pair[0].name or vb.name, "a": node.name,
                          "op": node.op_type, "values": (va, vb)})
    return found


def divergence(diff: Diff, feeds: Sequence[Feed], *, tolerance: float = DEFAULT_TOLERANCE,
               source: str = "") -> dict[str, Any]:
    """Runs both models on `feeds` and measures every paired tensor; names the first to diverge.

    Returns per-tensor records (max |a-b|, relative L2 error, cosine), the first layer
    boundary and the first node (in A's order) whose divergence exceeds `tolerance`.
    """
    pairs = tensor_pairs(diff)
    readers = []
    for k, side in enumerate((diff.a, diff.b)):
        values = list(dict.fromkeys(p["values"][k] for p in pairs))
        readers.append(ActivationReader(side.model, values))
    stats = [_Stats() for _ in pairs]
    for start in range(0, len(pairs), _CHUNK):
        chunk = pairs[start:start + _CHUNK]
        for feed in feeds:
            runs = []
            for k, reader in enumerate(readers):
                names = list(dict.fromkeys(p["values"][k].name for p in chunk))
                arrays = reader.session.run(
                    names, {n: v for n, v in feed.items() if n in reader.input_names})
                runs.append(dict(zip(names, arrays, strict=True)))
            for offset, p in enumerate(chunk):
                va, vb = p["values"]
                stats[start + offset].update(np.asarray(runs[0][va.name]),
                                             np.asarray(runs[1][vb.name]))
    records = []
    for p, stat in zip(pairs, stats, strict=True):
        record = {k: v for k, v in p.items() if k != "values"}
        record.update(stat.record(tolerance))
        records.append(record)
    first_boundary = next((r for r in records if r["kind"] == "boundary" and r["diverged"]), None)
    first_node = next((r for r in records if r["kind"] == "node" and r["diverged"]), None)
    return {
        "tolerance": tolerance, "inputs": source,
        "boundaries": [r for r in records if r["kind"] == "boundary"],
        "outputs": [r for r in records if r["kind"] == "output"],
        "nodes": [r for r in records if r["kind"] == "node"],
        "first_divergent_boundary": first_boundary,
        "first_divergent_node": first_node,
    }
