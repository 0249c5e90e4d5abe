"""Benchmarks planer against ONNX Runtime's own optimizer and dynamic INT8 quantization.

    python benchmarks/run.py [--quick] [--out benchmarks/results] [--work DIR]

What is compared, per source model (all-MiniLM-L6-v2; paraphrase-MiniLM-L3-v2, a
third-party ONNX export) and setting (batch, tokens, ORT CPU intra-op threads):

    original ─┬─ ORT transformer optimizer (optimize_model, model_type "bert")   peers
              ├─ ORT dynamic INT8 quantization (quantize_dynamic)              ┘
              ├─ planer compile --target-latency T%  (compiled for the setting)
              │    ├─ the 50% one again through quantize_dynamic (do the two stack?)
              │    └─ again with --recover TIME (label-free distillation, recovery/)
              └─ planer compile --target-flops R --passes prune | skim | moe

    build   each model is built in a child process; its wall time and peak RSS (the
            child's own VmHWM) are the compile time and memory
    time    every model of one setting in one process, interleaved rounds
            (cost_model.timing); the figure is the median per-round ratio to the original
    probe   benchmarks/probe.py's recipe (SST-2, AG News accuracy); fidelity is the mean
            cosine between the model's and the original's pooled probe-test embeddings
    quality benchmarks/quality.py: STS-B dev Spearman, and on the last 2,000 AG News dev
            texts the pooled cosine to the original and neighbours@10 agreement
    memory  peak RSS of a child that loads the model and runs it at the setting's shape

Writes benchmarks/results/<date>-<machine>[-quick][-custom].{md,json} and one
latency-vs-quality PNG per setting (-custom: flags narrowed the run), drawn by
benchmarks/report.py. `--quick` covers the headline in about 5 minutes on 2 cores: MiniLM,
batch 1, 128 tokens, 1 thread; original vs the two peers vs planer at half the dense
latency (and it with INT8 on top). `--recover 5m` adds each latency target distilled
for that long (the full run: 10m); `--recover-steps N` budgets it in optimizer steps
instead (a few steps: the fast mode that exercises the path).
A full run (both sources, six settings, four targets, three passes) takes about 1.5 h there.
"""

# ruff: noqa: E402  (the path fix below must precede the `benchmarks` imports)

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as `python benchmarks/run.py`: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

import numpy as np

import planer
from benchmarks.bench_prune import feeds
from benchmarks.probe import DATA, Embedder, Split, probe_accuracy, probe_splits
from benchmarks.report import plot_setting, render_markdown
from planer.compiler import emit
from planer.cost_model.timing import (
    SessionOptions,
    device_fingerprint,
    make_session,
    ratios,
    time_interleaved,
)

CALIBRATION = DATA / "sst2" / "train.tsv"
RESULTS = ROOT / "benchmarks" / "results"

# Prepended to every child's code: the child prints its own peak RSS as it exits. Neither
# wait4 nor getrusage(RUSAGE_CHILDREN) can give it: Linux carries the parent's peak RSS at
# fork over exec into the child's ru_maxrss, so every child would read at least as large
# as this process. VmHWM belongs to the child's own address space.
PEAK = """import atexit, sys
def _report_peak():
    try:
        with open("/proc/self/status") as f:
            print("PEAK_KB", f.read().split("VmHWM:")[1].split()[0], flush=True)
    except (OSError, IndexError):
        pass
atexit.register(_report_peak)
"""

PLANER = """from planer.compiler.driver.cli import main
sys.exit(main(sys.argv[1:]))
"""

OPTIMIZE = """import json
from onnxruntime.transformers.optimizer import optimize_model
m = optimize_model(sys.argv[1], model_type="bert", num_heads=int(sys.argv[3]),
                   hidden_size=int(sys.argv[4]))
m.save_model_to_file(sys.argv[2])
print("FUSED " + json.dumps(m.get_fused_operator_statistics()))
"""

QUANTIZE = """from onnxruntime.quantization import QuantType, quantize_dynamic
quantize_dynamic(sys.argv[1], sys.argv[2], weight_type=QuantType.QInt8)
"""

# Loads a model and runs it at one shape; "-" measures the interpreter and imports alone.
RUN_ONCE = """import numpy as np
from planer.cost_model.timing import SessionOptions, make_session
path, batch, seq, threads = sys.argv[1], *map(int, sys.argv[2:])
if path != "-":
    session = make_session(path, SessionOptions(threads=threads))
    ids = np.random.default_rng(0).integers(1000, 20000, (batch, seq))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "token_type_ids": np.zeros_like(ids)}
    names = {i.name for i in session.get_inputs()}
    for _ in range(3):
        session.run(None, {k: v for k, v in feed.items() if k in names})
"""


@dataclasses.dataclass(frozen=True)
class Setting:
    """One timing setting: source model, batch, tokens, intra-op threads."""

    source: str
    batch: int
    seq: int
    threads: int

    @property
    def tag(self) -> str:
        return f"b{self.batch}s{self.seq}t{self.threads}"

    def title(self, source_title: str) -> str:
        threads = "thread" if self.threads == 1 else "threads"
        return (f"{source_title} · batch {self.batch} · {self.seq} tokens · "
                f"{self.threads} {threads}")


@dataclasses.dataclass
class Build:
    """One model under test and how it was made; quality fields fill in later."""

    key: str
    source: str
    label: str
    kind: str  # original, peer, planer (latency target), planer-pass (one pass at a FLOPs
    # budget), planer+int8 (a latency target quantized by ORT)
    path: str | None = None
    command: str = ""
    status: str = "ok"
    seq: int | None = None  # compiled for this many tokens (None: any)
    setting: str | None = None  # compiled for this setting's tag (latency targets)
    target: float | None = None  # latency target, a fraction of the dense latency
    compile_s: float | None = None
    compile_peak_mb: float | None = None
    flops_ratio: float | None = None
    recover: str | None = None  # the recovery budget ("10m", "20 steps"), None: none
    sst2: float | None = None
    agnews: float | None = None
    fidelity: float | None = None
    stsb: float | None = None  # STS-B dev Spearman x100 (benchmarks.quality)
    pooled_cosine: float | None = None  # to the original, AG News agreement texts
    neighbours: float | None = None  # neighbours@10 agreement with the original
    report: dict[str, Any] = dataclasses.field(default_factory=dict)

    def belongs(self, setting: Setting) -> bool:
        """Whether this model is timed in `setting`."""
        if self.source != setting.source:
            return False
        if self.setting is not None:
            return self.setting == setting.tag
        return self.seq in (None, setting.seq)


@dataclasses.dataclass(frozen=True)
class Source:
    """A model to compile, with the tokenizer its probe uses."""

    key: str
    title: str
    path: Path
    tokenizer: Path


@dataclasses.dataclass(frozen=True)
class Mode:
    """What one run covers."""

    sources: tuple[str, ...]
    shapes: tuple[tuple[int, int, int], ...]  # (batch, tokens, threads)
    targets: tuple[float, ...]
    passes: tuple[tuple[str, int], ...]  # (pass, tokens compiled for)
    seconds: float
    pass_flops: float = 0.5  # FLOPs budget of each pass alone
    target_seqs: tuple[int, ...] = (128,)  # latency targets compile for these token counts
    int8_on: tuple[float, ...] = (0.5,)  # latency targets also timed with ORT INT8 on top
    recover: tuple[str, ...] = ()  # latency targets also compiled with --recover TIME
    recover_steps: int | None = None  # ... or with --recover-steps N instead


QUICK = Mode(("minilm-l6",), ((1, 128, 1),), (0.5,), (), 20.0)
FULL = Mode(("minilm-l6", "paraphrase-l3"),
            ((1, 128, 1), (1, 128, 2), (8, 128, 1), (8, 128, 2), (1, 384, 1), (1, 384, 2)),
            (0.8, 0.6, 0.5, 0.4),
            (("prune", 128), ("skim", 128), ("moe", 128), ("skim", 384)), 30.0,
            recover=("10m",))


@dataclasses.dataclass(frozen=True)
class Child:
    """What a child process returned: exit code, wall time, peak RSS, merged output."""

    returncode: int
    seconds: float
    peak_mb: float | None
    output: str


class Progress:
    """Prints one line per step to stderr, with seconds since the run began."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- child processes


def run_child(code: str, args: Sequence[str]) -> Child:
    """Runs Python `code` with `args` in a child; measures its wall time and peak RSS."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK + code, *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace", check=False)
    peaks = re.findall(r"^PEAK_KB (\d+)$", proc.stdout, flags=re.MULTILINE)
    peak_mb = int(peaks[-1]) / 1024 if peaks else None
    return Child(proc.returncode, time.perf_counter() - started, peak_mb, proc.stdout)


def error_line(output: str) -> str:
    """The line of a child's output that best says why it failed (ANSI codes removed)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in output.splitlines()]
    lines = [ln for ln in lines if ln]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["no output"])[-1][:300]


def short(text: Path | str) -> str:
    """Writes the paths in `text` the way a reader of the results would type them."""
    text = str(text)
    for prefix, name in ((ROOT.parent / "shared", "../shared"), (ROOT, ""),
                         (Path.home(), "~")):
        text = text.replace(f"{prefix}{os.sep}", f"{name}{os.sep}" if name else "")
    return text


def _mb(value: float | None) -> float | None:
    return None if value is None else round(value)


# ---------------------------------------------------------------- builds


def sources(keys: Sequence[str]) -> list[Source]:
    from planer.fixtures.build import minilm_path, minilm_tokenizer_dir, paraphrase_l3_path

    tokenizer = minilm_tokenizer_dir()
    known = {
        "minilm-l6": ("all-MiniLM-L6-v2", lambda: minilm_path("dynamo")),
        # Ships no tokenizer; it uses bert-base-uncased's vocabulary, as MiniLM does.
        "paraphrase-l3": ("paraphrase-MiniLM-L3-v2 (third-party ONNX)", paraphrase_l3_path),
    }
    return [Source(k, known[k][0], Path(known[k][1]()), tokenizer) for k in keys]


def build_peers(source: Source, work: Path, say: Progress) -> list[Build]:
    """Builds ORT's optimized and dynamically quantized models in child processes."""
    from planer.compiler.driver.pipeline import read_model

    _, spec = read_model(source.path)
    heads, hidden = spec.layers[0].attention.heads, spec.hidden
    folder = work / source.key
    folder.mkdir(parents=True, exist_ok=True)
    peers = [
        ("ort-opt", "ORT transformer optimizer", OPTIMIZE, [str(heads), str(hidden)],
         f"optimize_model(MODEL, model_type='bert', num_heads={heads}, "
         f"hidden_size={hidden}).save_model_to_file(OUT)"),
        ("ort-int8", "ORT dynamic INT8", QUANTIZE, [],
         "quantize_dynamic(MODEL, OUT, weight_type=QuantType.QInt8)"),
    ]
    builds = []
    for name, label, code, extra, call in peers:
        say(f"{source.key}: building {label}")
        build = Build(f"{source.key}/{name}", source.key, label, "peer", command=call)
        builds.append(ort_build(build, code, source.path, folder / f"{name}.onnx", extra))
    return builds


def ort_build(build: Build, code: str, model: Path, out: Path, extra: Sequence[str] = ()
              ) -> Build:
    """Runs an ONNX Runtime tool (`code`) on `model` in a child; fills in `build`."""
    child = run_child(code, [str(model), str(out), *extra])
    build.compile_s, build.compile_peak_mb = round(child.seconds, 1), _mb(child.peak_mb)
    if child.returncode != 0 or not out.exists():
        build.status = f"error: {error_line(child.output)}"
    else:
        build.path, build.status = str(out), _fusion_status(child.output)
    return build


def quantized(build: Build, say: Progress) -> Build:
    """Applies ORT's dynamic INT8 quantization to a planer model (do the two stack?)."""
    say(f"{build.source}: quantizing {build.label} ({build.setting})")
    assert build.path is not None
    out = Path(build.path).with_name("int8.onnx")
    stacked = Build(f"{build.key}+int8", build.source, f"{build.label} + ORT INT8",
                    "planer+int8", command=f"quantize_dynamic(<{build.label} model>, OUT, "
                    "weight_type=QuantType.QInt8)",
                    seq=build.seq, setting=build.setting, flops_ratio=build.flops_ratio)
    return ort_build(stacked, QUANTIZE, Path(build.path), out)


def _fusion_status(output: str) -> str:
    """Summarizes the optimizer's fused-operator counts (and whether attention fused)."""
    line = next((ln for ln in output.splitlines() if ln.startswith("FUSED ")), None)
    if line is None:
        return "ok"
    counts = json.loads(line[len("FUSED "):])
    fused = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
    attention = counts.get("Attention", 0) + counts.get("MultiHeadAttention", 0)
    return f"ok; fused {fused or 'nothing'}" + ("" if attention else "; attention not fused")


def compile_planer(source: Source, folder: Path, label: str, kind: str, flags: list[str],
                   *, seq: int, setting: Setting | None = None, target: float | None = None,
                   recover: str | None = None, say: Progress) -> Build:
    """Runs `planer compile` in a child process and records what it wrote."""
    say(f"{source.key}: compiling {label}" + (f" for {setting.tag}" if setting else ""))
    args = ["compile", str(source.path), "--tokenizer", str(source.tokenizer),
            "--calibration", str(CALIBRATION), "-o", str(folder), *flags]
    child = run_child(PLANER, args)  # what the `planer` console script runs
    shown = short(shlex.join(["planer", *args]).replace(str(folder), "$WORK/" + folder.name))
    build = Build(f"{source.key}/{folder.name}", source.key, label, kind, command=shown,
                  seq=seq, setting=setting.tag if setting else None, target=target,
                  recover=recover, compile_s=round(child.seconds, 1),
                  compile_peak_mb=_mb(child.peak_mb))
    written = {0: emit.MODEL_NAME, 3: emit.UNREACHABLE_NAME}.get(child.returncode)
    if written is None or not (folder / written).exists():
        build.status = f"error (exit {child.returncode}): {error_line(child.output)}"
        return build
    build.path = str(folder / written)
    build.status = "ok" if kind != "planer" else ("met" if child.returncode == 0 else
                                                  "missed (exit 3)")
    report_file = folder / "report.json"
    if report_file.exists():
        report = json.loads(report_file.read_text())
        build.flops_ratio = report.get("flops_ratio")
        build.report = {k: report.get(k) for k in ("target_ms", "baseline_ms", "measured_ms",
                                                   "speedup", "target_met", "fidelity")
                        if k in report}
        if report.get("measured_ms") and report.get("baseline_ms"):
            ratio = report["measured_ms"] / report["baseline_ms"]
            build.status += f" (planer's own measurement: {ratio:.3f})"
    return build


def planer_builds(source: Source, settings: Sequence[Setting], mode: Mode, work: Path,
                  say: Progress) -> list[Build]:
    """Compiles each pass alone at a FLOPs budget, then each latency target per setting."""
    folder, pass_flops = work / source.key, mode.pass_flops
    builds = []
    for name, seq in mode.passes:
        flags = ["--target-flops", f"{pass_flops:g}", "--passes", name, "--seq-len", str(seq)]
        builds.append(compile_planer(source, folder / f"{name}-{pass_flops:g}-s{seq}",
                                     f"planer {name} alone, FLOPs {pass_flops:.0%}",
                                     "planer-pass", flags, seq=seq, say=say))
    for setting in settings:
        if setting.seq not in mode.target_seqs:
            continue
        for target in mode.targets:
            flags = ["--target-latency", f"{target:.0%}", "--batch", str(setting.batch),
                     "--seq-len", str(setting.seq), "--threads", str(setting.threads)]
            name = f"latency-{target:.0%}-{setting.tag}".replace("%", "pct")
            for budget, extra in [(None, []), *recover_flags(mode)]:
                builds.append(compile_planer(
                    source, folder / (name + (f"-recover-{budget}".replace(" ", "")
                                              if budget else "")),
                    f"planer {target:.0%} latency" + (f" + recover {budget}" if budget else ""),
                    "planer", flags + extra, seq=setting.seq, setting=setting, target=target,
                    recover=budget, say=say))
    return builds


def recover_flags(mode: Mode) -> list[tuple[str, list[str]]]:
    """The recovery budgets the mode asks for, each with its `planer compile` flags."""
    budgets = [(t, ["--recover", t]) for t in mode.recover]
    if mode.recover_steps:
        budgets.append((f"{mode.recover_steps} steps",
                        ["--recover-steps", str(mode.recover_steps)]))
    return budgets


# ---------------------------------------------------------------- measurements


def time_setting(setting: Setting, builds: Sequence[Build], original: str, seconds: float
                 ) -> dict[str, dict[str, Any]]:
    """Times the setting's models interleaved in this process; ratios to `original`."""
    opts = SessionOptions(threads=setting.threads)
    sessions, rows = {}, {}
    for build in builds:
        try:
            sessions[build.key] = make_session(build.path, opts)  # type: ignore[arg-type]
        except Exception as exc:  # a model ORT cannot load is a result, not a crash
            rows[build.key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    feed = feeds(setting.batch, setting.seq)
    per_session = {k: {n: v for n, v in feed.items() if n in {i.name for i in s.get_inputs()}}
                   for k, s in sessions.items()}
    timings = time_interleaved(sessions, per_session, warmup=5, repeats=30,
                               min_seconds=seconds)
    relative = ratios(timings, original)
    for key, timing in timings.items():
        rows[key] = {"median_ms": round(timing.median_ms, 3), "ratio": round(relative[key], 4),
                     "rounds": len(timing.samples)}
    return rows


def runtime_peak_mb(path: str, setting: Setting) -> float | None:
    """Peak RSS (MB) of a child that loads the model and runs it three times."""
    child = run_child(RUN_ONCE, [path, str(setting.batch), str(setting.seq),
                                 str(setting.threads)])
    return _mb(child.peak_mb) if child.returncode == 0 else None


def quality(path: str, tokenizer: Path, splits: dict[str, Split], reference: np.ndarray | None
            ) -> tuple[dict[str, float], np.ndarray]:
    """Probe accuracy per task (probe.evaluate's recipe) and pooled-embedding fidelity.

    Returns the scores and the probe-test embeddings (all tasks, in order), which the
    original's call passes back as `reference` for the other models.
    """
    embed = Embedder(Path(path), tokenizer, threads=2)
    scores: dict[str, float] = {}
    tests = []
    for task, (fit_t, fit_y, test_t, test_y) in splits.items():
        test_x = embed(test_t)
        scores[task] = round(probe_accuracy(embed(fit_t), fit_y, test_x, test_y), 2)
        tests.append(test_x)
    test = np.concatenate(tests).astype(np.float64)
    if reference is not None:
        scores["fidelity"] = round(float(np.mean(cosines(test, reference))), 5)
    return scores, test


def agreement_all(srcs: Sequence[Source], builds: Sequence[Build], say: Progress) -> None:
    """Fills in STS-B dev, pooled cosine and neighbours@10 (benchmarks.quality) per model."""
    from benchmarks.quality import agreement, agreement_texts, stsb_spearman

    texts = agreement_texts()
    for src in srcs:
        original = Embedder(src.path, src.tokenizer, threads=2)
        base = original(texts)
        for build in [b for b in builds if b.source == src.key and b.path]:
            say(f"{src.key}: STS-B and agreement of {build.label}" +
                (f" ({build.setting})" if build.setting else ""))
            try:
                build.stsb = round(stsb_spearman(Path(build.path), src.tokenizer,  # type: ignore[arg-type]
                                                 embed=original if build.kind == "original"
                                                 else None), 2)
                if build.kind == "original":
                    build.pooled_cosine, build.neighbours = 1.0, 1.0
                    continue
                scores = agreement(base, Path(build.path), src.tokenizer, texts=texts)  # type: ignore[arg-type]
            except Exception as exc:  # a model that cannot run is a result, not a crash
                build.status += f"; quality failed: {type(exc).__name__}: {exc}"[:300]
                continue
            build.pooled_cosine = scores["pooled_cosine"]
            build.neighbours = scores["neighbours_at_10"]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.where(den == 0, 1.0, den)


# ---------------------------------------------------------------- run metadata


def machine_slug(fingerprint: dict[str, str]) -> str:
    """A short file-name-safe machine name: CPU model words and usable cores."""
    name = re.sub(r"\((R|TM)\)|\bCPU\b|\bProcessor\b|@.*$", " ", fingerprint["cpu"],
                  flags=re.IGNORECASE)
    words = [w.lower() for w in re.split(r"[^A-Za-z0-9]+", name) if w][:3]
    return "-".join([*words, f"{fingerprint['usable_cores']}c"])


def git_commit() -> str:
    """The checkout's short commit, with `+dirty` when files are modified."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    return f"commit {head}" + ("+dirty" if dirty.strip() else "")


# ---------------------------------------------------------------- run


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Mode]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="headline only: MiniLM, batch 1, 128 tokens, 1 thread, 50%%")
    parser.add_argument("--sources", nargs="+", choices=["minilm-l6", "paraphrase-l3"])
    parser.add_argument("--targets", nargs="+", type=float, metavar="F",
                        help="latency targets as fractions of dense (full: 0.8 0.6 0.5 0.4)")
    parser.add_argument("--shapes", nargs="+", type=_ints(3), metavar="B,S,T",
                        help="batch,tokens,threads settings (full: 1,128,1 1,128,2 8,128,1 "
                             "8,128,2 1,384,1 1,384,2)")
    parser.add_argument("--passes", nargs="+", type=_pass_arg, metavar="PASS:S",
                        help="passes alone and the tokens each is compiled for "
                             "(full: prune:128 skim:128 moe:128 skim:384)")
    parser.add_argument("--pass-flops", type=float, metavar="R",
                        help="FLOPs budget for each pass alone (default 0.5)")
    parser.add_argument("--seconds", type=float, help="minimum timing seconds per setting")
    parser.add_argument("--recover", nargs="+", metavar="TIME",
                        help="also compile each latency target with --recover TIME "
                             "(full: 10m)")
    parser.add_argument("--recover-steps", type=int, metavar="N",
                        help="also compile each latency target with --recover-steps N")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--work", type=Path, help="folder for built models (default: temp)")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    mode = dataclasses.replace(
        base, sources=tuple(args.sources or base.sources),
        shapes=tuple(args.shapes or base.shapes), targets=tuple(args.targets or base.targets),
        passes=tuple(args.passes or base.passes), pass_flops=args.pass_flops or base.pass_flops,
        seconds=args.seconds if args.seconds is not None else base.seconds,
        recover=tuple(args.recover or base.recover),
        recover_steps=args.recover_steps or base.recover_steps)
    # Results files are named by date and machine; a narrowed run must not overwrite them.
    args.suffix = ("-quick" if args.quick else "") + ("" if mode == base else "-custom")
    return args, mode


def _ints(n: int) -> Callable[[str], tuple[int, ...]]:
    def parse(text: str) -> tuple[int, ...]:
        values = tuple(int(v) for v in text.split(","))
        if len(values) != n or min(values) < 1:
            raise argparse.ArgumentTypeError(f"{text!r} is not {n} positive integers")
        return values
    return parse


def _pass_arg(text: str) -> tuple[str, int]:
    name, _, seq = text.partition(":")
    if name not in ("prune", "skim", "moe") or not seq.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not PASS:TOKENS, e.g. skim:384")
    return name, int(seq)


def build_all(mode: Mode, work: Path, say: Progress
              ) -> tuple[list[Source], list[Setting], list[Build]]:
    """Builds every model the mode names; returns the sources, settings and builds."""
    srcs = sources(mode.sources)
    settings = [Setting(s.key, *shape) for s in srcs for shape in mode.shapes]
    builds: list[Build] = []
    for src in srcs:
        builds.append(Build(f"{src.key}/original", src.key, "original", "original",
                            path=str(src.path), command=short(src.path)))
        builds += build_peers(src, work, say)
        compiled = planer_builds(src, [s for s in settings if s.source == src.key], mode,
                                 work, say)
        builds += compiled
        builds += [quantized(b, say) for b in compiled
                   if b.target in mode.int8_on and b.path and b.recover is None]
    return srcs, settings, builds


def measure_all(settings: Sequence[Setting], builds: Sequence[Build], seconds: float,
                say: Progress) -> list[dict[str, Any]]:
    """Times and memory-profiles every setting's models."""
    sections = []
    for setting in settings:
        members = [b for b in builds if b.belongs(setting) and b.path]
        say(f"{setting.source}: timing {len(members)} models at {setting.tag}")
        rows = time_setting(setting, members, f"{setting.source}/original", seconds)
        # Failed builds keep an (untimed) row so their error shows in the table.
        rows.update({b.key: {} for b in builds if b.belongs(setting) and not b.path})
        say(f"{setting.source}: runtime peak memory at {setting.tag}")
        for build in members:
            if "error" not in rows[build.key]:
                rows[build.key]["runtime_peak_mb"] = runtime_peak_mb(build.path, setting)  # type: ignore[arg-type]
        sections.append({**dataclasses.asdict(setting), "tag": setting.tag, "rows": rows,
                         "rounds": max(r.get("rounds", 0) for r in rows.values())})
    return sections


def probe_all(srcs: Sequence[Source], builds: Sequence[Build], splits: dict[str, Split],
              say: Progress) -> None:
    """Fills in each model's probe accuracy and fidelity (the original first)."""
    for src in srcs:
        reference = None
        for build in [b for b in builds if b.source == src.key and b.path]:
            say(f"{src.key}: probing {build.label}" +
                (f" ({build.setting})" if build.setting else ""))
            try:
                scores, test = quality(build.path, src.tokenizer, splits, reference)  # type: ignore[arg-type]
            except Exception as exc:  # a model the probe cannot run is a result, not a crash
                build.status += f"; probe failed: {type(exc).__name__}: {exc}"[:300]
                continue
            if build.kind == "original":
                reference, scores["fidelity"] = test, 1.0
            build.sst2, build.agnews = scores["sst2"], scores["agnews"]
            build.fidelity = scores.get("fidelity")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, mode = parse_args(argv)
    say = Progress()
    fingerprint = device_fingerprint(SessionOptions(threads=1))
    fingerprint.pop("threads")  # each table says its own
    date, machine = time.strftime("%Y-%m-%d"), machine_slug(fingerprint)
    stem = f"{date}-{machine}{args.suffix}"
    work = args.work or Path(tempfile.mkdtemp(prefix="planer-bench-run-"))
    say(f"building models in {work}")
    srcs, settings, builds = build_all(mode, work, say)
    sections = measure_all(settings, builds, mode.seconds, say)
    baseline_mb = runtime_peak_mb("-", settings[0])
    splits = probe_splits()
    probe_all(srcs, builds, splits, say)
    agreement_all(srcs, builds, say)
    titles = {s.key: s.title for s in srcs}
    doc = {"command": shlex.join(["python", "benchmarks/run.py", *argv]), "date": date,
           "machine": machine, "fingerprint": fingerprint, "planer": planer.__version__,
           "commit": git_commit(), "work": str(work), "sources": titles,
           "baseline_runtime_mb": baseline_mb, "timing_min_seconds": mode.seconds,
           "probe_test_texts": {task: len(split[2]) for task, split in splits.items()},
           "builds": [dataclasses.asdict(b) for b in builds], "settings": sections}
    args.out.mkdir(parents=True, exist_ok=True)
    for section in sections:
        section["title"] = Setting(section["source"], section["batch"], section["seq"],
                                   section["threads"]).title(titles[section["source"]])
        section["plot"] = f"{stem}-{section['source']}-{section['tag']}.png"
        say(f"plotting {section['plot']}")
        plot_setting(doc, section, args.out / section["plot"])
    doc["wall_s"] = round(say.elapsed(), 1)
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (args.out / f"{stem}.md").write_text(render_markdown(doc))
    say(f"wrote {short(args.out / stem)}.md, .json and {len(sections)} plot(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
