"""Quality as the original's behaviour: STS-B dev Spearman, pooled cosine, neighbour agreement.

    STS-B dev (1,500 pairs): Spearman of cos(mean-pool a, mean-pool b) with the gold score,
        x100 (what sentence-embedding users compare models by)
    agreement on AG News texts (the last 2,000 rows of agnews/dev.tsv, so training on its
        first rows never sees them):
        pooled cosine   mean over texts of cos(original embedding, compiled embedding)
        neighbours@10   share of each text's 10 nearest neighbours (cosine, itself left
                        out) among the compiled embeddings that the original's also returns

Embeddings come from `benchmarks.probe.Embedder` (the same tokenizer, truncation and
pooling as the probes), through ONNX Runtime.

    python -m benchmarks.quality ORIGINAL.onnx COMPILED.onnx [COMPILED2.onnx ...]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.probe import DATA, Embedder

AGREEMENT_ROWS = 2000  # the last rows of agnews/dev.tsv
NEIGHBOURS = 10


def stsb_pairs(data: Path = DATA) -> tuple[list[str], list[str], np.ndarray]:
    """Reads stsb/dev.tsv: (first sentences, second sentences, gold scores)."""
    with (data / "stsb" / "dev.tsv").open(newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [r[0] for r in rows], [r[1] for r in rows], np.asarray([float(r[2]) for r in rows])


def agreement_texts(data: Path = DATA, rows: int = AGREEMENT_ROWS) -> list[str]:
    """Returns the AG News texts agreement is measured on (the file's last `rows` rows)."""
    with (data / "agnews" / "dev.tsv").open(newline="") as handle:
        texts = [r[0] for r in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)][1:]
    return texts[-rows:]


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.sum(a * b, axis=1)


def stsb_spearman(model: Path, tokenizer: Path | None = None, *, data: Path = DATA,
                  threads: int = 2, embed: Embedder | None = None) -> float:
    """Returns STS-B dev Spearman (x100) of the model's mean-pooled cosine similarities."""
    from scipy.stats import spearmanr

    embed = embed or Embedder(model, _tokenizer(tokenizer), threads=threads)
    first, second, gold = stsb_pairs(data)
    cos = _cosine_rows(embed(first), embed(second))
    return float(spearmanr(cos, gold).statistic * 100.0)


def neighbours(x: np.ndarray, k: int = NEIGHBOURS) -> np.ndarray:
    """Returns each row's k nearest other rows by cosine, [N, k]."""
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    return np.argpartition(-sims, k, axis=1)[:, :k]


def agreement(original: Path | np.ndarray, compiled: Path, tokenizer: Path | None = None, *,
              texts: Sequence[str] | None = None, k: int = NEIGHBOURS, threads: int = 2
              ) -> dict[str, float]:
    """Measures how closely `compiled` reproduces `original` on AG News texts.

    Args:
        original: the original model, or its embeddings of `texts` (computed once).
        compiled: the compiled model.
        tokenizer: tokenizer folder (default: the bundled MiniLM's).
        texts: texts to embed (default: `agreement_texts()`).
        k: neighbours compared per text.
        threads: ORT intra-op threads.
    """
    texts = list(texts) if texts is not None else agreement_texts()
    tok = _tokenizer(tokenizer)
    base = original if isinstance(original, np.ndarray) else \
        Embedder(original, tok, threads=threads)(texts)
    mine = Embedder(compiled, tok, threads=threads)(texts)
    a, b = neighbours(base, k), neighbours(mine, k)
    shared = [len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)]
    return {"pooled_cosine": round(float(_cosine_rows(base, mine).mean()), 4),
            f"neighbours_at_{k}": round(float(np.mean(shared)), 4)}


def evaluate(original: Path, compiled: Sequence[Path], tokenizer: Path | None = None, *,
             threads: int = 2) -> list[dict[str, Any]]:
    """Scores the original and each compiled model: STS-B dev and agreement."""
    tok = _tokenizer(tokenizer)
    texts = agreement_texts()
    base = Embedder(original, tok, threads=threads)
    results = [{"model": str(original), "stsb_dev": round(stsb_spearman(original, embed=base), 2)}]
    base_x = base(texts)
    for path in compiled:
        results.append({"model": str(path),
                        "stsb_dev": round(stsb_spearman(path, tok, threads=threads), 2),
                        **agreement(base_x, path, tok, texts=texts, threads=threads)})
    return results


def _tokenizer(tokenizer: Path | None) -> Path:
    if tokenizer is not None:
        return tokenizer
    from planer.fixtures.build import minilm_tokenizer_dir

    return minilm_tokenizer_dir()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("original", type=Path)
    parser.add_argument("compiled", nargs="+", type=Path)
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    for row in evaluate(args.original, args.compiled, args.tokenizer, threads=args.threads):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
