"""Runs a Plan through the pass pipeline and emits the verified model, plan and report.

load ─▶ canonicalize ─▶ find blocks ─▶ choose heads/channels ─▶ passes ─▶ emit + verify
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx_ir.passes import Sequential
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

import planer
from planer.compiler import emit
from planer.compiler.blocks import find_blocks
from planer.compiler.calibration import model_input_infos, random_feeds
from planer.compiler.canonicalize import canonicalize
from planer.compiler.loading import has_external_data, load_model
from planer.compiler.plan import Plan, parse_plan
from planer.compiler.spec import ModelSpec, layer_flops, model_flops
from planer.passes import (
    ChannelPruningConfig,
    ChannelPruningPass,
    HeadPruningConfig,
    HeadPruningPass,
)
from planer.passes.importance import magnitude_channel_scores, magnitude_head_scores, top_indices

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which heads and channels each layer keeps, with optional refitted output projections."""

    heads: dict[int, tuple[int, ...]]
    channels: dict[int, tuple[int, ...]]
    head_output: dict[int, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)
    channel_output: dict[int, tuple[np.ndarray, np.ndarray]] = dataclasses.field(
        default_factory=dict
    )
    method: str = "magnitude"


@dataclasses.dataclass
class CompileResult:
    """What a compile wrote and measured."""

    model_path: Path
    plan: Plan
    report: dict[str, Any]


def read_model(path: Path) -> tuple[ir.Model, ModelSpec]:
    """Loads, canonicalizes and describes the model at `path`."""
    model = load_model(path)
    canonicalize(model)
    return model, find_blocks(model)


def magnitude_selection(spec: ModelSpec, plan: Plan) -> Selection:
    """Chooses kept heads/channels by weight magnitude (the data-free fallback)."""
    heads, channels = {}, {}
    for layer, choice in zip(spec.layers, plan.layers, strict=True):
        heads[layer.index] = top_indices(magnitude_head_scores(layer.attention), choice.heads)
        channels[layer.index] = top_indices(magnitude_channel_scores(layer.ffn), choice.ffn)
    return Selection(heads=heads, channels=channels)


def apply_selection(model: ir.Model, spec: ModelSpec, selection: Selection) -> ir.Model:
    """Runs the rewrite pipeline on `model` in place."""
    stages = Sequential(
        # Heads first: the attention rewrite re-emits each block with constant per-layer
        # shapes, and reads weights through the spec before channel pruning swaps any.
        HeadPruningPass(spec, HeadPruningConfig(selection.heads, selection.head_output)),
        ChannelPruningPass(spec, ChannelPruningConfig(selection.channels,
                                                      selection.channel_output)),
        RemoveUnusedNodesPass(),
        TopologicalSortPass(),
    )
    stages(model)
    return model


def compile_plan(
    model_path: Path,
    out_dir: Path,
    *,
    plan_data: dict[str, Any] | None,
    batch: int = 1,
    seq_len: int = 128,
    select: Callable[[ir.Model, ModelSpec, Plan], Selection] | None = None,
    progress: Progress | None = None,
) -> CompileResult:
    """Compiles `model_path` to the given plan (neutral when None) and writes `out_dir`."""
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    emit.check_output_location(model_path, out_dir)
    say(f"reading {model_path}")
    model, spec = read_model(model_path)
    plan = parse_plan(plan_data, spec) if plan_data is not None else Plan.neutral(spec)
    selection = select(model, spec, plan) if select else magnitude_selection(spec, plan)
    say("rewriting layers")
    apply_selection(model, spec, selection)
    report = build_report(spec, plan, selection, batch=batch, seq_len=seq_len)
    feeds = random_feeds(model_input_infos(model), batch=2, seq_len=min(seq_len, 16),
                         vocab_size=spec.vocab_size, seed=0)

    def measure(path: Path) -> dict[str, Any]:
        say("verifying against the original model")
        return {"verification": compare_outputs(model_path, path, feeds),
                "compile_seconds": round(time.perf_counter() - started, 2)}

    say(f"writing {out_dir}")
    written = emit.write_outputs(
        model, out_dir,
        documents={"plan.json": plan.to_dict(), "report.json": report},
        external_data=has_external_data(model_path), feeds=feeds, before_commit=measure,
    )
    return CompileResult(model_path=out_dir / emit.MODEL_NAME, plan=plan,
                         report=written["report.json"])


def build_report(
    spec: ModelSpec, plan: Plan, selection: Selection, *, batch: int, seq_len: int
) -> dict[str, Any]:
    """Builds report.json's static part: the plan as applied, params and FLOPs."""
    flops_before = model_flops(spec, batch=batch, seq_len=seq_len)
    flops_after = 2 * batch * seq_len * spec.other_matmul_macs_per_token
    params_removed = 0
    layers = []
    for layer, choice in zip(spec.layers, plan.layers, strict=True):
        a, f = layer.attention, layer.ffn
        flops_after += layer_flops(hidden=spec.hidden, heads=choice.heads, head_size=a.head_size,
                                   ffn=choice.ffn, batch=batch, seq_len=seq_len)
        inner_removed = (a.heads - choice.heads) * a.head_size
        params_removed += inner_removed * (4 * spec.hidden + 3)
        params_removed += (f.width - choice.ffn) * (2 * spec.hidden + 1)
        layers.append({
            "index": layer.index,
            "heads": {"before": a.heads, "after": choice.heads,
                      "kept": list(selection.heads[layer.index])},
            "ffn": {"before": f.width, "after": choice.ffn},
        })
    return {
        "tool": "planer",
        "version": planer.__version__,
        "batch": batch,
        "seq_len": seq_len,
        "selection": selection.method,
        "plan": plan.to_dict(),
        "layers": layers,
        "params_before": spec.total_params,
        "params_after": spec.total_params - params_removed,
        "flops_before": flops_before,
        "flops_after": flops_after,
        "flops_ratio": round(flops_after / flops_before, 4),
    }


def compare_outputs(original: Path, compiled: Path, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """Runs both models on `feeds` in ORT (optimizations off) and compares every output."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    results = []
    for path in (original, compiled):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        results.append(session.run(None, feeds))
    max_abs, cosines = 0.0, []
    for a, b in zip(*results, strict=True):
        a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        max_abs = max(max_abs, float(np.max(np.abs(a64 - b64))) if a64.size else 0.0)
        denom = np.linalg.norm(a64) * np.linalg.norm(b64)
        cosines.append(float(a64 @ b64 / denom) if denom else 1.0)
    return {"inputs": "random", "max_abs_diff": max_abs, "min_cosine": min(cosines)}
