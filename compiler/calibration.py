"""Turns a calibration file into ONNX Runtime feeds, split into a fitting and a holdout share.

Flow:  texts (.txt/.tsv/.csv/.jsonl) ─ seeded sample ─ tokenizer ─ pad to S or bucket by length
       ─ {input_ids, attention_mask, token_type_ids, position_ids} in the model's dtypes
       tensors (.npz) ─ names and shapes checked against the model ─ seeded sample ─ batches
       nothing ─ random_feeds, with a warning (fine for exactness checks, poor for fitting)

The holdout share is the tail of the shuffled sample and never reaches a fitting step, so
quality measured on it is not measured on data a pass has seen.

Requires: the caller lists the model's inputs (`model_input_infos`) and, for text, passes
the word-embedding rows as `vocab_size`.  Preserves: every feed holds exactly the inputs
the model declares, in the model's dtypes.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import tokenizers

from planer.compiler import files
from planer.compiler.errors import BadInputError
from planer.compiler.loading import position_limit, sequence_too_long

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
DEFAULT_SEQ_LEN = 128  # random fallback when neither --seq-len nor the model fixes one
DEFAULT_SAMPLES = 256  # samples read (a quarter held out) unless --calibration-samples
DEFAULT_MAX_LEN = 512  # bucketing cap when the tokenizer configures no truncation
_IMAGE_SIDE = 224  # symbolic height/width of pixel_values in the random fallback
_HEADER_NAMES = frozenset(
    ["sentence", "sentence1", "text", "content", "review", "document", "passage", "query"]
    + ["question", "body", "input", "title", "premise"]
)
_PAD_TOKENS = ("[PAD]", "<pad>")
MAX_TEXT_BYTES = 512 * files.MIB  # compile samples a few hundred texts; a larger file is a mistake
MAX_NPZ_BYTES = 4 * files.GIB
MAX_TOKENIZER_BYTES = 256 * files.MIB


@dataclasses.dataclass(frozen=True)
class ModelInputInfo:
    """One graph input of the model: its name, element type and (partly symbolic) shape."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]  # symbolic dims as str, unknown dims as None
    max_len: int | None = None  # longest sequence the model's position table allows


@dataclasses.dataclass
class CalibrationSet:
    """Feeds for ONNX Runtime: a share for fitting and a disjoint share for verification."""

    batches: list[Feed]  # fitting share
    holdout: list[Feed]  # verification share, never used for fitting
    source: str  # one line for the user, e.g. "sst2/train.tsv: 512 texts, seq 128"
    texts: list[str] | None = None  # sampled texts, fitting then holdout (rows may be bucketed)
    synthetic: bool = False  # True for the random fallback

    def num_samples(self) -> int:
        """Count the samples in the fitting share."""
        return sum(_rows(feed) for feed in self.batches)

    def holdout_samples(self) -> int:
        """Count the samples in the holdout share."""
        return sum(_rows(feed) for feed in self.holdout)


@dataclasses.dataclass(frozen=True)
class _Sampling:
    batch_size: int
    max_samples: int
    holdout_fraction: float
    seed: int
    exact: bool  # the model fixes the batch dimension, so a short last batch is dropped

    def split(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw seeded row indices of `n` samples: the fitting share, then the holdout tail."""
        order = np.random.default_rng(self.seed).permutation(n)[: self.max_samples]
        n_hold = 0
        if len(order) >= 2 and self.holdout_fraction > 0:
            n_hold = min(len(order) - 1, max(1, math.ceil(self.holdout_fraction * len(order))))
        return order[: len(order) - n_hold], order[len(order) - n_hold :]

    def chunks(self, rows: np.ndarray) -> list[np.ndarray]:
        """Cut `rows` into consecutive batches."""
        size, n = self.batch_size, len(rows)
        return [rows[i : i + size] for i in range(0, n, size) if not self.exact or i + size <= n]

    def shares(self, feeds: Feed, n: int) -> tuple[list[Feed], list[Feed]]:
        """Cut `n` samples of ready tensors into fitting and holdout batches."""
        fit, hold = self.split(n)

        def take(rows: np.ndarray) -> Feed:
            return {name: array[rows] for name, array in feeds.items()}

        return [take(r) for r in self.chunks(fit)], [take(r) for r in self.chunks(hold)]


def model_input_infos(model: ir.Model) -> list[ModelInputInfo]:
    """Describe the model's graph inputs, leaving out initializers listed as inputs.

    Token inputs carry the model's position limit, so no feed is built longer than it.
    """
    infos = []
    limit = position_limit(model)
    for value in model.graph.inputs:
        if value.name in model.graph.initializers or value.dtype is None:
            continue
        dims = value.shape or ()
        shape = tuple(d if isinstance(d, int) else getattr(d, "value", None) for d in dims)
        infos.append(ModelInputInfo(str(value.name), np.dtype(value.dtype.numpy()), shape,
                                    limit if value.name in TEXT_INPUTS else None))
    return infos


def read_texts(path: str | Path) -> list[str]:
    """Read the non-empty texts of a calibration file, one per line or row, stripped.

    `.tsv`/`.csv` give their first column without a detected header row, `.jsonl` (or
    `.json` lines) each record's `text` field, anything else one text per line; an unknown
    suffix is sniffed from the first line.

    Raises:
        BadInputError: the file is missing, unreadable, not UTF-8 text, malformed or empty.

    """
    path = Path(path)
    content = _read_utf8(path)
    kind = _text_kind(path, content)
    if kind == "json":
        texts = _json_texts(path, content)
    elif kind in ("tsv", "csv"):
        texts = _table_texts(content, kind)
    else:
        texts = content.splitlines()
    texts = [t.strip() for t in texts if t.strip()]
    if not texts:
        raise BadInputError(f"calibration file {path} is empty: it holds no non-blank text.")
    return texts


def load_tokenizer(path: str | Path, *, vocab_size: int | None = None) -> tokenizers.Tokenizer:
    """Load a tokenizer from a `tokenizer.json` or a folder holding one (or a `vocab.txt`).

    A folder with only `vocab.txt` gets a BERT WordPiece tokenizer that adds [CLS]/[SEP],
    lower-casing as `tokenizer_config.json`'s `do_lower_case` says (default True).

    Raises:
        BadInputError: nothing loadable is there, or the tokenizer has more tokens than
            the model's `vocab_size` embedding rows.

    """
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file() and not (path / "vocab.txt").is_file():
        raise BadInputError(
            f"tokenizer {path} is neither a tokenizer.json nor a folder holding "
            "tokenizer.json or vocab.txt."
        )
    # tokenizers reads the whole file; a real tokenizer.json is a few MiB.
    files.regular_file(file if file.is_file() else path / "vocab.txt", "tokenizer file",
                       max_bytes=MAX_TOKENIZER_BYTES)
    try:
        if file.is_file():
            tokenizer = tokenizers.Tokenizer.from_file(str(file))
        else:
            config = path / "tokenizer_config.json"
            settings = json.loads(config.read_text()) if config.is_file() else {}
            lowercase = bool(settings.get("do_lower_case", True))
            wordpiece = tokenizers.BertWordPieceTokenizer(
                str(path / "vocab.txt"), lowercase=lowercase
            )
            tokenizer = tokenizers.Tokenizer.from_str(wordpiece.to_str())
    except Exception as exc:  # tokenizers raises plain Exception on malformed files
        raise BadInputError(f"tokenizer {path} cannot be loaded ({_short(exc)}).") from exc
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab_size is not None and size > vocab_size:
        raise BadInputError(
            f"the tokenizer at {path} has {size} tokens but the model's embedding has only "
            f"{vocab_size} rows; pass the tokenizer the model was trained with."
        )
    if tokenizer.post_processor is None:
        logger.warning("tokenizer %s adds no special tokens such as [CLS]/[SEP]", path)
    return tokenizer


def build_calibration(
    path: str | Path | None,
    inputs: Sequence[ModelInputInfo],
    *,
    tokenizer: str | Path | None = None,
    vocab_size: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_samples: int = DEFAULT_SAMPLES,
    holdout_fraction: float = 0.25,
    seed: int = 0,
) -> CalibrationSet:
    """Build seeded fitting and holdout batches for the model `inputs` from a calibration file.

    Text is padded and truncated to `seq_len` when given (or when the model fixes the
    sequence dimension); otherwise texts are sorted by tokenized length and each batch is
    padded to its longest member. A model that fixes its batch dimension overrides
    `batch_size`. With `path=None` planer logs a warning and falls back to `random_feeds`.

    Raises:
        BadInputError: the file or tokenizer is unusable, or the calibration cannot provide
            an input the model declares.

    """
    if batch_size < 1 or max_samples < 1 or not 0 <= holdout_fraction < 1:
        raise BadInputError(
            "calibration needs batch_size >= 1, max_samples >= 1 and 0 <= holdout_fraction < 1."
        )
    if seq_len is not None and seq_len < 2:
        raise BadInputError(f"--seq-len {seq_len} is too short; use at least 2 tokens.")
    if seq_len is not None:
        _check_seq_len(inputs, seq_len)
    static = {i.shape[0] for i in inputs if i.shape and isinstance(i.shape[0], int)}
    fixed_batch = static.pop() if len(static) == 1 else None
    sampling = _Sampling(
        fixed_batch or batch_size, max_samples, holdout_fraction, seed, fixed_batch is not None
    )
    if path is None:
        return _random_set(inputs, seq_len, vocab_size, sampling)
    path = Path(path)
    if path.suffix.lower() == ".npz":
        return _npz_set(path, inputs, seq_len, vocab_size, sampling)
    return _text_set(path, inputs, tokenizer, vocab_size, seq_len, sampling)


def random_feeds(
    inputs: Sequence[ModelInputInfo], *, batch: int, seq_len: int, vocab_size: int | None, seed: int
) -> Feed:
    """Draw seeded random inputs: the documented fallback when no calibration file is given.

    With no calibration data planer uses these random inputs, which are fine for exactness
    checks (a rewrite must match the original on any input) and a poor basis for fitting
    (routers, predictors and statistics would learn noise). `input_ids` are uniform over
    [1000, vocab_size), ordinary word pieces in BERT-style vocabularies ([1, vocab_size)
    under 2000 rows, [1, 1000) when the vocabulary is unknown); `attention_mask` is all
    ones, `token_type_ids` zeros, `position_ids` 0..S-1, and float inputs such as
    `pixel_values` standard normal (symbolic image sides become 224).

    Raises:
        BadInputError: the model declares an integer input whose meaning planer cannot guess.

    """
    _check_seq_len(inputs, seq_len)
    rng = np.random.default_rng(seed)
    high = vocab_size if vocab_size is not None else 1000
    low = 1000 if high > 2000 else min(1, high - 1)
    feeds: Feed = {}
    for info in inputs:
        shape = _resolve_shape(info, batch, seq_len)
        array: np.ndarray
        if info.name == "input_ids":
            array = rng.integers(low, high, size=shape)
        elif info.name == "attention_mask":
            array = np.ones(shape)
        elif info.name == "token_type_ids":
            array = np.zeros(shape)
        elif info.name == "position_ids":
            array = np.broadcast_to(np.arange(shape[-1]), shape)
        elif info.dtype.kind == "f":
            array = rng.standard_normal(size=shape)
        else:
            raise BadInputError(
                f"planer cannot invent values for the model input {info.name!r}; pass "
                "--calibration with an .npz that holds it."
            )
        feeds[info.name] = np.ascontiguousarray(array).astype(info.dtype)
    return feeds


def _check_seq_len(inputs: Sequence[ModelInputInfo], seq_len: int) -> None:
    limit = min((i.max_len for i in inputs if i.max_len is not None), default=None)
    if limit is not None and seq_len > limit:
        raise BadInputError(sequence_too_long(limit, seq_len))


# --- text ------------------------------------------------------------------------------


def _text_set(
    path: Path,
    inputs: Sequence[ModelInputInfo],
    tokenizer: str | Path | None,
    vocab_size: int | None,
    seq_len: int | None,
    sampling: _Sampling,
) -> CalibrationSet:
    texts = read_texts(path)
    if tokenizer is None:
        raise BadInputError(
            f"calibration file {path} holds text; pass --tokenizer DIR so planer can turn it "
            "into input ids."
        )
    seq_len = _text_seq_len(inputs, seq_len)
    tok = load_tokenizer(tokenizer, vocab_size=vocab_size)
    fit, hold = ([texts[i] for i in rows] for rows in sampling.split(len(texts)))
    batches = _text_batches(fit, inputs, tok, seq_len, sampling)
    holdout = _text_batches(hold, inputs, tok, seq_len, sampling)
    shape = f"seq {seq_len}" if seq_len else "bucketed by length"
    source = f"{_shown(path)}: {len(fit) + len(hold)} texts, {shape}"
    logger.info("calibration %s (%d for fitting, %d held out)", source, len(fit), len(hold))
    return CalibrationSet(batches, holdout, source, texts=fit + hold)


def _text_seq_len(inputs: Sequence[ModelInputInfo], seq_len: int | None) -> int | None:
    """Check that text can feed every model input and settle the sequence length."""
    names = [info.name for info in inputs]
    if "input_ids" not in names:
        raise BadInputError(
            f"the model takes no input_ids (it takes {', '.join(names)}), so text calibration "
            "cannot feed it; pass an .npz of ready input tensors."
        )
    for name in names:
        if name not in TEXT_INPUTS:
            raise BadInputError(
                f"calibration text cannot provide the model input {name!r}; pass an .npz of "
                "ready input tensors that holds it."
            )
    ids = inputs[names.index("input_ids")]
    fixed = ids.shape[1] if len(ids.shape) > 1 and isinstance(ids.shape[1], int) else None
    if fixed is not None and seq_len is not None and fixed != seq_len:
        raise BadInputError(
            f"the model fixes the sequence length to {fixed}, so --seq-len {seq_len} cannot "
            f"be used; drop --seq-len or set it to {fixed}."
        )
    return seq_len or fixed


def _text_batches(
    texts: list[str],
    inputs: Sequence[ModelInputInfo],
    tok: tokenizers.Tokenizer,
    seq_len: int | None,
    sampling: _Sampling,
) -> list[Feed]:
    pad_id = int(tok.padding["pad_id"]) if tok.padding else _pad_token_id(tok)
    tok = tokenizers.Tokenizer.from_str(tok.to_str())  # padding is done below, per batch
    tok.no_padding()
    # The post-processor keeps room for [CLS]/[SEP] when truncating.
    longest = seq_len or (tok.truncation or {}).get("max_length") or DEFAULT_MAX_LEN
    limit = min((i.max_len for i in inputs if i.max_len is not None), default=longest)
    tok.enable_truncation(min(longest, limit))
    encodings = tok.encode_batch(texts) if texts else []
    if seq_len is None:  # length neighbours share a batch, so little padding is computed
        encodings.sort(key=lambda e: len(e.ids))
    batches = []
    for group in sampling.chunks(np.arange(len(encodings))):
        members = [encodings[i] for i in group]
        width = seq_len or max(len(e.ids) for e in members)
        ids = np.full((len(members), width), pad_id, dtype=np.int64)
        mask, types = np.zeros_like(ids), np.zeros_like(ids)
        for row, enc in enumerate(members):
            ids[row, : len(enc.ids)] = enc.ids
            mask[row, : len(enc.ids)] = 1
            types[row, : len(enc.ids)] = enc.type_ids
        positions = np.broadcast_to(np.arange(width), ids.shape)
        known = dict(zip(TEXT_INPUTS, (ids, mask, types, positions), strict=True))
        batches.append({i.name: known[i.name].astype(i.dtype) for i in inputs})
    return batches


def _pad_token_id(tok: tokenizers.Tokenizer) -> int:
    ids = (tok.token_to_id(token) for token in _PAD_TOKENS)
    return next((i for i in ids if i is not None), 0)


def _read_utf8(path: Path) -> str:
    data = files.read_bytes(path, "calibration file", max_bytes=MAX_TEXT_BYTES)
    try:
        content = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadInputError(f"calibration file {path} is not UTF-8 text.") from None
    if "\x00" in content:
        raise BadInputError(f"calibration file {path} is binary, not UTF-8 text.")
    return content


def _text_kind(path: Path, content: str) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "json"
    if suffix in (".tsv", ".csv", ".txt"):
        return suffix[1:]
    first = next((line for line in content.splitlines() if line.strip()), "")
    if first.lstrip().startswith("{"):
        return "json"
    return "tsv" if "\t" in first else "txt"


def _table_texts(content: str, kind: str) -> list[str]:
    buffer = io.StringIO(content)
    # TSV corpora hold bare '"' inside text (GLUE's SST-2 does), so TSV is never unquoted.
    reader = csv.reader(buffer, delimiter="\t", quoting=csv.QUOTE_NONE)
    rows = [row for row in (reader if kind == "tsv" else csv.reader(buffer)) if row]
    if rows and _is_header(rows):
        rows = rows[1:]
    return [row[0] for row in rows]


def _is_header(rows: list[list[str]]) -> bool:
    """Tell whether the first row names columns: a known text column, or text over labels."""
    if rows[0][0].strip().lower() in _HEADER_NAMES:
        return True
    labels = [row[1] for row in rows[1:51] if len(row) > 1]
    return (
        len(rows[0]) > 1
        and not _is_number(rows[0][1])
        and bool(labels)
        and all(_is_number(label) for label in labels)
    )


def _is_number(field: str) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return True


def _json_texts(path: Path, content: str) -> list[str]:
    texts = []
    for n, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        record = files.parse_json(line, f"line {n} of {path}")
        if isinstance(record, dict):
            record = record.get("text", next((record[k] for k in record if k in _HEADER_NAMES), 0))
        if not isinstance(record, str):
            raise BadInputError(f"record {n} of {path} has no string 'text' field.")
        texts.append(record)
    return texts


# --- tensors ---------------------------------------------------------------------------


def read_npz(path: str | Path, what: str) -> dict[str, np.ndarray]:
    """Reads every array of an .npz, or raises one sentence naming `what` and the path."""
    files.regular_file(Path(path), what, max_bytes=MAX_NPZ_BYTES)
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise BadInputError(f"{what} {path} does not exist.") from None
    except Exception as exc:  # zipfile, pickle and OS errors alike mean "unreadable"
        raise BadInputError(f"{what} {path} is not a readable .npz ({_short(exc)}).") from exc


def _npz_set(
    path: Path, inputs: Sequence[ModelInputInfo], seq_len: int | None, vocab_size: int | None,
    sampling: _Sampling,
) -> CalibrationSet:
    arrays = read_npz(path, "calibration file")
    expected = sorted(info.name for info in inputs)
    if sorted(arrays) != expected:
        raise BadInputError(
            f"calibration file {path} holds arrays {sorted(arrays)} but the model takes "
            f"inputs {expected}; name the arrays after the model inputs."
        )
    sizes = {array.shape[0] if array.ndim else 0 for array in arrays.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise BadInputError(
            f"the arrays in {path} must share one non-empty leading batch dimension."
        )
    feeds = {info.name: _check_array(path, info, arrays[info.name], seq_len) for info in inputs}
    if "input_ids" in feeds and vocab_size is not None:
        _check_token_ids(path, feeds["input_ids"], vocab_size)
    size = sizes.pop()
    batches, holdout = sampling.shares(feeds, size)
    source = f"{_shown(path)}: {min(size, sampling.max_samples)} samples"
    logger.info("calibration %s (%d batches held out)", source, len(holdout))
    return CalibrationSet(batches, holdout, source)


def _check_array(
    path: Path, info: ModelInputInfo, array: np.ndarray, seq_len: int | None
) -> np.ndarray:
    kinds = {"b": "int", "i": "int", "u": "int", "f": "float"}
    if kinds.get(array.dtype.kind) != kinds.get(info.dtype.kind):
        raise BadInputError(
            f"array {info.name!r} in {path} is {array.dtype} but the model input is {info.dtype}."
        )
    want = list(info.shape)
    if seq_len is not None and info.name in TEXT_INPUTS and len(want) > 1:
        want[1] = seq_len
    dims = zip(array.shape[1:], want[1:], strict=False)
    if array.ndim != len(want) or any(isinstance(w, int) and got != w for got, w in dims):
        shown = tuple("?" if not isinstance(w, int) else w for w in want)
        raise BadInputError(
            f"array {info.name!r} in {path} has shape {array.shape} but the model input "
            f"(with --seq-len) needs {shown}."
        )
    if info.max_len is not None and array.ndim > 1 and array.shape[1] > info.max_len:
        raise BadInputError(f"array {info.name!r} in {path} holds sequences of "
                            f"{array.shape[1]} tokens, but the model's position table holds "
                            f"{info.max_len} positions.")
    return array.astype(info.dtype)


def _check_token_ids(path: Path, ids: np.ndarray, vocab_size: int) -> None:
    """Refuses token ids the embedding cannot look up (ORT would fail deep inside a run)."""
    if ids.size == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise BadInputError(f"array 'input_ids' in {path} holds the token id {bad}, outside the "
                            f"model's vocabulary of {vocab_size} (ids 0 to {vocab_size - 1}).")


def _random_set(
    inputs: Sequence[ModelInputInfo],
    seq_len: int | None,
    vocab_size: int | None,
    sampling: _Sampling,
) -> CalibrationSet:
    seq, n = seq_len or DEFAULT_SEQ_LEN, sampling.max_samples
    source = f"random inputs (no calibration file): {n} samples, seq {seq}"
    logger.warning("%s; they suffice for exactness checks, not as a basis for fitting", source)
    # One draw for all samples, so the batch dimension is free here even if the model fixes it.
    free = [dataclasses.replace(i, shape=(None, *i.shape[1:])) for i in inputs]
    feeds = random_feeds(free, batch=n, seq_len=seq, vocab_size=vocab_size, seed=sampling.seed)
    batches, holdout = sampling.shares(feeds, n)
    return CalibrationSet(batches, holdout, source, synthetic=True)


def _resolve_shape(info: ModelInputInfo, batch: int, seq_len: int) -> tuple[int, ...]:
    shape = []
    for axis, dim in enumerate(info.shape):
        if isinstance(dim, int):
            shape.append(dim)
        elif axis == 0:
            shape.append(batch)
        elif info.name == "pixel_values":
            shape.append(3 if axis == 1 else _IMAGE_SIDE)
        else:
            shape.append(seq_len)
    return tuple(shape)


def _shown(path: Path) -> str:
    return "/".join(path.parts[-2:])


def _rows(feed: Feed) -> int:
    return int(next(iter(feed.values())).shape[0]) if feed else 0


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]
