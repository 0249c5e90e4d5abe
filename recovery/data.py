"""Training batches for recovery: streamed, tokenized lazily, padded only to what they hold.

    texts (any number) ─ seeded shuffle per epoch ─ pools of `pool` batches ─ tokenize the
    pool ─ sort by length ─ cut into batches ─ shuffle the batches ─ pad each to its longest
    CalibrationSet.batches ─ cycled in a seeded order ─ trimmed to their longest real row

Only one pool is tokenized at a time, so tens of thousands of texts cost their strings,
not their padded rows. Sorting inside a pool puts texts of similar length together, so
short texts do not pay for 128 tokens; shuffling the batches keeps the order random.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import tokenizers

from planer.compiler.calibration import TEXT_INPUTS, CalibrationSet, ModelInputInfo

Feed = dict[str, np.ndarray]
_PAD_TOKENS = ("[PAD]", "<pad>")


def trim(feed: Mapping[str, np.ndarray]) -> Feed:
    """Cuts a text batch's [B, S] inputs to its longest real row (no-op without a mask)."""
    mask = feed.get("attention_mask")
    if mask is None or mask.ndim != 2:
        return dict(feed)
    real = np.flatnonzero(np.asarray(mask).any(axis=0))
    width = int(real.max()) + 1 if real.size else 1
    return {k: (v[:, :width] if k in TEXT_INPUTS and v.ndim == 2 else v)
            for k, v in feed.items()}


def rows(feed: Mapping[str, np.ndarray], index: np.ndarray) -> Feed:
    """Returns the batch rows `index` of every input (a DDP rank's shard)."""
    return {k: v[index] for k, v in feed.items()}


def real_mask(feed: Mapping[str, np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Returns the [B, S] real-token mask as float32 (all ones without an attention_mask)."""
    mask = feed.get("attention_mask")
    if mask is None or mask.shape != shape:
        return np.ones(shape, dtype=np.float32)
    return (np.asarray(mask) != 0).astype(np.float32)


class TextBatches:
    """An endless, seeded stream of tokenized batches over `texts`.

    Args:
        texts: the training texts (strings only are held).
        tokenizer: a loaded `tokenizers.Tokenizer` (`calibration.load_tokenizer`).
        inputs: the model's inputs (names and dtypes), as `model_input_infos` gives them.
        batch_size: texts per batch.
        max_len: truncation length in tokens.
        seed: shuffling seed.
        pool: batches tokenized and length-sorted together.
    """

    def __init__(self, texts: Sequence[str], tokenizer: tokenizers.Tokenizer,
                 inputs: Sequence[ModelInputInfo], *, batch_size: int = 32,
                 max_len: int = 128, seed: int = 0, pool: int = 16):
        if not texts:
            raise ValueError("no texts to train on")
        self.texts = list(texts)
        self.inputs = list(inputs)
        self.batch_size = batch_size
        self.pool = pool
        self.seed = seed
        self.pad_id = _pad_id(tokenizer)
        self.tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_len)

    def __iter__(self) -> Iterator[Feed]:
        rng = np.random.default_rng(self.seed)
        size = self.batch_size * self.pool
        while True:
            order = rng.permutation(len(self.texts))
            for start in range(0, len(order), size):
                chunk = [self.texts[i] for i in order[start:start + size]]
                encodings = sorted(self.tokenizer.encode_batch(chunk), key=lambda e: len(e.ids))
                groups = [encodings[i:i + self.batch_size]
                          for i in range(0, len(encodings), self.batch_size)]
                for g in rng.permutation(len(groups)):
                    yield self._feed(groups[g])

    def _feed(self, encodings: list[tokenizers.Encoding]) -> Feed:
        width = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), width), self.pad_id, dtype=np.int64)
        mask, types = np.zeros_like(ids), np.zeros_like(ids)
        for row, enc in enumerate(encodings):
            ids[row, :len(enc.ids)] = enc.ids
            mask[row, :len(enc.ids)] = 1
            types[row, :len(enc.ids)] = enc.type_ids
        positions = np.broadcast_to(np.arange(width), ids.shape)
        known = dict(zip(TEXT_INPUTS, (ids, mask, types, positions), strict=True))
        return {i.name: known[i.name].astype(i.dtype) for i in self.inputs}


def cycle_batches(calib: CalibrationSet, *, seed: int = 0) -> Iterator[Feed]:
    """Cycles the calibration set's fitting batches in a seeded order, each trimmed."""
    if not calib.batches:
        raise ValueError("the calibration set has no fitting batches")
    rng = np.random.default_rng(seed)
    while True:
        for i in rng.permutation(len(calib.batches)):
            yield trim(calib.batches[i])


def holdout_texts(calib: CalibrationSet) -> set[str]:
    """Returns the texts of the calibration set's holdout share (kept out of training)."""
    if not calib.texts or not calib.holdout:
        return set()
    return set(calib.texts[len(calib.texts) - calib.holdout_samples():])


def _pad_id(tokenizer: tokenizers.Tokenizer) -> int:
    if tokenizer.padding:
        return int(tokenizer.padding["pad_id"])
    ids = (tokenizer.token_to_id(token) for token in _PAD_TOKENS)
    return next((i for i in ids if i is not None), 0)
