"""Token skimming: exactness, forwarding, batching, lowerings, fitting, contracts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from planer.compiler.driver.pipeline import read_canonical, read_model
from planer.compiler.errors import PreconditionError
from planer.compiler.spec import model_flops
from planer.passes.skim_fit import (
    capture_skim_data,
    fit_predictor,
    skim_keep_for_flops,
    skimmed_flops,
)
from planer.passes.token_skim import (
    Predictor,
    TokenSkimConfig,
    active_masks,
    apply_token_skim,
    keep_count,
    stream_in,
)
from tests.conftest import needs_shared, run_ort, text_feeds


@pytest.fixture(scope="module")
def bert() -> Path:
    from planer.fixtures.build import fixture_path

    return fixture_path("bert", "dynamo")


def random_predictor(width: int, seed: int = 0) -> Predictor:
    rng = np.random.default_rng(seed)
    return Predictor(gamma=np.ones(width, np.float32), beta=np.zeros(width, np.float32),
                     w1=rng.standard_normal((width, 8)).astype(np.float32),
                     b1=np.zeros(8, np.float32), w2=rng.standard_normal(8).astype(np.float32),
                     b2=0.0)


def skimmed(path: Path, config: TokenSkimConfig, out: Path, *, expose: list[int] = ()) -> Path:
    """Writes the skimmed model; `expose` adds those layers' (full-length) inputs as outputs."""
    model, spec = read_canonical(path)
    inputs = [stream_in(spec.layers[i]) for i in expose]
    apply_token_skim(model, spec, config)
    for value in inputs:
        value.shape = ir.Shape([None, None, spec.hidden])
    model.graph.outputs.extend(inputs)
    for node in model.graph:  # the kept mask of each skim point, for the tests to read
        for value in node.outputs:
            if value.name.endswith("/skim/kept_BK_out"):
                value.type = ir.TensorType(ir.DataType.BOOL)
                value.shape = ir.Shape([None, None])
                model.graph.outputs.append(value)
    ir.save(model, out)
    onnx.checker.check_model(str(out), full_check=True)
    return out


def dense(path: Path, out: Path) -> Path:
    model, _ = read_canonical(path)
    ir.save(model, out)
    return out


def padded_feeds(lengths: list[int], seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    feeds = text_feeds(batch=len(lengths), seq_len=seq_len, vocab=1000, seed=seed)
    for row, n in enumerate(lengths):
        feeds["attention_mask"][row, n:] = 0
        feeds["input_ids"][row, n:] = 0
    return feeds


@pytest.mark.parametrize("lowering", ["ort", "tensorrt"])
def test_keep_all_reproduces_dense(bert: Path, tmp_path: Path, lowering: str) -> None:
    config = TokenSkimConfig(keep={0: 1.0, 1: 1.0}, predictors={0: random_predictor(64)},
                             lowering=lowering)
    path = skimmed(bert, config, tmp_path / "skim.onnx")
    feeds = padded_feeds([16, 11, 5], 16)
    want = run_ort(dense(bert, tmp_path / "dense.onnx"), feeds)[0]
    got = run_ort(path, feeds)[0]
    real = feeds["attention_mask"].astype(bool)
    # Padding positions leave at the first skim point (they hold its input); real ones match.
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("lowering", ["ort", "tensorrt"])
def test_skimmed_tokens_hold_their_state_where_they_left(bert: Path, tmp_path: Path,
                                                         lowering: str) -> None:
    config = TokenSkimConfig(keep={1: 0.5}, lowering=lowering)
    path = skimmed(bert, config, tmp_path / "skim.onnx", expose=[1])
    feeds = padded_feeds([16, 9], 16)
    out, layer_in, kept = run_ort(path, feeds)
    real = feeds["attention_mask"].astype(bool)
    assert kept.sum(1).tolist() == [keep_count(0.5, 16), keep_count(0.5, 9)]
    assert kept[:, 0].all(), "the first token is always kept"
    assert not (kept & ~real).any(), "padding is never kept"
    left = ~kept
    np.testing.assert_array_equal(out[left], layer_in[left])  # atol 0: pure plumbing


@pytest.mark.parametrize("lowering", ["ort", "tensorrt"])
def test_padded_batch_matches_each_sequence_alone(bert: Path, tmp_path: Path,
                                                  lowering: str) -> None:
    config = TokenSkimConfig(keep={0: 0.8, 1: 0.5}, predictors={0: random_predictor(64)},
                             lowering=lowering)
    path = skimmed(bert, config, tmp_path / "skim.onnx")
    lengths = [16, 7, 12, 3]
    feeds = padded_feeds(lengths, 16, seed=3)
    batched = run_ort(path, feeds)[0]
    for row, n in enumerate(lengths):
        single = {k: v[row : row + 1, :n] for k, v in feeds.items()}
        alone = run_ort(path, single)[0][0]
        # Same tokens, same slots; only the packed width (and so summation length) differs.
        np.testing.assert_allclose(batched[row, :n], alone, atol=1e-5, rtol=0)


def test_tensorrt_lowering_is_shape_computable_and_matches_ort(bert: Path,
                                                               tmp_path: Path) -> None:
    configs = {low: TokenSkimConfig(keep={0: 0.7, 1: 0.5}, predictors={0: random_predictor(64)},
                                    lowering=low) for low in ("ort", "tensorrt")}
    paths = {low: skimmed(bert, c, tmp_path / f"{low}.onnx") for low, c in configs.items()}
    trt = onnx.load(str(paths["tensorrt"]))
    ops = {n.op_type for n in trt.graph.node}
    assert "NonZero" not in ops
    assert all(not any(a.name == "reduction" for a in n.attribute)
               for n in trt.graph.node if n.op_type.startswith("Scatter"))
    assert "ScatterND" not in ops
    ort_ops = {n.op_type for n in onnx.load(str(paths["ort"])).graph.node}
    assert {"NonZero", "ScatterND"} <= ort_ops
    feeds = padded_feeds([16, 10, 4], 16, seed=1)
    real = feeds["attention_mask"].astype(bool)
    a, b = (run_ort(paths[low], feeds) for low in ("ort", "tensorrt"))
    np.testing.assert_array_equal(a[1], b[1])  # same tokens kept at both points
    np.testing.assert_array_equal(a[2], b[2])
    np.testing.assert_allclose(a[0][real], b[0][real], atol=1e-5, rtol=0)


def test_training_free_scores_before_layer0_are_refused(bert: Path) -> None:
    model, spec = read_canonical(bert)
    with pytest.raises(PreconditionError, match="layer 0 has none"):
        apply_token_skim(model, spec, TokenSkimConfig(keep={0: 0.5}))


def test_requires_canonical_attention(bert: Path) -> None:
    model, spec = read_model(bert)
    with pytest.raises(PreconditionError, match="run head pruning"):
        apply_token_skim(model, spec, TokenSkimConfig(keep={1: 0.5}))


def test_nodes_carry_provenance_and_names_are_deterministic(bert: Path) -> None:
    protos = []
    for _ in range(2):
        model, spec = read_canonical(bert)
        apply_token_skim(model, spec, TokenSkimConfig(keep={1: 0.5}))
        added = [n for n in model.graph if n.metadata_props.get("planer.pass") == "token_skim"]
        assert added and all(n.metadata_props.get("planer.block", "").startswith(
            ("layer1/skim", "skim")) for n in added)
        assert all(n.name.startswith(n.metadata_props["planer.block"] + "/") for n in added)
        protos.append(ir.to_proto(model).graph.SerializeToString())
    assert protos[0] == protos[1]


@pytest.mark.parametrize("lowering", ["ort", "tensorrt"])
def test_active_masks_are_found_by_provenance_not_names(bert: Path, lowering: str) -> None:
    model, spec = read_canonical(bert)
    apply_token_skim(model, spec, TokenSkimConfig(keep={0: 1.0, 1: 0.5}, lowering=lowering,
                                                  predictors={0: random_predictor(64)}))
    named = {v.name: v for n in model.graph for v in n.outputs}
    expected = {0: named["layer0/skim/active_next_out"], 1: named["layer1/skim/active_next_out"]}
    for i, node in enumerate(model.graph):  # names carry no meaning to the lookup
        node.name = f"n{i}"
        for j, value in enumerate(node.outputs):
            value.name = f"v{i}_{j}"
    masks = active_masks(model)
    assert masks.keys() == expected.keys()
    assert all(masks[i] is expected[i] for i in expected)


def test_predictor_fitting_reduces_its_loss(bert: Path) -> None:
    model, spec = read_canonical(bert)
    batches = [padded_feeds([16, 12, 9, 14], 16, seed=s) for s in range(6)]
    data = capture_skim_data(model, spec, [1], batches, target="attention")
    x, y = data[1]
    assert x.shape == (sum([16, 12, 9, 14]) * 6, 64) and y.shape == (x.shape[0],)
    predictor, (before, after), _ = fit_predictor(x, y, hidden=16, steps=200)
    assert after < 0.5 * before
    # The numpy scorer is what the graph computes (checked end to end above).
    assert predictor.score(x[:4]).shape == (4,)


def test_predictor_graph_scores_match_numpy(bert: Path, tmp_path: Path) -> None:
    predictor = random_predictor(64, seed=5)
    model, spec = read_canonical(bert)
    layer_in = stream_in(spec.layers[1])
    apply_token_skim(model, spec, TokenSkimConfig(keep={1: 0.5}, predictors={1: predictor}))
    score = next(v for n in model.graph for v in n.outputs
                 if v.name == "layer1/skim/predictor/score_BK_out")
    score.type = ir.TensorType(ir.DataType.FLOAT)
    score.shape = ir.Shape([None, None])
    model.graph.outputs.extend([layer_in, score])
    ir.save(model, tmp_path / "m.onnx")
    feeds = padded_feeds([16], 16)
    _, x, got = run_ort(tmp_path / "m.onnx", feeds)
    np.testing.assert_allclose(got, predictor.score(x.astype(np.float64)), atol=1e-4, rtol=1e-4)


def test_keep_ratios_for_a_flops_target(bert: Path) -> None:
    _, spec = read_canonical(bert)
    dense_flops = model_flops(spec, batch=1, seq_len=128)
    for mode in ("geometric", "single"):
        keep = skim_keep_for_flops(spec, 0.7, seq_len=128, mode=mode)
        assert keep[0] is None and keep[1] is not None
        assert skimmed_flops(spec, keep, seq_len=128) <= 0.7 * dense_flops
    assert skim_keep_for_flops(spec, 1.0, seq_len=128) == [None, None]
    assert TokenSkimConfig.from_plan([None, 0.5]).keep == {1: 0.5}
    assert TokenSkimConfig.from_plan([1.0, None]).keep == {}


def test_keep_count_is_robust_to_float_rounding() -> None:
    assert keep_count(0.3, 10) == 3
    assert keep_count(0.5, 9) == 5
    assert keep_count(0.01, 5) == 1


@needs_shared
@pytest.mark.slow
def test_minilm_skim_is_exact_when_neutral_and_close_at_half(minilm_dynamo: Path,
                                                             tmp_path: Path) -> None:
    from planer.compiler.calibration import load_tokenizer
    from planer.fixtures.build import minilm_tokenizer_dir
    from tests.conftest import DATA

    tok = load_tokenizer(minilm_tokenizer_dir())
    tok.no_padding()
    texts = [line.split("\t")[0] for line in
             (DATA / "sst2" / "dev.tsv").read_text().splitlines()[1:4]]
    ids = [e.ids for e in tok.encode_batch(texts)]
    feeds = padded_feeds([len(i) for i in ids], max(len(i) for i in ids))
    for row, seq in enumerate(ids):
        feeds["input_ids"][row, : len(seq)] = seq
    real = feeds["attention_mask"].astype(bool)
    want = run_ort(dense(minilm_dynamo, tmp_path / "dense.onnx"), feeds)[0]
    neutral = skimmed(minilm_dynamo, TokenSkimConfig(keep={2: 1.0}), tmp_path / "n.onnx")
    np.testing.assert_allclose(run_ort(neutral, feeds)[0][real], want[real], atol=1e-4, rtol=0)
    half = skimmed(minilm_dynamo, TokenSkimConfig(keep={2: 0.5}), tmp_path / "h.onnx")
    got = run_ort(half, feeds)[0]
    w = real[..., None]
    pooled = [((x * w).sum(1) / w.sum(1)) for x in (want, got)]
    cos = (pooled[0] * pooled[1]).sum(1) / np.linalg.norm(pooled[0], axis=1) / np.linalg.norm(
        pooled[1], axis=1)
    # Half the positions carry layer-2 states (forwarded), so pooled vectors move; see
    # benchmarks/bench_skim.py for quality. This pins the order of magnitude only.
    assert cos.min() > 0.5
