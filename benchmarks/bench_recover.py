"""Recovery on the bundled MiniLM: a compiled model distilled for a budget, then scored.

    compiled OUT/model.onnx ─ recover(budget) on sst2/train + agnews/dev[:-2000] texts
    (calibration holdout from sst2/train for early stopping) ─ OUT/recovered.onnx
    ─ benchmarks.quality: STS-B dev, pooled cosine, neighbours@10 (before and after)

    python -m benchmarks.bench_recover COMPILED_DIR --budget 300 [--lr 1e-4] [--out FILE]

The AG News rows that `benchmarks.quality` measures agreement on are never trained on.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from benchmarks.probe import DATA
from benchmarks.quality import AGREEMENT_ROWS, evaluate
from planer.compiler.calibration import build_calibration, model_input_infos, read_texts
from planer.compiler.driver.cli import resolve_model
from planer.compiler.loading import load_model
from planer.fixtures.build import minilm_tokenizer_dir
from planer.recovery.distill import recover
from planer.recovery.train import RecoveryConfig


def training_texts(data: Path = DATA, mix: str = "balanced") -> list[str]:
    """Returns the training texts: SST-2 train and/or AG News dev without its last rows.

    "sst2+agnews" takes both whole (88% SST-2 phrases); "balanced" a seeded sample of
    SST-2 as large as the AG News part, so each makes half of the texts.
    """
    with (data / "agnews" / "dev.tsv").open(newline="") as handle:
        news = [r[0] for r in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)][1:]
    news = news[:-AGREEMENT_ROWS]
    sst2 = read_texts(data / "sst2" / "train.tsv")
    if mix == "balanced":
        rows = np.random.default_rng(0).choice(len(sst2), len(news), replace=False)
        return [sst2[i] for i in rows] + news
    return (sst2 if "sst2" in mix else []) + (news if "agnews" in mix else [])


def run(compiled_dir: Path, *, budget_s: float | None, max_steps: int | None,
        config: RecoveryConfig, mix: str, out: Path, score: bool = True) -> dict[str, Any]:
    """Recovers `compiled_dir/model.onnx`, writes `out`, returns the report and the scores."""
    original = resolve_model(None)
    tokenizer = minilm_tokenizer_dir()
    model = load_model(compiled_dir / "model.onnx")
    calib = build_calibration(DATA / "sst2" / "train.tsv", model_input_infos(model),
                              tokenizer=tokenizer, seq_len=128)
    started = time.perf_counter()
    report = recover(original, model, calib, budget_s=budget_s, max_steps=max_steps,
                     texts=training_texts(mix=mix), tokenizer=tokenizer, config=config,
                     progress=_printer(config.eval_every))
    ir.external_data.load_to_model(model)
    ir.save(model, out)
    result: dict[str, Any] = {"recovery": report.to_dict(), "mix": mix,
                              "seconds": round(time.perf_counter() - started, 1)}
    if score:
        result["quality"] = evaluate(original, [compiled_dir / "model.onnx", out])
    return result


def _printer(every: int) -> Any:
    def say(line: str) -> None:
        step = int(line.split()[2].rstrip(":"))
        if step % every == 0:
            print(line, flush=True)
    return say


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("compiled", type=Path, help="a planer compile output folder")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--mix", default="balanced",
                        choices=("balanced", "sst2+agnews", "sst2", "agnews"))
    parser.add_argument("--no-score", action="store_true")
    for field in dataclasses.fields(RecoveryConfig):
        if field.type in ("float", "int"):
            parser.add_argument(f"--{field.name.replace('_', '-')}",
                                type=float if field.type == "float" else int,
                                default=field.default)
    parser.add_argument("--schedule", default=RecoveryConfig.schedule)
    parser.add_argument("--layer-weighting", default=RecoveryConfig.layer_weighting)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    config = RecoveryConfig(**{f.name: getattr(args, f.name)
                               for f in dataclasses.fields(RecoveryConfig)})
    out = args.out or args.compiled / "recovered.onnx"
    result = run(args.compiled, budget_s=args.budget, max_steps=args.steps, config=config,
                 mix=args.mix, out=out, score=not args.no_score)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
