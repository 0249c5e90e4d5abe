"""Next-token perplexity of causal language models on held-out AG News text, through ORT.

    text ─ tokenizer ─ ids [1, ≤ S] ─ model.onnx ─ logits [1, S, V]
         ─ log-softmax ─ −log p(token t+1 | tokens ≤ t), summed over every text
         ─ perplexity = exp(Σ NLL / predicted tokens)

Each model named runs on the same token ids (one text per run, no padding, at most
`--seq-len` tokens, so every prompt is full-length for its text); the first model is the
reference the others are compared with. The texts are the last 2,000 rows of
`agnews/dev.tsv` (as in benchmarks.quality), so calibration on its first rows
(`--write-calibration FILE` writes them) never sees them.

    python -m benchmarks.perplexity ORIGINAL.onnx COMPILED.onnx --tokenizer DIR

Reads models whose output is next-token logits [B, S, V] (an export with the LM head,
for example planer.fixtures.decoders.export_lm); a model whose output is narrower than
the token ids (hidden states) is refused with a sentence.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from benchmarks.probe import DATA

HELD_OUT_ROWS = 2000  # the last rows of agnews/dev.tsv, as in benchmarks.quality
SEQ_LEN = 128


def agnews_texts(data: Path = DATA) -> list[str]:
    """Returns every text of agnews/dev.tsv (its header row left out)."""
    with (data / "agnews" / "dev.tsv").open(newline="") as handle:
        return [r[0] for r in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)][1:]


def held_out_texts(data: Path = DATA, rows: int = HELD_OUT_ROWS) -> list[str]:
    """Returns the texts perplexity is measured on: the file's last `rows` rows."""
    return agnews_texts(data)[-rows:]


def write_calibration(path: Path, data: Path = DATA, rows: int = HELD_OUT_ROWS) -> int:
    """Writes the AG News texts before the held-out rows to `path`, one per line."""
    texts = agnews_texts(data)[:-rows]
    path.write_text("".join(" ".join(t.split()) + "\n" for t in texts))
    return len(texts)


def encode(tokenizer_path: Path, texts: Sequence[str], seq_len: int) -> list[np.ndarray]:
    """Tokenizes `texts` (special tokens as the tokenizer adds them), cut to `seq_len` ids."""
    import tokenizers

    file = tokenizer_path / "tokenizer.json" if tokenizer_path.is_dir() else tokenizer_path
    tok = tokenizers.Tokenizer.from_file(str(file))
    tok.no_padding()
    tok.no_truncation()
    return [np.asarray(e.ids[:seq_len], np.int64) for e in tok.encode_batch(list(texts))
            if len(e.ids) >= 2]


class LogitsModel:
    """An ORT session over a causal LM's ONNX export that returns [1, S, V] logits."""

    def __init__(self, path: Path, *, threads: int = 1):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        output = self.session.get_outputs()[0]
        self.output = output.name
        if "input_ids" not in self.inputs or output.shape is None or len(output.shape) != 3:
            raise ValueError(f"{path} does not map input_ids to logits [B, S, V] (its first "
                             f"output {output.name!r} has shape {output.shape}); export the "
                             "model with its LM head.")

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Runs one unpadded sequence; returns its [S, V] logits as float64."""
        feed = {"input_ids": ids[None, :], "attention_mask": np.ones((1, ids.size), np.int64)}
        out = self.session.run([self.output], {k: v for k, v in feed.items() if k in self.inputs})
        return out[0][0].astype(np.float64)


def token_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Returns −log p(ids[t+1] | ids[≤ t]) for t = 0 .. S−2 from [S, V] logits."""
    shifted = logits[:-1] - logits[:-1].max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=-1))
    return log_z - shifted[np.arange(ids.size - 1), ids[1:]]


def perplexities(models: Sequence[Path], sequences: Sequence[np.ndarray], *,
                 threads: int = 1) -> list[dict[str, Any]]:
    """Returns, per model, its perplexity, mean NLL, tokens predicted and top-1 agreement.

    Top-1 agreement is the share of predicted positions whose argmax equals the first
    model's.
    """
    sessions = [LogitsModel(p, threads=threads) for p in models]
    top_id = max(int(ids.max()) for ids in sequences)
    nll = np.zeros(len(models))
    agree = np.zeros(len(models))
    tokens = 0
    for ids in sequences:
        reference = None
        for k, session in enumerate(sessions):
            logits = session.logits(ids)
            if logits.shape[-1] <= top_id:
                raise ValueError(f"{models[k]} returns {logits.shape[-1]} values per token, "
                                 f"too few for token id {top_id}: it is not the next-token "
                                 "logits of this tokenizer's vocabulary (export the LM head).")
            nll[k] += float(token_nll(logits, ids).sum())
            top = logits[:-1].argmax(axis=-1)
            reference = top if reference is None else reference
            agree[k] += float(np.sum(top == reference))
        tokens += ids.size - 1
    return [{"model": str(path), "perplexity": round(math.exp(nll[k] / tokens), 4),
             "nll": round(nll[k] / tokens, 5), "tokens": tokens,
             "top1_agreement": round(agree[k] / tokens, 5)}
            for k, path in enumerate(models)]


def main(argv: list[str] | None = None) -> int:
    """Prints one line per model (perplexity, NLL, top-1 agreement with the first)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perplexity",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path, help="ORIGINAL.onnx COMPILED.onnx ...")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.json or a folder holding it")
    parser.add_argument("--texts", type=int, default=HELD_OUT_ROWS,
                        help="how many held-out texts (from the end of agnews/dev.tsv)")
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--write-calibration", type=Path, metavar="FILE",
                        help="write the AG News texts before the held-out rows and exit")
    args = parser.parse_args(argv)
    if args.write_calibration is not None:
        count = write_calibration(args.write_calibration, args.data)
        print(f"wrote {count} calibration texts to {args.write_calibration}")
        return 0
    if not args.models or args.tokenizer is None:
        parser.error("name at least one model and --tokenizer")
    texts = held_out_texts(args.data)[-args.texts:]
    sequences = encode(args.tokenizer, texts, args.seq_len)
    started = time.perf_counter()
    rows = perplexities(args.models, sequences, threads=args.threads)
    for row in rows:
        print(f"{row['model']}: perplexity {row['perplexity']:.3f} (NLL {row['nll']:.4f} over "
              f"{row['tokens']} tokens), top-1 agreement {row['top1_agreement']:.4f}")
    print(f"{len(sequences)} texts, at most {args.seq_len} tokens each, "
          f"{time.perf_counter() - started:.1f} s")
    if args.json is not None:
        args.json.write_text(json.dumps({"texts": len(sequences), "seq_len": args.seq_len,
                                         "models": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
