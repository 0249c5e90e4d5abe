"""The `planer` command line: inspect, compile, profile, diff.

The CLI alone prints to the user. Errors a user can act on print one sentence to
stderr and exit with a documented code: 2 bad input, 3 target unreachable, 1 internal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import planer
from planer.compiler.argtypes import (
    duration,
    latency_target,
    output_folder,
    positive_int,
    throughput_target,
)
from planer.compiler.calibration import DEFAULT_SAMPLES
from planer.compiler.driver import diff_cli
from planer.compiler.driver.defaults import (
    CALIBRATION_NOTE,
    bundled_model,
    bundled_tokenizer,
    default_calibration,
)
from planer.compiler.driver.quiet import quiet_libraries
from planer.compiler.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_OK,
    BadInputError,
    PlanerError,
)
from planer.compiler.names import BlockId
from planer.compiler.plan import load_plan
from planer.compiler.progress import Progress

console = Console(stderr=True, soft_wrap=True)
out = Console()
# Piped or redirected output is read by programs and kept in files: rich's default of 80
# columns would cut table cells ("1,772,9…"), so off a terminal lines may be this long.
UNCUT_WIDTH = 100_000


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the planer CLI and returns its exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    for stream in (out, diff_cli.out):
        stream.width = None if stream.is_terminal else UNCUT_WIDTH  # type: ignore[assignment]
    with _logging(args.verbose), quiet_libraries(verbose=args.verbose):
        try:
            return int(args.run(args))
        except PlanerError as exc:
            if args.verbose:
                console.print(traceback.format_exc(), markup=False, highlight=False, end="")
            console.print(f"[red]error:[/red] {exc}", highlight=False)
            return exc.exit_code
        except KeyboardInterrupt:
            console.print("interrupted")
            return EXIT_INTERNAL
        except Exception as exc:  # an internal error: say so plainly, the trace with -v
            if args.verbose:
                console.print(traceback.format_exc(), markup=False, highlight=False, end="")
            console.print(f"[red]internal error:[/red] {type(exc).__name__}: {exc}"
                          + ("" if args.verbose else " (run with -v for the trace)"),
                          highlight=False)
            return EXIT_INTERNAL


class _ConsoleHandler(logging.Handler):
    """Prints log records on the stderr console, so they land above live progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        console.print(self.format(record), markup=False, highlight=False)


@contextlib.contextmanager
def _logging(verbose: bool) -> Iterator[None]:
    """Shows planer's log records from DEBUG with -v, everyone's from WARNING otherwise.

    The previous set-up comes back afterwards (main() also runs inside tests and programs).
    """
    root, own = logging.getLogger(), logging.getLogger("planer")
    saved = root.level, own.level
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    own.setLevel(logging.DEBUG if verbose else logging.NOTSET)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        own.setLevel(saved[1])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="planer",
        description="Compile Transformer ONNX models into sparser, faster ones.",
    )
    parser.add_argument("--version", action="version", version=f"planer {planer.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log diagnostics and print the trace of an internal error")
    sub = parser.add_subparsers(dest="command", required=True)

    inspect = sub.add_parser("inspect", help="show layers, heads, widths, parameters and FLOPs")
    _model_arg(inspect)
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    _shape_args(inspect)
    inspect.set_defaults(run=run_inspect)

    compile_ = sub.add_parser("compile", help="rewrite a model to a plan and write OUT/")
    _model_arg(compile_)
    compile_.add_argument("-o", "--output", required=True, type=output_folder,
                          help="output folder")
    compile_.add_argument("--plan", type=Path, help="plan JSON: per-layer heads/ffn to keep")
    compile_.add_argument("--target-flops", type=float, metavar="R",
                          help="keep this fraction (0, 1] of the FLOPs at --batch/--seq-len")
    compile_.add_argument("--target-latency", type=latency_target, metavar="T",
                          help="meet this median latency on the runtime: 20ms, 0.02s, or "
                               "relative to the measured dense model, 50%% or 0.5x")
    compile_.add_argument("--target-throughput", type=throughput_target, metavar="N/s",
                          help="serve N inputs per second at --batch 8 or more: met as a "
                               "latency target of batch / N per batch")
    compile_.add_argument("--threads", type=positive_int, default=1,
                          help="intra-op threads of the target runtime (default 1)")
    compile_.add_argument("--runtime", choices=("ort-cpu",), default="ort-cpu",
                          help="target runtime the latency is measured on (default ort-cpu)")
    compile_.add_argument("--refresh", action="store_true",
                          help="re-measure block latencies instead of reusing stored ones")
    compile_.add_argument("--passes", default="prune,int8",
                          help="comma-separated passes --target-flops or --target-latency may use: "
                               "prune, int8, skim, moe (default: prune,int8). int8 is weighed "
                               "by --target-latency only; --target-flops ignores it (INT8 "
                               "does not change FLOPs)")
    compile_.add_argument("--target-runtime", choices=("ort", "tensorrt"), default="ort",
                          help="lowering of dynamic sparsity (skim): ort (NonZero/ScatterND) "
                               "or tensorrt (shape-computable only)")
    compile_.add_argument("--ort-kernels", choices=("auto", "on", "off"), default="auto",
                          help="ort target: spell residual LayerNorms and GELUs for ORT's "
                               "faster kernels; auto times both LayerNorm forms (and, for "
                               "MoE layers that fit it, com.microsoft.MoE against gather) "
                               "on this machine first (default auto)")
    compile_.add_argument("--calibration", type=Path, metavar="FILE",
                          help="unlabelled inputs: .txt, .tsv/.csv (first column), .jsonl, .npz")
    compile_.add_argument("--calibration-samples", type=positive_int, default=DEFAULT_SAMPLES,
                          metavar="N",
                          help="calibration samples read for fitting, a quarter of them held "
                               f"out for verification (default {DEFAULT_SAMPLES}; more fits "
                               "skim maps and refits better and takes longer)")
    compile_.add_argument("--tokenizer", type=Path, metavar="DIR",
                          help="Hugging Face tokenizer folder or tokenizer.json for text input")
    compile_.add_argument("--recover", type=duration, metavar="TIME", dest="recover_seconds",
                          help="after rewriting, distil the original into the compiled model "
                               "on the calibration text for this wall-clock budget (5m, 90s)")
    compile_.add_argument("--recover-steps", type=positive_int, metavar="N",
                          help="recovery budget as optimizer steps (with or without --recover)")
    compile_.add_argument("--mux", type=int, choices=(1, 2, 4), default=1, metavar="N",
                          help="run N inputs through the layers in one row (DataMUX); needs "
                               "--recover to train the demux (1, 2 or 4; default 1)")
    compile_.add_argument("--moe-activation", choices=("relu",),
                          help="run MoE experts with ReLU in place of the FFN's activation "
                               "(DSTI's ReLU-fication; loses quality unless --recover trains "
                               "them)")
    compile_.add_argument("--no-refit", dest="reconstruct", action="store_false",
                          help="skip the least-squares refit of output projections")
    compile_.add_argument("--selection", choices=("calibrated", "magnitude"),
                          default="calibrated", help="how kept heads/channels are chosen")
    _shape_args(compile_)
    compile_.set_defaults(run=run_compile)

    profile = sub.add_parser("profile", help="measure block latencies and report the model error")
    _model_arg(profile)
    _shape_args(profile)
    profile.add_argument("--threads", type=positive_int, default=1)
    profile.add_argument("--refresh", action="store_true", help="re-measure stored blocks")
    profile.add_argument("--report", action="store_true",
                         help="also measure compiled models and print the latency model's "
                              "held-out error")
    profile.set_defaults(run=run_profile)

    diff_cli.add_parser(sub)
    for command in sub.choices.values():
        # -v after the subcommand too; SUPPRESS keeps a -v given before it from being reset.
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="log diagnostics and print the trace of an internal error")
    return parser


def _model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", nargs="?", type=Path,
        help="ONNX model (default: the bundled all-MiniLM-L6-v2, exported on first use)",
    )


def _shape_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=positive_int, default=1, help="batch size (default 1)")
    parser.add_argument("--seq-len", type=positive_int, default=128,
                        help="sequence length (default 128)")


def resolve_model(path: Path | None, *, verbose: bool = False) -> Path:
    """Returns `path`, or the bundled MiniLM (exported and cached on first use)."""
    if path is not None:
        return path
    console.print("using the bundled all-MiniLM-L6-v2 (exported to ONNX on first use)")
    return bundled_model(verbose=verbose)


def run_inspect(args: argparse.Namespace) -> int:
    """Prints the model's layers as a table or one JSON object."""
    from planer.compiler.causal import mark_causal
    from planer.compiler.driver.pipeline import read_model
    from planer.compiler.support import analyze

    path = resolve_model(args.model, verbose=args.verbose)
    model, spec = read_model(path)
    mark_causal(path, model, spec)
    data = spec.to_dict(batch=args.batch, seq_len=args.seq_len)
    data["model"] = str(path)
    # The same analysis compile runs before fitting (compiler.support).
    support = analyze(spec)
    data.update(support.to_dict())
    for record, verdict in zip(data["layers"], support.layers, strict=True):
        record.update(verdict.to_dict())
    if args.json:
        out.print_json(json.dumps(data))
        return EXIT_OK
    table = Table(title=f"{path.name}: {len(spec.layers)} {spec.kind} layers, hidden {spec.hidden}")
    for column in ("layer", "heads", "head size", "hidden", "FFN", "activation", "norm",
                   "params", "GFLOPs", "supported"):
        table.add_column(column, justify="right")
    for layer, verdict in zip(data["layers"], support.layers, strict=True):
        table.add_row(str(layer["index"]), str(layer["heads"]), str(layer["head_size"]),
                      str(layer["hidden"]), str(layer["ffn"]), layer["activation"],
                      layer["norm"], f"{layer['params']:,}", f"{layer['flops'] / 1e9:.3f}",
                      verdict.verdict)
    out.print(table)
    out.print(f"parameters {data['params']:,}   FLOPs at batch {args.batch}, "
              f"seq {args.seq_len}: {data['flops'] / 1e9:.3f} G")
    summary = "yes" if data["supported"] else \
        "no" if any(la.fatal for la in support.layers) else "FFN pruning only (heads stay)"
    out.print("\n  ".join([f"supported: {summary}", *data["unsupported"]]), markup=False,
              highlight=False)
    return EXIT_OK


def run_compile(args: argparse.Namespace) -> int:
    """Compiles the model to the plan and prints what was done."""
    from planer.compiler.driver.pipeline import compile_plan
    from planer.compiler.emit import claim_output

    path = resolve_model(args.model, verbose=args.verbose)
    from planer.compiler.driver.stages import PASS_GROUPS

    passes = {p.strip() for p in args.passes.split(",") if p.strip()}
    unknown = passes - set(PASS_GROUPS)
    if unknown:
        raise BadInputError(f"unknown pass(es) {', '.join(sorted(unknown))}; known: "
                            f"{', '.join(sorted(PASS_GROUPS))}.")
    plan_data = load_plan(args.plan) if args.plan else None
    if args.target_throughput is not None:
        args.target_latency = _throughput_as_latency(args)
    tokenizer = args.tokenizer
    if tokenizer is None and args.model is None:
        tokenizer = bundled_tokenizer()
    fits = (args.target_flops is not None or plan_data is not None
            or args.target_latency is not None)
    if not fits:
        console.print("no --plan, --target-flops or --target-latency: compiling the neutral "
                      "plan (everything kept)")
    calibration = default_calibration(args.calibration, tokenizer, fits=fits)
    if calibration is not None and args.calibration is None:
        console.print(CALIBRATION_NOTE)
    elif calibration is None and fits:
        console.print("no --calibration: choosing by weight magnitude" if plan_data is not None
                      else "no --calibration: fitting on random token inputs, a poor "
                      "stand-in for real text")
    started = time.perf_counter()
    args.calibration = calibration  # _compile_latency reads it from args
    # OUT stays locked for the whole compile: a second planer writing it is refused now.
    with claim_output(path, args.output):
        if args.target_latency is not None:
            return _compile_latency(args, path, tokenizer, started)
        with Progress(console) as progress:
            result = compile_plan(
                path, args.output, plan_data=plan_data, target_flops=args.target_flops,
                calibration=calibration, tokenizer=tokenizer, batch=args.batch,
                seq_len=args.seq_len, reconstruct=args.reconstruct, method=args.selection,
                passes=frozenset(passes), target_runtime=args.target_runtime,
                threads=args.threads, ort_kernels=args.ort_kernels, progress=progress,
                recover_seconds=args.recover_seconds, recover_steps=args.recover_steps,
                mux=args.mux, moe_activation=args.moe_activation,
                calibration_samples=args.calibration_samples,
            )
    _print_summary(result.report, time.perf_counter() - started, args.output)
    return EXIT_OK


def _throughput_as_latency(args: argparse.Namespace) -> tuple[str, float]:
    """Turns --target-throughput N/s into the per-batch latency target batch / N.

    Only from batch 8: at smaller batches a throughput target is a latency target in
    disguise, and the user should say which latency they mean.
    """
    if args.target_latency is not None:
        raise BadInputError("give one of --target-latency or --target-throughput.")
    if args.batch < 8:
        raise BadInputError(f"--target-throughput needs --batch 8 or more (got {args.batch}); "
                            "at smaller batches give --target-latency.")
    return "ms", 1000.0 * args.batch / args.target_throughput


def _compile_latency(args: argparse.Namespace, path: Path, tokenizer: Path | None,
                     started: float) -> int:
    from planer.compiler.driver.latency import compile_to_latency
    from planer.compiler.driver.pipeline import CompileResult
    from planer.compiler.errors import TargetUnreachableError

    if args.mux != 1:
        raise BadInputError("--mux is not searched by --target-latency yet; use --plan or "
                            "--target-flops with --mux.")
    if args.plan is not None or args.target_flops is not None:
        raise BadInputError("give one of --plan, --target-flops, --target-latency or "
                            "--target-throughput.")
    if args.moe_activation is not None:
        raise BadInputError("--moe-activation is not searched with a latency target yet; use "
                            "--plan or --passes moe --target-flops.")
    try:
        with Progress(console) as progress:
            progress("compiling to a latency target")
            unit, amount = args.target_latency
            result = compile_to_latency(
                path, args.output, target_ms=amount if unit == "ms" else None,
                target_fraction=amount if unit == "dense" else None,
                calibration=args.calibration,
                tokenizer=tokenizer, batch=args.batch, seq_len=args.seq_len,
                threads=args.threads, refresh=args.refresh, ort_kernels=args.ort_kernels,
                progress=progress, recover_seconds=args.recover_seconds,
                recover_steps=args.recover_steps,
                calibration_samples=args.calibration_samples,
                passes=frozenset(p.strip() for p in args.passes.split(",") if p.strip()))
    except TargetUnreachableError as exc:
        if isinstance(exc.result, CompileResult):
            _print_summary(exc.result.report, time.perf_counter() - started, args.output)
            _print_throughput(args, exc.result.report)
        raise
    _print_summary(result.report, time.perf_counter() - started, args.output)
    _print_throughput(args, result.report)
    return EXIT_OK


def _print_throughput(args: argparse.Namespace, report: dict[str, Any]) -> None:
    if args.target_throughput is not None:
        out.print(f"throughput {1000.0 * args.batch / report['measured_ms']:.1f}/s at batch "
                  f"{args.batch} (target {args.target_throughput:g}/s, dense "
                  f"{1000.0 * args.batch / report['baseline_ms']:.1f}/s)")


def run_profile(args: argparse.Namespace) -> int:
    """Profiles block variants on the target and prints the latency model's error."""
    from planer.compiler.driver.latency import profile_model, validate_latency_model

    path = resolve_model(args.model, verbose=args.verbose)
    with Progress(console) as progress:
        progress("profiling")
        latency, info = profile_model(path, batch=args.batch, seq_len=args.seq_len,
                                      threads=args.threads, refresh=args.refresh,
                                      progress=progress)
        if args.report:
            info["whole_model"] = validate_latency_model(
                path, latency, info["dense_ms"], batch=args.batch, seq_len=args.seq_len,
                threads=args.threads, progress=progress)
    table = Table(title=f"block latencies at batch {args.batch}, seq {args.seq_len}, "
                        f"{args.threads} thread(s) (device {info['device']})")
    for column in ("block", "units", "ms"):
        table.add_column(column, justify="right")
    for kind, points in info["points"].items():
        for units, ms in points:
            table.add_row(kind, str(units), f"{ms:.3f}")
    out.print(table)
    out.print(f"dense model {info['dense_ms']:.2f} ms, fixed overhead {info['overhead_ms']:.2f} ms;"
              f" stored in {info['store']}")
    mape = info["block_mape"]
    out.print(f"held-out MAPE on block configurations: attention {mape['attn']:.1%}, "
              f"FFN {mape['ffn']:.1%}")
    if "whole_model" in info:
        whole = info["whole_model"]
        out.print(f"held-out MAPE on {len(whole['models'])} whole compiled models (latency "
                  f"ratios to the original): {whole['mape']['model']:.1%}")
        for row in whole["models"]:
            out.print(f"  {row['plan']}: predicted {row['model_ratio']:.3f}, measured "
                      f"{row['measured_ratio']:.3f}")
    return EXIT_OK


def _moe_cell(choice: dict[str, Any] | None, quality: dict[str, Any] | None) -> str:
    if not choice:
        return ""
    how = f"top-{choice['top_k']}" if "top_k" in choice else f"tau {choice['tau']}"
    recall = f", recall {quality['router_recall']:.2f}" if quality else ""
    lowering = f", {quality['lowering']}" if quality and "lowering" in quality else ""
    return f"{choice['experts']} experts {how}{recall}{lowering}"


def _err(record: dict[str, float] | None) -> str:
    if not record:
        return "-"
    refit = record.get("error_refit")
    sliced = record["error_sliced"]
    return f"{sliced:.3f} → {refit:.3f}" if refit is not None else f"{sliced:.3f}"


def _print_summary(report: dict[str, Any], seconds: float, output: Path) -> None:
    table = Table(title="compiled")
    skim = any("skim_keep" in layer for layer in report["layers"])
    moe = any("moe" in layer for layer in report["layers"])
    for column in ("layer", "heads", "FFN", "attn err", "FFN err", *(("skim",) if skim else ()),
                   *(("MoE",) if moe else ())):
        table.add_column(column, justify="right")
    for layer in report["layers"]:
        h, f = layer["heads"], layer["ffn"]
        row = [str(layer["index"]), f"{h['before']} → {h['after']}",
               f"{f['before']} → {f['after']}", _err(layer.get("attn")),
               _err(layer.get("ffn_fit"))]
        if skim:
            row.append(f"{layer['skim_keep']:.2f}" if "skim_keep" in layer else "")
        if moe:
            row.append(_moe_cell(layer.get("moe"), report.get("moe", {})
                                 .get(str(BlockId(layer["index"])))))
        table.add_row(*row)
    out.print(table)
    fid = report.get("fidelity")
    if fid:
        parts = [f"{key.replace('_', ' ')} mean {val['mean']:.4f} / p5 {val['p5']:.4f}"
                 for key, val in fid.items() if isinstance(val, dict)]
        out.print(f"held-out fidelity ({fid['holdout_samples']} samples): " + "; ".join(parts))
    for name, quality in report.get("moe", {}).items():
        costs = quality.get("lowering_us")
        if costs and costs[f"{quality['lowering']}_us"] >= costs["dense_us"]:
            out.print(f"{name}: its MoE FFN measured slower than the dense FFN here "
                      f"({costs[quality['lowering'] + '_us']:.0f} vs {costs['dense_us']:.0f} "
                      "µs): this layer gains nothing from moe at this size")
    kernels = report.get("ort_kernels")
    if kernels:
        choice = kernels.get("skip_layernorm")
        timed = (f" (SkipLayerNormalization {choice['fused_us']:.0f} µs vs "
                 f"{choice['unfused_us']:.0f} µs unfused, measured here)") if choice else ""
        out.print(f"ORT kernels: {kernels['residual_sum']} residual LayerNorms kept unfused"
                  f"{timed}; {kernels['gelu']} GELUs fused")
    check = report.get("verification", {})
    out.print(
        f"FLOPs ratio {report['flops_ratio']:.3f}   params {report['params_before']:,} → "
        f"{report['params_after']:,}   outputs vs original on random inputs: "
        f"max |Δ| {check.get('max_abs_diff', float('nan')):.2e}, "
        f"cosine {check.get('min_cosine', float('nan')):.4f}"
    )
    if "target_ms" in report:
        out.print(
            f"target {report['target_ms']:.2f} ms   dense {report['baseline_ms']:.2f} ms   "
            f"compiled {report['measured_ms']:.2f} ms (predicted {report['predicted_ms']:.2f})"
            f"   speedup {report['speedup']:.2f}x   "
            f"{'target met' if report['target_met'] else 'target missed'}")
    out.print(f"wrote {output}/ (model, plan.json, report.json, report.html) in "
              f"{seconds:.1f} s")


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["EXIT_BAD_INPUT", "main"]
