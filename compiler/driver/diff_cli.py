"""The `planer diff A B` subcommand: what changed between two models, and where numbers part.

Examples:
    planer diff a.onnx b.onnx                      per-layer table, op deltas, totals
    planer diff a.onnx b.onnx --json               the same as one JSON object
    planer diff a.onnx b.onnx --inputs x.npz       + divergence of every paired tensor
    planer diff a.onnx b.onnx --calibration t.tsv --tokenizer DIR
    planer diff a.onnx b.onnx --html diff.html     one self-contained page
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from planer.compiler.argtypes import positive_float, positive_int
from planer.compiler.diff import diff_models, format_delta
from planer.compiler.diff_numbers import (
    DEFAULT_TOLERANCE,
    calibration_feeds,
    divergence,
    read_feeds,
)
from planer.compiler.errors import EXIT_OK, BadInputError

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Registers the `diff` subcommand on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "diff", help="compare two models block by block; optionally where outputs diverge")
    parser.add_argument("a", type=Path, help="the first (reference) ONNX model")
    parser.add_argument("b", type=Path, help="the second ONNX model (e.g. planer's output)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--html", type=Path, metavar="FILE",
                        help="also write a self-contained HTML page to FILE")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--inputs", type=Path, metavar="NPZ",
                        help=".npz of input arrays named after the model inputs")
    source.add_argument("--calibration", type=Path, metavar="FILE",
                        help="calibration text (.txt/.tsv/.csv/.jsonl) or .npz to run both on")
    parser.add_argument("--tokenizer", type=Path, metavar="DIR",
                        help="tokenizer folder or tokenizer.json for text calibration")
    parser.add_argument("--samples", type=positive_int, default=8,
                        help="calibration samples to run (default 8)")
    parser.add_argument("--tolerance", type=positive_float, default=DEFAULT_TOLERANCE,
                        help="a tensor diverges when its relative L2 error exceeds this or its "
                             f"cosine falls below 1 - this (default {DEFAULT_TOLERANCE:g})")
    parser.add_argument("--batch", type=positive_int, default=1,
                        help="batch size for FLOP counts (default 1)")
    parser.add_argument("--seq-len", type=positive_int, default=128,
                        help="sequence length for FLOP counts and text calibration (default 128)")
    parser.set_defaults(run=run_diff)
    return parser


def run_diff(args: argparse.Namespace) -> int:
    """Compares the two models and prints text or JSON (and writes HTML when asked)."""
    if args.tokenizer and not args.calibration:
        raise BadInputError("--tokenizer only applies with --calibration; pass both.")
    with console.status("reading and matching both models"):
        diff = diff_models(args.a, args.b, batch=args.batch, seq_len=args.seq_len)
        data = diff.to_dict()
    feeds, source = None, ""
    if args.inputs:
        feeds, source = read_feeds(diff.a, args.inputs), str(args.inputs)
    elif args.calibration:
        feeds = calibration_feeds(diff.a, args.calibration, tokenizer=args.tokenizer,
                                  seq_len=args.seq_len, samples=args.samples)
        source = f"{args.calibration} ({args.samples} samples)"
    if feeds is not None:
        with console.status("running both models in ONNX Runtime"):
            data["divergence"] = divergence(diff, feeds, tolerance=args.tolerance,
                                            source=source)
    if args.html:
        from planer.compiler.diff_html import render

        _write_atomic(args.html, render(data))
        console.print(f"wrote {args.html}")
    if args.json:
        out.print_json(json.dumps(data))
    else:
        print_text(data)
    return EXIT_OK


def _write_atomic(path: Path, text: str) -> None:
    if path.is_dir():
        raise BadInputError(f"--html {path} is a folder; name the page file.")
    if not path.parent.exists():
        raise BadInputError(f"the folder for --html {path} does not exist.")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def print_text(data: dict[str, Any]) -> None:
    """Prints the diff as tables: layers, op deltas, totals, unmatched, divergence."""
    a, b = data["a"], data["b"]
    out.print(f"A {a['path']}: {_layers_text(a)}\nB {b['path']}: {_layers_text(b)}")
    for note in data["notes"]:
        out.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    if data["identical"]:
        out.print("[green]no changes[/green]: every node pairs with an identical node.")
    if data["layers"]:
        out.print(_layer_table(data))
    out.print(_ops_table(data))
    _print_totals(data)
    _print_unmatched(data["unmatched"])
    if data["divergence"] is not None:
        _print_divergence(data["divergence"])


def _layers_text(side: dict[str, Any]) -> str:
    if side["layers"] is None:
        return f"{side['nodes']} nodes, no Transformer layers found"
    origin = ", written by planer" if side["planer"] else ""
    return f"{side['nodes']} nodes, {side['layers']} {side['kind']} layers{origin}"


def _layer_table(data: dict[str, Any]) -> Table:
    table = Table(title="layers (A -> B)")
    for column in ("A", "B", "heads", "FFN", "changes", "params Δ", "GFLOPs Δ", "nodes +/-/~"):
        table.add_column(column, justify="left" if column == "changes" else "right")
    for row in data["layers"]:
        n = row["nodes"]
        changes = ", ".join(row["changes"]) or ("unmatched" if row["status"] == "unmatched"
                                                 else "unchanged")
        table.add_row(_idx(row["a"]), _idx(row["b"]), _arrow(row["heads"]), _arrow(row["ffn"]),
                      changes, format_delta(row["params"]), format_delta(row["flops"], scale=1e9),
                      f"+{n['added']} -{n['removed']} ~{n['changed']}")
    return table


def _ops_table(data: dict[str, Any]) -> Table:
    table = Table(title="nodes by op type (all layers and outside them)")
    for column in ("op", "added", "removed", "changed"):
        table.add_column(column, justify="right")
    for op, counts in data["totals"]["ops"].items():
        table.add_row(op, *(str(counts[k]) for k in ("added", "removed", "changed")))
    if not data["totals"]["ops"]:
        table.add_row("(none)", "0", "0", "0")
    return table


def _print_totals(data: dict[str, Any]) -> None:
    t = data["totals"]
    flops = t["flops"]
    flops_text = (f"GFLOPs at batch {data['batch']}, seq {data['seq_len']}: "
                  f"{flops[0] / 1e9:.3f} -> {flops[1] / 1e9:.3f}"
                  if None not in flops else "FLOPs: unknown (layers not found on both sides)")
    n = t["nodes"]
    out.print(f"totals: params {t['params'][0]:,} -> {t['params'][1]:,}   {flops_text}   "
              f"nodes {t['node_count'][0]} -> {t['node_count'][1]} (same {n['same']}, "
              f"changed {n['changed']}, added {n['added']}, removed {n['removed']})",
              highlight=False)


def _print_unmatched(unmatched: dict[str, Any]) -> None:
    for key, label in (("layers_a", "layers of A with no partner in B"),
                       ("layers_b", "layers of B with no partner in A")):
        if unmatched[key]:
            out.print(f"unmatched {label}: {', '.join(map(str, unmatched[key]))}")
    for key, label in (("nodes_a", "removed (in A only)"), ("nodes_b", "added (in B only)")):
        names = [name or "(unnamed)" for name in unmatched[key]]
        if names:
            shown = ", ".join(names[:12]) + (f", ... {len(names) - 12} more"
                                             if len(names) > 12 else "")
            out.print(f"nodes {label}: {len(names)}: {shown}", highlight=False)


def _print_divergence(div: dict[str, Any]) -> None:
    table = Table(title=f"divergence on {div['inputs']} (tolerance {div['tolerance']:g})")
    for column in ("tensor", "max |Δ|", "rel err", "cosine", ""):
        table.add_column(column, justify="right")
    for r in [*div["boundaries"], *div["outputs"]]:
        if "skipped" in r:
            table.add_row(r["name"], "", "", "", r["skipped"])
            continue
        table.add_row(r["name"], _num(r["max_abs"]), f"{r['rel']:.2e}", f"{r['cosine']:.6f}",
                      "[red]diverged[/red]" if r["diverged"] else "ok")
    out.print(table)
    node, boundary = div["first_divergent_node"], div["first_divergent_boundary"]
    compared = sum(1 for r in div["nodes"] if "skipped" not in r)
    if node is None and boundary is None:
        out.print(f"no paired tensor diverges ({compared} node outputs compared).")
        return
    if node is not None:
        out.print(f"first divergent node: {node['name']} ({node['op']}; A: {node['a']}): "
                  f"rel err {node['rel']:.2e}, cosine {node['cosine']:.6f} "
                  f"({compared} node outputs compared)", highlight=False)
    if boundary is not None:
        out.print(f"first divergent block boundary: {boundary['name']}", highlight=False)


def _idx(value: int | None) -> str:
    return "-" if value is None else str(value)


def _arrow(pair: list[Any]) -> str:
    a, b = ("-" if v is None else str(v) for v in pair)
    return a if a == b else f"{a} -> {b}"


def _num(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:.2e}"
