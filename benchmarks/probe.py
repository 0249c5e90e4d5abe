"""The quality probe from shared/data/README.md: logistic regression on mean-pooled embeddings.

SST-2: fit on a seeded sample of `sst2/train.tsv` rows, score on `sst2/dev.tsv` (872).
AG News: fit on the first rows of `agnews/dev.tsv`, score on the following rows (fixed).
The same recipe (tokenizer, sequence cap, probe, seeds) scores the dense and the compiled
model, so accuracy differences come from the model alone.

    python -m benchmarks.probe MODEL.onnx [MODEL2.onnx ...]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from planer.compiler.calibration import load_tokenizer
from planer.compiler.capture import main_output

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SST2_TRAIN_ROWS = 5000
AGNEWS_FIT_ROWS = 4000
AGNEWS_TEST_ROWS = 2000
MAX_TOKENS = 128
SEED = 0
FLOAT_TYPES = ("tensor(float)", "tensor(float16)", "tensor(double)")


def read_labelled(path: Path) -> tuple[list[str], np.ndarray]:
    """Reads a `text<TAB>label` file with a header row; labels become class indices."""
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    names = sorted({r[1] for r in rows})
    return [r[0] for r in rows], np.asarray([names.index(r[1]) for r in rows])


Split = tuple[list[str], np.ndarray, list[str], np.ndarray]


def probe_splits(data: Path = DATA) -> dict[str, Split]:
    """Returns {task: (fit texts, fit labels, test texts, test labels)} for SST-2 and AG News."""
    texts, labels = read_labelled(data / "sst2" / "train.tsv")
    rows = np.random.default_rng(SEED).choice(len(texts), SST2_TRAIN_ROWS, replace=False)
    dev_texts, dev_labels = read_labelled(data / "sst2" / "dev.tsv")
    ag_texts, ag_labels = read_labelled(data / "agnews" / "dev.tsv")
    stop = AGNEWS_FIT_ROWS + AGNEWS_TEST_ROWS
    return {
        "sst2": ([texts[i] for i in rows], labels[rows], dev_texts, dev_labels),
        "agnews": (ag_texts[:AGNEWS_FIT_ROWS], ag_labels[:AGNEWS_FIT_ROWS],
                   ag_texts[AGNEWS_FIT_ROWS:stop], ag_labels[AGNEWS_FIT_ROWS:stop]),
    }


def hidden_output(session: ort.InferenceSession, model: Path) -> str:
    """Names the token hidden states: the session's first float output of rank 3.

    Not output 0: third-party exports such as paraphrase-MiniLM-L3-v2 echo input_ids and
    attention_mask there, and pooling token ids would score an embedding that isn't one.
    """
    outputs = session.get_outputs()
    name = main_output(outputs)  # the same choice planer's own fidelity check makes
    chosen = next(o for o in outputs if o.name == name)
    if chosen.type in FLOAT_TYPES and chosen.shape is not None and len(chosen.shape) == 3:
        return name
    found = ", ".join(f"{o.name} {o.type} {o.shape}" for o in outputs)
    raise ValueError(f"{model} has no float output of rank 3 (token hidden states "
                     f"[batch, tokens, width]) for the probe to pool; its outputs are: {found}.")


class Embedder:
    """Mean-pools a model's token hidden states over real tokens, batching texts by length.

    The hidden states are the first float output of rank 3 (`hidden_output`); the session
    computes only that output.
    """

    def __init__(self, model: Path, tokenizer_dir: Path, *, threads: int = 2):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model), options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.output = hidden_output(self.session, model)
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.no_padding()

    def __call__(self, texts: Sequence[str], batch: int = 32) -> np.ndarray:
        encoded = self.tokenizer.encode_batch(list(texts))
        order = np.argsort([len(e.ids) for e in encoded], kind="stable")
        chunks = []
        for start in range(0, len(order), batch):
            rows = order[start:start + batch]
            width = max(len(encoded[i].ids) for i in rows)
            ids = np.zeros((len(rows), width), np.int64)
            mask = np.zeros((len(rows), width), np.int64)
            for r, i in enumerate(rows):
                n = len(encoded[i].ids)
                ids[r, :n], mask[r, :n] = encoded[i].ids, 1
            feed = {"input_ids": ids, "attention_mask": mask,
                    "token_type_ids": np.zeros_like(ids)}
            hidden = self.session.run([self.output],
                                      {k: v for k, v in feed.items() if k in self.inputs})[0]
            weights = mask[..., None].astype(np.float32)
            chunks.append((rows, (hidden * weights).sum(1) / weights.sum(1)))
        result = np.zeros((len(texts), chunks[0][1].shape[1]), np.float32)
        for rows, pooled in chunks:
            result[rows] = pooled
        return result


def probe_accuracy(fit_x: np.ndarray, fit_y: np.ndarray, test_x: np.ndarray,
                   test_y: np.ndarray) -> float:
    """Fits the logistic-regression probe and returns test accuracy (percent)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    probe.fit(fit_x, fit_y)
    return float(probe.score(test_x, test_y) * 100.0)


def evaluate(model: Path, tokenizer_dir: Path, *, threads: int = 2) -> dict[str, float]:
    """Returns probe accuracy per task for one model."""
    embed = Embedder(model, tokenizer_dir, threads=threads)
    scores = {}
    for task, (fit_t, fit_y, test_t, test_y) in probe_splits().items():
        scores[task] = round(probe_accuracy(embed(fit_t), fit_y, embed(test_t), test_y), 2)
    return scores


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--tokenizer", type=Path, default=None)
    args = parser.parse_args(argv)
    tokenizer = args.tokenizer
    if tokenizer is None:
        from planer.fixtures.build import minilm_tokenizer_dir

        tokenizer = minilm_tokenizer_dir()
    for model in args.models:
        print(json.dumps({"model": str(model), **evaluate(model, tokenizer)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
