"""planer's Python API: the CLI's verbs as functions with typed results.

    planer.inspect(model)               ─▶ ModelSummary  (layers: heads, widths, params, FLOPs)
    planer.compile(model, out=..., ...) ─▶ CompileResult (model path, plan, report, target met)
    planer.diff(a, b, ...)              ─▶ DiffResult    (per-layer changes, divergence, HTML)

Each resolves its arguments as the CLI does (planer.compiler.driver.defaults): no model means
the bundled all-MiniLM-L6-v2 and its tokenizer, and a compile that fits a plan with a tokenizer
but no calibration file calibrates on the bundled English sentences. Errors are planer's own
(`PlanerError` subclasses carrying the CLI's exit code, e.g. `BadInputError`, 2). Nothing is
printed unless `progress=True`; other libraries' warnings and bars are kept quiet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from planer.compiler.errors import BadInputError, TargetUnreachableError

if TYPE_CHECKING:
    from planer.compiler.plan import Plan
    from planer.compiler.progress import NullProgress

PathLike = str | os.PathLike[str]
__all__ = ["CompileResult", "DiffResult", "LayerSummary", "ModelSummary", "compile", "diff",
           "inspect"]


@dataclasses.dataclass(frozen=True)
class LayerSummary:
    """One Transformer layer as planer reads it."""

    index: int
    heads: int
    head_size: int
    hidden: int
    ffn: int
    activation: str
    norm: str  # "post" or "pre" LayerNorm
    params: int
    flops: int  # at the summary's batch and seq_len
    supported: bool  # compile can rewrite this layer
    heads_prunable: bool  # ... including its attention heads
    reason: str | None = None  # why not, where it cannot


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    """What `planer inspect` prints: the model's layers, parameters and FLOPs."""

    path: Path
    kind: str  # "encoder" or "decoder"
    hidden: int
    vocab_size: int | None
    params: int
    flops: int
    batch: int
    seq_len: int
    layers: tuple[LayerSummary, ...]
    supported: bool  # compile can rewrite every layer
    unsupported: tuple[str, ...]  # one sentence per thing it cannot rewrite
    data: Mapping[str, Any]  # the `planer inspect --json` object

    def to_dict(self) -> dict[str, Any]:
        """Returns the `planer inspect --json` object."""
        return dict(self.data)


@dataclasses.dataclass(frozen=True)
class CompileResult:
    """What a compile wrote (into `out`) and measured."""

    model_path: Path
    out: Path
    plan: Plan
    report: dict[str, Any]  # report.json
    calibration: Path | None  # the calibration file used (the bundled one if defaulted)

    @property
    def target_met(self) -> bool | None:
        """Whether the latency target was met; None when no latency target was given."""
        met = self.report.get("target_met")
        return None if met is None else bool(met)

    @property
    def flops_ratio(self) -> float:
        """FLOPs kept, as a fraction of the original's."""
        return float(self.report["flops_ratio"])

    @property
    def measured_ms(self) -> float | None:
        """The compiled model's measured latency (latency targets only)."""
        return self.report.get("measured_ms")

    @property
    def pooled_cosine(self) -> float | None:
        """Mean cosine of mean-pooled outputs to the original's on held-out calibration."""
        return self.report.get("fidelity", {}).get("pooled_cosine", {}).get("mean")

    @property
    def report_html(self) -> Path | None:
        """OUT/report.html, where the compile wrote one."""
        page = self.out / "report.html"
        return page if page.is_file() else None


@dataclasses.dataclass(frozen=True)
class DiffResult:
    """Two models compared block by block: the `planer diff --json` object, typed at the top."""

    data: dict[str, Any]

    @property
    def identical(self) -> bool:
        """Whether every node pairs with an identical node."""
        return bool(self.data["identical"])

    @property
    def layers(self) -> list[dict[str, Any]]:
        """Per layer row: `a`, `b`, `heads` and `ffn` as [A, B], `changes`, node counts."""
        return list(self.data["layers"])

    @property
    def first_divergent_node(self) -> dict[str, Any] | None:
        """The first paired node whose output diverged (when inputs were given)."""
        divergence = self.data.get("divergence")
        return divergence["first_divergent_node"] if divergence else None

    def html(self) -> str:
        """Returns the self-contained page `planer diff --html` writes."""
        from planer.compiler.diff_html import render

        return render(self.data)


def inspect(model: PathLike | None = None, *, batch: int = 1, seq_len: int = 128) -> ModelSummary:
    """Reads a model's layers (the bundled MiniLM when `model` is None).

    Raises:
        BadInputError: the model cannot be read or holds no Transformer layers.
    """
    from planer.compiler.causal import mark_causal
    from planer.compiler.driver.pipeline import read_model
    from planer.compiler.driver.quiet import quiet_libraries
    from planer.compiler.support import analyze

    _positive(batch=batch, seq_len=seq_len)
    path = _model_path(model)
    with quiet_libraries():
        graph, spec = read_model(path)
        mark_causal(path, graph, spec)
    data = spec.to_dict(batch=batch, seq_len=seq_len)
    data["model"] = str(path)
    support = analyze(spec)  # the analysis compile runs before fitting, as `inspect` prints
    data.update(support.to_dict())
    for record, verdict in zip(data["layers"], support.layers, strict=True):
        record.update(verdict.to_dict())
    layers = tuple(LayerSummary(**{f.name: layer.get(f.name)
                                   for f in dataclasses.fields(LayerSummary)})
                   for layer in data["layers"])
    return ModelSummary(path=path, kind=data["kind"], hidden=data["hidden"],
                        vocab_size=data["vocab_size"], params=data["params"],
                        flops=data["flops"], batch=batch, seq_len=seq_len, layers=layers,
                        supported=bool(data["supported"]),
                        unsupported=tuple(data["unsupported"]), data=data)


def compile(  # noqa: A001 (the verb the CLI calls compile)
    model: PathLike | None = None, *, out: PathLike,
    target_latency: str | float | None = None, target_flops: float | None = None,
    plan: PathLike | Mapping[str, Any] | None = None, calibration: PathLike | None = None,
    tokenizer: PathLike | None = None, batch: int = 1, seq_len: int = 128, threads: int = 1,
    passes: Iterable[str] = ("prune", "int8"), target_runtime: str = "ort",
    ort_kernels: str = "auto", calibration_samples: int = 256,  # calibration.DEFAULT_SAMPLES
    refit: bool = True, selection: str = "calibrated", refresh: bool = False,
    progress: bool | Callable[[str], None] | NullProgress | None = None,
) -> CompileResult:
    """Compiles a model into `out` (model.onnx, plan.json, report.json), as `planer compile`.

    Args:
        model: an ONNX file; None compiles the bundled all-MiniLM-L6-v2.
        out: the output folder (created; planer refuses one holding files it did not write).
        target_latency: "50%" or "0.5x" of the dense latency measured here, "20ms", "0.02s",
            or a number of milliseconds.
        target_flops: keep at most this fraction (0, 1] of the FLOPs.
        plan: a plan dict or plan JSON file (per-layer heads/ffn kept).
        calibration: unlabelled inputs (.txt, .tsv/.csv, .jsonl, .npz); defaults to the
            bundled English sentences when a plan is fitted and a tokenizer is known.
        tokenizer: tokenizer folder or tokenizer.json; defaults to the bundled model's.
        calibration_samples: samples read from `calibration` for fitting, a quarter of
            them held out for verification (the CLI's --calibration-samples).
        batch: deployment batch size (FLOPs, profiling, latency).
        seq_len: deployment sequence length; calibration text is padded/cut to it.
        threads: intra-op threads of ONNX Runtime when measuring.
        passes: what `target_flops` or `target_latency` may use: prune, int8, skim, moe
            (moe on its own under `target_flops`). int8 is weighed by `target_latency`
            only; `target_flops` ignores it (INT8 does not change FLOPs).
        target_runtime: "ort" or "tensorrt" lowering of dynamic sparsity.
        ort_kernels: "auto", "on" or "off" (the CLI's --ort-kernels).
        refit: refit output projections by least squares (False: the CLI's --no-refit).
        selection: "calibrated" or "magnitude" choice of kept heads and channels.
        refresh: re-measure block latencies instead of reusing stored ones.
        progress: True shows progress on stderr; a callable receives status lines.

    Raises:
        BadInputError: unusable model, plan, calibration or option (exit code 2).
        TargetUnreachableError: no plan met the latency; the fastest model was written as
            `fastest-missed-target.onnx` and `error.result` is its CompileResult (code 3).
    """
    from planer.compiler.driver.defaults import CALIBRATION_NOTE, default_calibration
    from planer.compiler.driver.quiet import quiet_libraries

    given = [name for name, value in (("plan", plan), ("target_flops", target_flops),
                                      ("target_latency", target_latency)) if value is not None]
    if len(given) > 1:
        raise BadInputError(f"give one of plan, target_flops or target_latency, not "
                            f"{' and '.join(given)}.")
    _positive(batch=batch, seq_len=seq_len, threads=threads)
    latency = parse_latency(target_latency) if target_latency is not None else None
    chosen_passes = _passes(passes)
    path = _model_path(model)
    tok = _tokenizer(model, tokenizer)
    calib = default_calibration(_path(calibration), tok, fits=bool(given))
    plan_data = _plan_data(plan)
    with _progress(progress) as say, quiet_libraries():
        if calib is not None and calibration is None:
            say(CALIBRATION_NOTE)
        run: dict[str, Any] = dict(calibration=calib, tokenizer=tok, batch=batch,
                                   seq_len=seq_len, threads=threads, ort_kernels=ort_kernels,
                                   progress=say, calibration_samples=calibration_samples)
        try:
            if latency is not None:
                from planer.compiler.driver.latency import compile_to_latency

                result = compile_to_latency(path, Path(out), target_ms=latency[0],
                                            target_fraction=latency[1], refresh=refresh,
                                            passes=chosen_passes, **run)
            else:
                from planer.compiler.driver.pipeline import compile_plan

                result = compile_plan(path, Path(out), plan_data=plan_data,
                                      target_flops=target_flops, reconstruct=refit,
                                      method=selection, passes=chosen_passes,
                                      target_runtime=target_runtime, **run)
        except TargetUnreachableError as exc:
            if exc.result is not None:
                exc.result = _compiled(exc.result, Path(out), calib)
            raise
    return _compiled(result, Path(out), calib)


def diff(a: PathLike, b: PathLike, *, inputs: PathLike | None = None,
         calibration: PathLike | None = None, tokenizer: PathLike | None = None,
         samples: int = 8, tolerance: float = 1e-4, batch: int = 1,
         seq_len: int = 128) -> DiffResult:
    """Compares two models block by block, as `planer diff`.

    With `inputs` (an .npz named after the model inputs) or `calibration` (+ `tokenizer`
    for text), both models run in ONNX Runtime and the result names the first node whose
    output diverges beyond `tolerance`.

    Raises:
        BadInputError: a model, the inputs or the calibration cannot be used.
    """
    from planer.compiler.diff import diff_models
    from planer.compiler.diff_numbers import calibration_feeds, divergence, read_feeds
    from planer.compiler.driver.quiet import quiet_libraries

    if inputs is not None and calibration is not None:
        raise BadInputError("give inputs or calibration, not both.")
    if not (tolerance > 0 and math.isfinite(tolerance)):
        raise BadInputError(f"tolerance must be a positive number, not {tolerance}.")
    _positive(samples=samples, batch=batch, seq_len=seq_len)
    with quiet_libraries():
        result = diff_models(Path(a), Path(b), batch=batch, seq_len=seq_len)
        data = result.to_dict()
        feeds, source = None, ""
        if inputs is not None:
            feeds, source = read_feeds(result.a, Path(inputs)), str(inputs)
        elif calibration is not None:
            feeds = calibration_feeds(result.a, Path(calibration), tokenizer=_path(tokenizer),
                                      seq_len=seq_len, samples=samples)
            source = f"{calibration} ({samples} samples)"
        if feeds is not None:
            data["divergence"] = divergence(result, feeds, tolerance=tolerance, source=source)
    return DiffResult(data)


# ------------------------------------------------------------------ argument resolution


def _path(value: PathLike | None) -> Path | None:
    return None if value is None else Path(value)


def _model_path(model: PathLike | None) -> Path:
    from planer.compiler.driver.defaults import bundled_model

    return bundled_model() if model is None else Path(model)


def _tokenizer(model: PathLike | None, tokenizer: PathLike | None) -> Path | None:
    if tokenizer is not None or model is not None:
        return _path(tokenizer)
    from planer.compiler.driver.defaults import bundled_tokenizer

    return bundled_tokenizer()


def _positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BadInputError(f"{name} must be a whole number of at least 1, not {value!r}.")


def _passes(passes: Iterable[str]) -> frozenset[str]:
    try:
        from planer.compiler.driver.stages import PASS_GROUPS
    except ImportError:  # before the stage pipeline: the passes package held the names
        from planer.passes import REGISTRY as PASS_GROUPS  # type: ignore[attr-defined,no-redef]

    chosen = frozenset([passes] if isinstance(passes, str) else passes)
    unknown = chosen - set(PASS_GROUPS)
    if unknown or not chosen:
        raise BadInputError(f"unknown pass(es) {', '.join(sorted(unknown)) or '(none given)'}; "
                            f"known: {', '.join(sorted(PASS_GROUPS))}.")
    return chosen


def _plan_data(plan: PathLike | Mapping[str, Any] | None) -> dict[str, Any] | None:
    if plan is None or isinstance(plan, Mapping):
        return None if plan is None else dict(plan)
    from planer.compiler.plan import load_plan

    return load_plan(Path(plan))


def parse_latency(target: str | float) -> tuple[float | None, float | None]:
    """Reads a latency target as (milliseconds, None) or (None, fraction of the dense latency).

    "50%" and "0.5x" are fractions; "20ms", "0.02s" and plain numbers are milliseconds.

    Raises:
        BadInputError: not a positive finite time, or a fraction outside (0, 1].
    """
    text = str(target).strip().lower()
    scale, fraction = 1.0, False
    for suffix, factor, relative in (("%", 0.01, True), ("x", 1.0, True), ("ms", 1.0, False),
                                     ("s", 1000.0, False)):
        if text.endswith(suffix):
            text, scale, fraction = text[: -len(suffix)], factor, relative
            break
    try:
        value = float(text) * scale
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0) or (fraction and value > 1):
        raise BadInputError(f"target_latency {target!r} is not a latency such as '50%', "
                            "'0.5x', '20ms' or 20 (milliseconds).")
    return (None, value) if fraction else (value, None)


def _compiled(result: Any, out: Path, calibration: Path | None) -> CompileResult:
    return CompileResult(model_path=Path(result.model_path), out=out, plan=result.plan,
                         report=result.report, calibration=calibration)


@contextlib.contextmanager
def _progress(progress: bool | Callable[[str], None] | NullProgress | None
              ) -> Iterator[Callable[[str], None]]:
    from planer.compiler.progress import Progress, as_progress

    if progress is True:
        with Progress() as shown:
            yield shown
    else:
        yield as_progress(None if progress is False else progress)
