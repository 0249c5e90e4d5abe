"""Token skimming on all-MiniLM-L6-v2: latency (ORT CPU, interleaved) and quality probes.

    python benchmarks/bench_skim.py latency --keep 2:0.5 --threads 1
    python benchmarks/bench_skim.py probe --keep 2:0.5 --batch 1 --batch 8
    python benchmarks/bench_skim.py compare --keep 2:0.5        # fitted vs training-free
    python -m benchmarks.bench_skim score OUT [OUT ...]         # compiled folders: latency
        (60 interleaved rounds vs the original, batch 1, 128 tokens) and benchmarks.quality

Variants of the skim model (same kept-token count, only the choice differs):
  attention      training-free: attention received in the previous layer
  cls            training-free: [CLS] attention row of the previous layer
  fit-attention  fitted predictor reproducing `attention` from the layer input
  fit-future     fitted predictor of attention received over all remaining layers

Probe recipe (shared/data/README.md): logistic regression on mean-pooled final hidden
states (mean over real tokens; skimmed tokens carry their forwarded state) of the first
5000 sst2/train.tsv rows, accuracy on sst2/dev.tsv; AG News: fit on the first 4000 rows
of agnews/dev.tsv, score on the next 2000. Same recipe for every model. Calibration for
fitting predictors: sst2/train.tsv rows 10000+ and agnews rows 6000+; held-out fidelity:
sst2 rows 20000+ and agnews rows 8000+ (never the probe rows).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from planer.compiler.calibration import load_tokenizer, read_texts
from planer.compiler.driver.pipeline import read_canonical
from planer.cost_model.timing import SessionOptions, make_session, ratios, time_interleaved
from planer.passes.skim_fit import fit_predictors, skim_report
from planer.passes.token_skim import TokenSkimConfig, apply_token_skim

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = Path("/tmp/planer-bench-skim")


def build(path: Path, config: TokenSkimConfig | None, out: Path) -> Path:
    """Writes the canonical model, skimmed per `config` (dense when None), to `out`."""
    model, spec = read_canonical(path)
    if config is not None:
        apply_token_skim(model, spec, config)
    out.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, out)
    return out


# ---------------------------------------------------------------- data


def tokenizer():
    from planer.fixtures.build import minilm_tokenizer_dir

    return load_tokenizer(minilm_tokenizer_dir())


def encode(texts: list[str], *, max_len: int = 128) -> list[list[int]]:
    tok = tokenizer()
    tok.no_padding()
    tok.enable_truncation(max_len)
    return [e.ids for e in tok.encode_batch(texts)]


def batches(ids: list[list[int]], batch: int) -> list[dict[str, np.ndarray]]:
    """Batches in the given order (uneven lengths), padded to each batch's longest row."""
    feeds = []
    for start in range(0, len(ids), batch):
        group = ids[start : start + batch]
        width = max(len(row) for row in group)
        x = np.zeros((len(group), width), dtype=np.int64)
        m = np.zeros_like(x)
        for r, row in enumerate(group):
            x[r, : len(row)], m[r, : len(row)] = row, 1
        feeds.append({"input_ids": x, "attention_mask": m, "token_type_ids": np.zeros_like(x)})
    return feeds


def labelled(path: Path) -> tuple[list[str], np.ndarray]:
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]
    rows = [r for r in rows if len(r) == 2 and r[1] != "label"]
    _, labels = np.unique([r[1] for r in rows], return_inverse=True)
    return [r[0] for r in rows], labels


def probe_sets() -> dict[str, tuple[list[str], np.ndarray, list[str], np.ndarray]]:
    sst_train, sst_train_y = labelled(DATA / "sst2" / "train.tsv")
    sst_dev, sst_dev_y = labelled(DATA / "sst2" / "dev.tsv")
    ag, ag_y = labelled(DATA / "agnews" / "dev.tsv")
    return {
        "sst2": (sst_train[:5000], sst_train_y[:5000], sst_dev, sst_dev_y),
        "agnews": (ag[:4000], ag_y[:4000], ag[4000:6000], ag_y[4000:6000]),
    }


def calibration_feeds(n: int = 512, batch: int = 8, *, holdout: bool = False
                      ) -> list[dict[str, np.ndarray]]:
    """Unlabelled fitting rows (sst2 10000+, agnews 6000+) or held-out ones (20000+, 8000+)."""
    s0, a0 = (20000, 8000) if holdout else (10000, 6000)
    sst = read_texts(DATA / "sst2" / "train.tsv")[s0 : s0 + n // 2]
    ag = read_texts(DATA / "agnews" / "dev.tsv")[a0 : a0 + n // 2]
    return batches(encode(sst + ag), batch)


# ---------------------------------------------------------------- measurements


def embed(path: Path, ids: list[list[int]], batch: int, threads: int = 2) -> np.ndarray:
    session = make_session(path, SessionOptions(threads=threads))
    pooled = []
    for feed in batches(ids, batch):
        hidden = session.run(None, feed)[0]
        w = feed["attention_mask"][..., None].astype(np.float64)
        pooled.append((hidden * w).sum(1) / w.sum(1))
    return np.concatenate(pooled)


def probe(paths: dict[str, Path], batch_sizes: list[int]) -> dict[str, dict[str, float]]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    result: dict[str, dict[str, float]] = {}
    for task, (train, y_train, test, y_test) in probe_sets().items():
        ids_train, ids_test = encode(train), encode(test)
        for name, path in paths.items():
            for batch in batch_sizes:
                start = time.perf_counter()
                a, b = embed(path, ids_train, batch), embed(path, ids_test, batch)
                scaler = StandardScaler().fit(a)
                clf = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(a), y_train)
                acc = float(clf.score(scaler.transform(b), y_test))
                result.setdefault(f"{name}/b{batch}", {})[task] = round(100 * acc, 2)
                print(f"{task:7s} {name:14s} batch {batch}: {100 * acc:.2f}% "
                      f"({time.perf_counter() - start:.0f}s)", flush=True)
    return result


def latency(paths: dict[str, Path], batch: int, threads: int, seconds: float) -> dict:
    texts = read_texts(DATA / "agnews" / "dev.tsv")[6000:]
    ids = encode(texts, max_len=128)
    if batch == 1:  # one real 128-token input
        row = next(r for r in ids if len(r) >= 128)[:128]
        feeds = batches([row], 1)[0]
    else:  # real sentences of uneven length, padded to the longest
        feeds = batches(ids[:batch], batch)[0]
    sessions = {name: make_session(p, SessionOptions(threads=threads)) for name, p in paths.items()}
    timings = time_interleaved(sessions, feeds, warmup=5, repeats=30, min_seconds=seconds)
    rel = ratios(timings, "dense")
    return {
        "batch": batch, "threads": threads, "shape": list(feeds["input_ids"].shape),
        "real_tokens": feeds["attention_mask"].sum(1).tolist(),
        "median_ms": {k: round(t.median_ms, 2) for k, t in timings.items()},
        "ratio_to_dense": {k: round(v, 3) for k, v in rel.items()},
    }


# ---------------------------------------------------------------- CLI


def parse_keep(text: str) -> dict[int, float]:
    keep = {}
    for item in text.split(","):
        layer, ratio = item.split(":")
        keep[int(layer)] = float(ratio)
    return keep


def variants(source: Path, keep: dict[int, float], which: list[str],
             lowering: str = "ort") -> dict[str, Path]:
    paths = {"dense": build(source, None, OUT / "dense.onnx")}
    fitted: dict[str, object] = {}
    for name in which:
        if name in ("attention", "cls"):
            config = TokenSkimConfig(keep=keep, score=name, lowering=lowering)
        else:
            target = name.split("-", 1)[1]
            if target not in fitted:
                model, spec = read_canonical(source)
                fit = fit_predictors(model, spec, sorted(keep), calibration_feeds(), target=target)
                print(f"fitted {target}: train mse {fit.train_loss}, holdout {fit.holdout_loss}",
                      flush=True)
                fitted[target] = fit.predictors
            config = TokenSkimConfig(keep=keep, predictors=fitted[target],  # type: ignore[arg-type]
                                     lowering=lowering)
        paths[name] = build(source, config, OUT / f"{name}-{lowering}.onnx")
    return paths


def score(outs: list[Path], threads: int, repeats: int = 60) -> list[dict[str, object]]:
    """Scores compiled OUT folders: latency ratio to the original, then quality."""
    from benchmarks.quality import evaluate
    from planer.compiler.driver.latency import measure_ratio
    from planer.compiler.driver.pipeline import read_model
    from planer.fixtures.build import minilm_path, minilm_tokenizer_dir

    dense = minilm_path("dynamo")
    _, spec = read_model(dense)
    rows: list[dict[str, object]] = []
    for out in outs:
        ratio, medians = measure_ratio(dense, out / "model.onnx", batch=1, seq_len=128,
                                       threads=threads, vocab=spec.vocab_size,
                                       repeats=repeats)
        rows.append({"out": str(out), "latency_ratio": round(ratio, 4),
                     "median_ms": {k: round(v, 3) for k, v in medians.items()}})
        print(json.dumps(rows[-1]), flush=True)
    scores = evaluate(dense, [out / "model.onnx" for out in outs], minilm_tokenizer_dir())
    print(f"original STS-B dev {scores[0]['stsb_dev']}")
    for row, result in zip(rows, scores[1:], strict=True):
        row.update({k: v for k, v in result.items() if k != "model"})
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    from planer.fixtures.build import minilm_path

    parser = argparse.ArgumentParser(prog="bench_skim")
    parser.add_argument("what", choices=["latency", "probe", "compare", "score"])
    parser.add_argument("outs", nargs="*", type=Path, help="compiled OUT folders (score)")
    parser.add_argument("--keep", default="2:0.5", help="layer:ratio,... (default 2:0.5)")
    parser.add_argument("--variant", action="append", help="skim variants (default attention)")
    parser.add_argument("--lowering", default="ort", choices=["ort", "tensorrt"])
    parser.add_argument("--batch", type=int, action="append")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args(argv)
    if args.what == "score":
        score(args.outs, args.threads)
        return 0
    keep = parse_keep(args.keep)
    source = minilm_path("dynamo")
    which = args.variant or ["attention"]
    paths = variants(source, keep, which, args.lowering)
    paths["original"] = source
    report: dict[str, object] = {"keep": keep, "lowering": args.lowering}
    if args.what == "latency":
        for batch in args.batch or [1, 8]:
            report[f"latency_b{batch}"] = latency(paths, batch, args.threads, args.seconds)
    elif args.what == "probe":
        del paths["original"]
        report["probe"] = probe(paths, args.batch or [1])
    else:
        model, spec = read_canonical(source)
        holdout = calibration_feeds(n=512, holdout=True)
        for name in which:
            skimmed = ir.load(paths[name])
            report[name] = skim_report(model, skimmed, sorted(keep), holdout,
                                       num_layers=len(spec.layers))
            print(name, json.dumps(report[name]), flush=True)
    print(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
