"""Compiles the anchor plans a latency model is re-anchored on, cached by what decides them.

    anchor plans (every layer alike: all units, ¼ of the heads, ¼ of the FFN width;
                  float, and both blocks INT8 where INT8 was profiled)
      ─ key: the model's bytes and its folder's files, the plan, planer's emission version,
             batch, sequence length, threads, and the ORT-kernel spelling this compile uses
      ─ compiled once per key into <cache>/anchors/<key>/ (atomically: a folder renamed in)
      ─ timed afresh by every compile (compiler.driver.latency.profile_model)

Compiling six whole plans takes minutes on a small shared machine, and what they compile
to depends only on the key; how fast they run now does not, so only the models are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from planer.compiler import emit
from planer.compiler.cache import cache_dir
from planer.compiler.driver.pipeline import compile_plan
from planer.compiler.plan import Int8Plan, LayerPlan, Plan
from planer.compiler.spec import ModelSpec
from planer.cost_model.int8_cost import INT8_MODE
from planer.cost_model.kernels import KernelTimings
from planer.cost_model.profile_int8 import int8_kind

_CHUNK = 1 << 20


def anchor_plans(spec: ModelSpec, int8: Mapping[str, Any]) -> dict[str, Plan]:
    """The whole plans `profile_model` times to anchor the curves (latency.anchor).

    Every layer alike: all units, a quarter of the heads, a quarter of the FFN width
    (on the profiled grid); the same three again with both blocks in INT8 where INT8
    was profiled.
    """
    def every_layer(heads_share: float, ffn_share: float, blocks: str | None) -> Plan:
        layers = []
        for la in spec.layers:
            step = max(1, la.ffn.width // 16)
            layers.append(LayerPlan(
                heads=max(1, round(la.attention.heads * heads_share)),
                ffn=max(step, step * round(la.ffn.width * ffn_share / step)),
                int8=Int8Plan(blocks, INT8_MODE) if blocks else None))
        return Plan(tuple(layers))

    shapes = {"neutral": (1.0, 1.0), "fewer_heads": (0.25, 1.0), "narrower": (1.0, 0.25)}
    plans = {name: every_layer(h, f, None) for name, (h, f) in shapes.items()}
    plans["neutral"] = Plan.neutral(spec)  # exactly, whatever the grid
    if int8_kind("attn", INT8_MODE) in int8 and int8_kind("ffn", INT8_MODE) in int8:
        plans.update({f"int8_{name}": every_layer(h, f, "both")
                      for name, (h, f) in shapes.items()})
    return plans


def compile_anchors(
    model_path: Path, plans: Mapping[str, Plan], *, hidden: int, batch: int, seq_len: int,
    threads: int, ort_kernels: str, kernels: KernelTimings,
) -> dict[str, Path]:
    """Returns each anchor plan's compiled model, compiling those not cached yet.

    `kernels` decides (and keeps, for the compile's later plans) the ORT-kernel spelling
    the anchors are compiled with, so they run as the search's plans will.
    """
    spelling = kernel_spelling(ort_kernels, kernels, hidden=hidden, tokens=batch * seq_len,
                               threads=threads)
    base = {"model": model_digest(model_path), "emission": emit.EMISSION_VERSION,
            "batch": batch, "seq_len": seq_len, "threads": threads,
            "ort_kernels": ort_kernels, "spelling": spelling}
    paths = {}
    for name, plan in plans.items():
        key = hashlib.sha256(json.dumps({**base, "plan": plan.to_dict()}, sort_keys=True)
                             .encode()).hexdigest()[:24]
        folder = cache_dir("anchors") / key
        if not (folder / emit.MODEL_NAME).exists():
            _compile_into(folder, model_path, plan, batch=batch, seq_len=seq_len,
                          threads=threads, ort_kernels=ort_kernels, kernels=kernels)
        paths[name] = folder / emit.MODEL_NAME
    return paths


def kernel_spelling(ort_kernels: str, kernels: KernelTimings, *, hidden: int, tokens: int,
                    threads: int) -> Any:
    """Returns the ORT-kernel spelling a compile emits.

    `ort_kernels` itself, or under "auto" whether the residual LayerNorm is unfused
    (timed once per shape by `kernels`).
    """
    if ort_kernels == "auto":
        return kernels.skip_layernorm(hidden, tokens, threads).unfuse
    return ort_kernels


def _compile_into(folder: Path, model_path: Path, plan: Plan, *, batch: int, seq_len: int,
                  threads: int, ort_kernels: str, kernels: KernelTimings) -> None:
    """Compiles `plan` beside `folder` and renames the result in (a reader never sees half)."""
    scratch = Path(tempfile.mkdtemp(prefix=".compiling-", dir=folder.parent))
    try:
        compile_plan(model_path, scratch / "out", plan_data=plan.to_dict(), batch=batch,
                     seq_len=seq_len, threads=threads, ort_kernels=ort_kernels,
                     kernels=kernels)
        try:
            os.replace(scratch / "out", folder)
        except OSError:  # another planer cached the same anchor first: keep theirs
            if not (folder / emit.MODEL_NAME).exists():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def model_digest(model_path: Path) -> str:
    """Hashes the model file and names, sizes and times of the files beside it.

    The files beside it include its external data; a change to any of them compiles the
    anchors again rather than trusting a stale copy.
    """
    digest = hashlib.sha256()
    with model_path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    for other in sorted(model_path.parent.iterdir()):
        if other.is_file() and other != model_path:
            stat = other.stat()
            digest.update(f"{other.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()
