"""Measures how well planer's quality model ranks real plans (issue: latency search).

The quality model predicts a plan's loss as the sum of the label-free removal costs of
the units it removes (cost_model.search.predicted_loss). This compiles random
non-uniform plans of all-MiniLM-L6-v2, measures each one's held-out fidelity (1 - mean
pooled cosine to the dense model on held-out SST-2 calibration texts) and reports the
Spearman rank correlation between predicted and measured loss.

    python -m benchmarks.bench_quality_model [--plans 8] [--out F]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.probe import DATA
from planer.compiler.calibration import build_calibration, model_input_infos
from planer.compiler.driver.pipeline import compile_plan, read_model
from planer.compiler.plan import parse_plan
from planer.cost_model.search import predicted_loss
from planer.fixtures.build import minilm_path, minilm_tokenizer_dir
from planer.passes.prune_fit import capture_layers, importance


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (no ties expected in continuous measurements)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    src, tok = minilm_path("dynamo"), minilm_tokenizer_dir()
    calib_path = DATA / "sst2" / "train.tsv"
    model, spec = read_model(src)
    calib = build_calibration(calib_path, model_input_infos(model), tokenizer=tok,
                              vocab_size=spec.vocab_size, seq_len=128)
    scores = importance(spec, capture_layers(model, spec, calib.batches))
    rng = np.random.default_rng(args.seed)
    work = Path(tempfile.mkdtemp(prefix="planer-quality-"))
    rows = []
    for i in range(args.plans):
        layers = [{"heads": int(rng.integers(2, 13)), "ffn": int(rng.integers(4, 17)) * 96}
                  for _ in spec.layers]
        plan = parse_plan({"layers": layers}, spec)
        result = compile_plan(src, work / f"p{i}", plan_data={"layers": layers},
                              calibration=calib_path, tokenizer=tok)
        measured = 1.0 - result.report["fidelity"]["pooled_cosine"]["mean"]
        rows.append({"plan": [(la["heads"], la["ffn"]) for la in layers],
                     "predicted_loss": round(predicted_loss(spec, scores, plan), 5),
                     "measured_loss": round(measured, 5)})
        print(json.dumps(rows[-1]), flush=True)
    rho = spearman([r["predicted_loss"] for r in rows], [r["measured_loss"] for r in rows])
    print(json.dumps({"spearman": round(rho, 3), "plans": len(rows)}))
    if args.out:
        args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "spearman": rho,
                                        "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
