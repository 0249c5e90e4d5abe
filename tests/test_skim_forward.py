"""Forwarding maps of token skimming: exact when neutral, applied to skimmed rows only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from planer.compiler.capture import ActivationReader
from planer.compiler.driver.pipeline import read_canonical
from planer.compiler.errors import PreconditionError
from planer.passes.skim_fit import (
    capture_forward_data,
    fit_context_map,
    fit_forward_map,
    skim_decisions,
)
from planer.passes.skim_forward import ForwardMap, context_name, weight_names
from planer.passes.token_skim import TokenSkimConfig, apply_token_skim, stream_in
from tests.conftest import run_ort
from tests.test_token_skim import dense, padded_feeds, random_predictor, skimmed

WIDTH = 64  # the bert fixture's


@pytest.fixture(scope="module")
def bert() -> Path:
    from planer.fixtures.build import fixture_path

    return fixture_path("bert", "dynamo")


def random_map(seed: int) -> ForwardMap:
    """Far from the identity: a wrong placement of the map shows at every row it reaches."""
    rng = np.random.default_rng(seed)
    w = np.eye(WIDTH) + rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)
    return ForwardMap(w.astype(np.float32), rng.standard_normal(WIDTH).astype(np.float32))


@pytest.mark.parametrize("lowering", ["ort", "tensorrt"])
def test_keep_all_with_maps_reproduces_dense(bert: Path, tmp_path: Path, lowering: str) -> None:
    # Every real token is kept, so no real row may pass through a map: a graph mapping the
    # kept rows (or all rows) fails here.
    config = TokenSkimConfig(keep={0: 1.0, 1: 1.0}, predictors={0: random_predictor(WIDTH)},
                             forward={0: random_map(1), 1: random_map(2)}, lowering=lowering)
    path = skimmed(bert, config, tmp_path / "skim.onnx")
    feeds = padded_feeds([16, 11, 5], 16)
    want = run_ort(dense(bert, tmp_path / "dense.onnx"), feeds)[0]
    got = run_ort(path, feeds)[0]
    real = feeds["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)
    # Padding leaves at the first point and carries its map.
    names = {n.op_type for n in ir.load(path).graph if "/forward/" in (n.name or "")}
    assert names == {"MatMul", "Add"}


@pytest.mark.parametrize("lowering", ["ort", "tensorrt"])
def test_skimmed_rows_carry_the_map_of_their_point(bert: Path, tmp_path: Path,
                                                   lowering: str) -> None:
    fmap = random_map(3)
    plain = skimmed(bert, TokenSkimConfig(keep={1: 0.5}, lowering=lowering), tmp_path / "a.onnx",
                    expose=[1])
    mapped = skimmed(bert, TokenSkimConfig(keep={1: 0.5}, forward={1: fmap}, lowering=lowering),
                     tmp_path / "b.onnx", expose=[1])
    feeds = padded_feeds([16, 9], 16)
    (out, layer_in, kept), (out_a, _, kept_a) = run_ort(mapped, feeds), run_ort(plain, feeds)
    real = feeds["attention_mask"].astype(bool)
    np.testing.assert_array_equal(kept, kept_a)  # the map changes no decision
    left = ~kept & real
    np.testing.assert_allclose(out[left], fmap.apply(layer_in[left].astype(np.float64)),
                               atol=1e-4, rtol=1e-5)
    np.testing.assert_array_equal(out[kept], out_a[kept])  # kept rows untouched


def two_point_lowerings(bert: Path, tmp_path: Path, maps: dict[int, ForwardMap],
                        ) -> tuple[dict[str, Path], list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Skims before layers 0 (0.7) and 1 (0.5) with `maps`, in both lowerings; returns the
    paths, each one's outputs on padded feeds, and the real-token mask."""
    paths = {low: skimmed(bert, TokenSkimConfig(keep={0: 0.7, 1: 0.5}, forward=maps,
                                                 predictors={0: random_predictor(WIDTH)},
                                                 lowering=low), tmp_path / f"{low}.onnx")
             for low in ("ort", "tensorrt")}
    feeds = padded_feeds([16, 10, 4], 16, seed=1)
    a, b = (run_ort(paths[low], feeds) for low in ("ort", "tensorrt"))
    return paths, a, b, feeds["attention_mask"].astype(bool)


def test_two_points_tensorrt_matches_ort_with_maps(bert: Path, tmp_path: Path) -> None:
    _, a, b, real = two_point_lowerings(bert, tmp_path, {0: random_map(4), 1: random_map(5)})
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[0][real], b[0][real], atol=1e-4, rtol=0)


def test_map_weights_are_named_by_point_and_nodes_carry_provenance(bert: Path) -> None:
    protos = []
    for _ in range(2):
        model, spec = read_canonical(bert)
        apply_token_skim(model, spec, TokenSkimConfig(keep={1: 0.5}, forward={1: random_map(6)}))
        w, b = weight_names(1)
        assert (w, b) == ("layer1/skim/forward/w", "layer1/skim/forward/b")
        for name in (w, b):
            readers = model.graph.initializers[name].consumers()
            assert len(readers) == 1
            node = readers[0]
            assert node.metadata_props["planer.pass"] == "token_skim"
            assert node.name.startswith(node.metadata_props["planer.block"] + "/")
        protos.append(ir.to_proto(model).graph.SerializeToString())
    assert protos[0] == protos[1]


def test_a_map_without_its_skim_point_is_refused(bert: Path) -> None:
    model, spec = read_canonical(bert)
    with pytest.raises(PreconditionError, match="forwarding map of layer 0"):
        apply_token_skim(model, spec, TokenSkimConfig(keep={1: 0.5}, forward={0: random_map(7)}))


def test_ridge_fit_recovers_a_linear_map_and_beats_forwarding_as_is() -> None:
    rng = np.random.default_rng(0)
    truth = random_map(8)
    x = rng.standard_normal((4000, WIDTH))
    y = truth.apply(x) + 0.05 * rng.standard_normal((4000, WIDTH))
    fmap, record = fit_forward_map(x[:3000], y[:3000], x[3000:], y[3000:])
    assert record["linear_error"] < 0.01 < record["identity_error"]
    np.testing.assert_allclose(fmap.w, truth.w, atol=0.02)


def test_forward_data_pairs_layer_inputs_with_final_rows(bert: Path, tmp_path: Path) -> None:
    model, spec = read_canonical(bert)
    feeds = [padded_feeds([16, 7], 16, seed=2)]
    x, y = capture_forward_data(model, spec, [1], feeds)[1]
    assert x.shape == y.shape == (16 + 7 - 2, WIDTH)  # real tokens, the first of each not
    want = run_ort(dense(bert, tmp_path / "d.onnx"), feeds[0])[0]
    mask = feeds[0]["attention_mask"].astype(bool)
    mask[:, 0] = False
    np.testing.assert_allclose(y, want[mask], atol=1e-5)



# ---------------------------------------------------------------- context term


def context_map(seed: int, *, v_scale: float = 1.0) -> ForwardMap:
    """A map whose context weight is far from zero (a context read wrong shows everywhere)."""
    base = random_map(seed)
    v = np.random.default_rng(seed + 100).standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)
    return ForwardMap(base.w, base.b, (v_scale * v).astype(np.float32))


def kept_mean(out: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """The context per sequence: the mean final row over the tokens kept to the end."""
    weights = kept[..., None].astype(np.float64)
    return (out.astype(np.float64) * weights).sum(1) / weights.sum(1)


@pytest.mark.parametrize("lowering", ["ort", "tensorrt"])
def test_skimmed_rows_read_their_own_sequences_kept_mean(bert: Path, tmp_path: Path,
                                                         lowering: str) -> None:
    fmap = context_map(9)
    path = skimmed(bert, TokenSkimConfig(keep={1: 0.5}, forward={1: fmap}, lowering=lowering),
                   tmp_path / "c.onnx", expose=[1])
    feeds = padded_feeds([16, 9, 5], 16)
    out, layer_in, kept = run_ort(path, feeds)
    real = feeds["attention_mask"].astype(bool)
    left = ~kept & real
    context = kept_mean(out, kept)[np.nonzero(left)[0]]  # each row its own sequence's
    np.testing.assert_allclose(out[left], fmap.apply(layer_in[left].astype(np.float64), context),
                               atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="pass context"):
        fmap.apply(layer_in[left])


@pytest.mark.parametrize("lowering", ["ort", "tensorrt"])
def test_a_zero_context_weight_is_the_linear_map(bert: Path, tmp_path: Path,
                                                 lowering: str) -> None:
    linear = random_map(10)
    zero = context_map(10, v_scale=0.0)
    feeds = padded_feeds([16, 12], 16, seed=3)
    a, b = (run_ort(skimmed(bert, TokenSkimConfig(keep={1: 0.5}, forward={1: m},
                                                  lowering=lowering), tmp_path / f"{i}.onnx"),
                    feeds)[0] for i, m in enumerate((linear, zero)))
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_two_points_with_context_tensorrt_matches_ort(bert: Path, tmp_path: Path) -> None:
    paths, a, b, real = two_point_lowerings(bert, tmp_path,
                                            {0: context_map(11), 1: context_map(12)})
    np.testing.assert_allclose(a[0][real], b[0][real], atol=1e-4, rtol=0)
    model = ir.load(paths["ort"])
    for layer in (0, 1):
        readers = model.graph.initializers[context_name(layer)].consumers()
        assert [n.metadata_props["planer.pass"] for n in readers] == ["token_skim"]


def test_numpy_keep_rule_is_the_graphs(bert: Path, tmp_path: Path) -> None:
    # fit_context chooses its fitting rows with skim_decisions; they must be the graph's.
    predictors = {0: random_predictor(WIDTH, seed=1), 1: random_predictor(WIDTH, seed=2)}
    keep = {0: 0.7, 1: 0.5}
    path = skimmed(bert, TokenSkimConfig(keep=keep, predictors=predictors), tmp_path / "k.onnx")
    feeds = padded_feeds([16, 10, 4, 13], 16, seed=4)
    kept = run_ort(path, feeds)[1:]
    model, spec = read_canonical(bert)
    reader = ActivationReader(model, [stream_in(spec.layers[0])])
    x0 = reader.run(feeds)[reader.names[0]].astype(np.float64)
    # Layer 1's input differs once tokens are gone; the first point's decision is exact.
    skims, final = skim_decisions({0: x0, 1: x0}, feeds["attention_mask"].astype(bool),
                                  {0: 0.7}, predictors)
    np.testing.assert_array_equal(final, kept[0])
    assert (skims[0] == (feeds["attention_mask"].astype(bool) & ~kept[0])).all()


def test_context_fit_recovers_a_context_map_and_keeps_linear_when_context_adds_nothing() -> None:
    rng = np.random.default_rng(0)
    truth = context_map(13)
    x, c = rng.standard_normal((5000, WIDTH)), rng.standard_normal((5000, WIDTH))
    y = truth.apply(x, c) + 0.05 * rng.standard_normal((5000, WIDTH))
    split = ((x[:4000], c[:4000], y[:4000]), (x[4000:], c[4000:], y[4000:]))
    fmap, record = fit_context_map(*split)
    assert record["kept"] == "context" and record["context_error"] < 0.01 < record["linear_error"]
    assert fmap.v is not None
    np.testing.assert_allclose(fmap.v, truth.v, atol=0.03)
    # y independent of c: the context term can only fit noise, the linear map is kept.
    y = random_map(14).apply(x)
    _, record = fit_context_map((x[:4000], c[:4000], y[:4000]), (x[4000:], c[4000:], y[4000:]))
    assert record["kept"] == "linear"


def test_a_point_that_skims_nothing_keeps_its_fallback_map(bert: Path) -> None:
    # One real token per text: [CLS] is always kept, so no row is skimmed to fit on.
    from planer.passes.skim_fit import fit_context

    model, spec = read_canonical(bert)
    feeds = [padded_feeds([1, 1], 16, seed=5)]
    fallback = {1: random_map(15)}
    maps, records = fit_context(model, spec, {1: 0.5}, {1: random_predictor(WIDTH)}, feeds,
                                feeds, fallback=fallback)
    assert maps[1] is fallback[1] and records[1] == {"kept": "linear", "rows": 0}
