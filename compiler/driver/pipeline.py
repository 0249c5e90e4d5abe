"""Runs a plan through the compile stages and emits the verified model, plan and report.

    read (load ─▶ canonicalize) ─▶ Compilation ─▶ STAGES ─▶ emit ─▶ verify ─▶ OUT

The stage list below is the whole compile; each stage says why it sits where it does.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from planer.compiler import emit
from planer.compiler.blocks import find_blocks
from planer.compiler.calibration import (
    DEFAULT_SAMPLES,
    build_calibration,
    model_input_infos,
    random_feeds,
)
from planer.compiler.canonicalize import canonicalize
from planer.compiler.driver.compilation import (
    Compilation,
    CompileOptions,
    Fitting,
    Progress,
)
from planer.compiler.driver.planning import flops_passes, require_calibration, skim_layers
from planer.compiler.driver.prune import magnitude_selection
from planer.compiler.driver.report import build_report
from planer.compiler.driver.report_html import render_report_html
from planer.compiler.driver.stages import (
    ChooseUnits,
    FfnToMoe,
    Int8,
    Mux,
    OrtKernels,
    Prune,
    Recover,
    Stage,
    TokenSkim,
    run_stages,
    tune_ort_kernels,
)
from planer.compiler.driver.verify import compare_outputs, fidelity
from planer.compiler.errors import BadInputError
from planer.compiler.gated_ffn import require_gated_support
from planer.compiler.loading import check_sequence_length, has_external_data, load_model
from planer.compiler.plan import Plan, parse_plan
from planer.compiler.spec import ModelSpec
from planer.compiler.support import prepare, require_supported
from planer.cost_model.kernels import KernelTimings
from planer.passes.skim_fit import skim_report

__all__ = ["STAGES", "CompileResult", "compile_plan", "read_canonical", "read_model",
           "tune_ort_kernels"]

STAGES: list[Stage] = [
    # Planning reads the untouched source graph: importance and the refit are measured on
    # the original activations, so every later stage works from one fixed choice.
    ChooseUnits(),
    # First rewrite: attention is re-emitted with constant per-layer shapes, which every
    # later stage (and ORT's own fusions) relies on; FFNs are sliced to their channels.
    Prune(),
    # After pruning: experts split the pruned FFN width.
    FfnToMoe(),
    # After the weight surgery: skimming rewires the sequence plumbing around layers and
    # reads the re-emitted attention (attention-received scores).
    TokenSkim(),
    # After every structural rewrite of the layers (they run on B/N rows, so their
    # weights and shapes must be settled) and before recovery, which trains the demux
    # heads together with the backbone: an untrained mux model is garbage.
    Mux(),
    # After every structural rewrite, so what is trained is what ships; before the kernel
    # respelling and int8, so the torch mirror reads float weights in the standard form.
    Recover(),
    # It respells nodes the earlier stages emitted (residual Adds, GELU) for ORT's kernels
    # and must see the final float graph.
    OrtKernels(),
    # Last: every other stage reads float weights.
    Int8(),
]


@dataclasses.dataclass
class CompileResult:
    """What a compile wrote and measured."""

    model_path: Path
    plan: Plan
    report: dict[str, Any]


def read_model(path: Path) -> tuple[ir.Model, ModelSpec]:
    """Loads, canonicalizes and describes the model at `path`.

    Foreign spellings come first (support.prepare: weight-only int8 dequantized, ORT's
    fused contrib operators expanded), so canonicalization and the finder see one form.
    """
    model = load_model(path)
    prepare(model)
    canonicalize(model)
    return model, find_blocks(model)


def read_canonical(path: Path) -> tuple[ir.Model, ModelSpec]:
    """Reads the model with every attention block re-emitted in planer's canonical form.

    All heads are kept, so outputs are unchanged; passes that follow head pruning (token
    skimming) can then be fitted or benchmarked on their own.
    """
    model, spec = read_model(path)
    c = Compilation(path, CompileOptions(), model, Plan.neutral(spec), spec)
    c.selection = magnitude_selection(spec, c.plan)
    run_stages([Prune()], c)
    finish_graph(model)
    ir.external_data.load_to_model(model)
    return model, find_blocks(model)


def finish_graph(model: ir.Model) -> None:
    """Puts the graph in emission order: unused initializers gone, nodes sorted.

    Stages leave no dead nodes (the runner checks); this drops the initializers they
    stopped reading and orders the nodes they inserted, once, before writing.
    """
    RemoveUnusedNodesPass()(model)
    TopologicalSortPass()(model)


def compile_plan(
    model_path: Path,
    out_dir: Path,
    *,
    plan_data: dict[str, Any] | None = None,
    target_flops: float | None = None,
    calibration: Path | None = None,
    tokenizer: Path | None = None,
    batch: int = 1,
    seq_len: int = 128,
    reconstruct: bool = True,
    calibration_samples: int = DEFAULT_SAMPLES,
    method: str = "calibrated",
    passes: frozenset[str] = frozenset({"prune"}),
    target_runtime: str = "ort",
    threads: int = 1,
    ort_kernels: str = "auto",
    progress: Progress | None = None,
    fitting: Fitting | None = None,
    recover_seconds: float | None = None,
    recover_steps: int | None = None,
    mux: int = 1,
    kernels: KernelTimings | None = None,
    moe_activation: str | None = None,
) -> CompileResult:
    """Compiles `model_path` to a plan (given, FLOPs-targeted, or neutral) and writes `out_dir`.

    With calibration data the kept heads/channels come from calibrated importance and
    the output projections are refit; without it, from weight magnitude. `fitting`
    (calibration and captured activations of this model) is reused when given.
    """
    options = CompileOptions(
        plan_data=plan_data, target_flops=target_flops, calibration=calibration,
        tokenizer=tokenizer, batch=batch, seq_len=seq_len, reconstruct=reconstruct,
        method=method, passes=passes, target_runtime=target_runtime, threads=threads,
        ort_kernels=ort_kernels, recover_seconds=recover_seconds, recover_steps=recover_steps,
        mux=mux, moe_activation=moe_activation, calibration_samples=calibration_samples)
    return compile_with(model_path, out_dir, options, progress=progress, fitting=fitting,
                        kernels=kernels)


def compile_with(model_path: Path, out_dir: Path, options: CompileOptions, *,
                 progress: Progress | None = None, fitting: Fitting | None = None,
                 stages: list[Stage] | None = None,
                 kernels: KernelTimings | None = None) -> CompileResult:
    """Compiles `model_path` as `options` say and writes the verified result to `out_dir`."""
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    options.check()
    with emit.claim_output(model_path, out_dir):
        return _compile_locked(model_path, out_dir, options, say, fitting, stages, started,
                               kernels or KernelTimings())


def _compile_locked(model_path: Path, out_dir: Path, options: CompileOptions, say: Progress,
                    fitting: Fitting | None, stages: list[Stage] | None,
                    started: float, kernels: KernelTimings) -> CompileResult:
    say(f"reading {model_path}")
    model, spec = read_model(model_path)
    plan = parse_plan(options.plan_data, spec) if options.plan_data is not None \
        else Plan.neutral(spec)
    # Before any calibration or fitting: what compile cannot rewrite is refused now.
    require_supported(spec, plan)
    require_gated_support(spec, plan, mux=options.mux, passes=options.passes)
    check_sequence_length(model, options.seq_len)
    require_calibration(plan, options.calibration, options.target_flops, options.passes)
    flops_passes(options.passes, options.target_flops)  # refuses int8 alone now
    if options.recovers and options.calibration is None:
        raise BadInputError("--recover distils the original model on calibration text; pass "
                            "--calibration.")
    if fitting is None:
        fitting = load_fitting(model, spec, options, say)
    c = Compilation(model_path, options, model, plan, spec, fitting=fitting, progress=say,
                    kernels=kernels)
    run_stages(STAGES if stages is None else stages, c)
    finish_graph(model)
    return _write(c, out_dir, started)


def load_fitting(model: ir.Model, spec: ModelSpec, options: CompileOptions,
                 say: Progress) -> Fitting | None:
    """Tokenizes the calibration data when the compile needs it (activations come later)."""
    if options.calibration is None and options.target_flops is None:
        return None
    say("tokenizing calibration data")
    calib = build_calibration(options.calibration, model_input_infos(model),
                              tokenizer=options.tokenizer, vocab_size=spec.vocab_size,
                              seq_len=options.seq_len, max_samples=options.calibration_samples)
    return Fitting(calib)


def _write(c: Compilation, out_dir: Path, started: float) -> CompileResult:
    """Emits the model with its plan and report, verified before it is committed."""
    o = c.options
    c.report.static = build_report(c.source_spec, c.plan, c.selection, batch=o.batch,
                                   seq_len=o.seq_len, moe=c.report.sections.get("moe"))
    if c.calib is not None:
        c.report.add("calibration", {"source": c.calib.source, "synthetic": c.calib.synthetic,
                                     "fit_samples": c.calib.num_samples(),
                                     "holdout_samples": c.calib.holdout_samples()})
    report = c.report.to_dict()
    feeds = random_feeds(model_input_infos(c.model), batch=2, seq_len=min(o.seq_len, 16),
                         vocab_size=c.source_spec.vocab_size, seed=0)

    def measure(path: Path) -> dict[str, Any]:
        c.progress("verifying against the original model")
        extra = _verify(c, path, feeds)
        extra["compile_seconds"] = round(time.perf_counter() - started, 2)
        return extra

    c.progress(f"writing {out_dir}")
    written = emit.write_outputs(
        c.model, out_dir, documents={"plan.json": c.plan.to_dict(), "report.json": report},
        external_data=has_external_data(c.source), feeds=feeds, before_commit=measure,
        pages=report_pages(c.source),
    )
    return CompileResult(model_path=out_dir / emit.MODEL_NAME, plan=c.plan,
                         report=written["report.json"])


def report_pages(source: Path) -> emit.Pages:
    """Renders OUT/report.html from the final report and the written model."""
    def render(report: Mapping[str, Any], model: Path) -> dict[str, str]:
        return {"report.html": render_report_html(dict(report), source, model)}

    return render


def _verify(c: Compilation, path: Path, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """Measures the written model against the original: random inputs, then held-out data."""
    extra: dict[str, Any] = {"verification": compare_outputs(c.source, path, feeds)}
    calib = c.calib
    if calib is not None and calib.holdout:
        extra["fidelity"] = fidelity(c.source, path, calib.holdout)
        skim = c.report.sections.get("skim")
        if skim is not None:
            dense, _ = read_model(c.source)
            extra["skim"] = {**skim, **skim_report(
                dense, load_model(path), skim_layers(c.plan), calib.holdout,
                num_layers=len(c.plan.layers))}
    return extra
