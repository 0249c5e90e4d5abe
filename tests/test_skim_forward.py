"""Forwarding maps of token skimming: exact when neutral, applied to skimmed rows only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from planer.compiler.driver.pipeline import read_canonical
from planer.compiler.errors import PreconditionError
from planer.passes.skim_fit import capture_forward_data, fit_forward_map
from planer.passes.skim_forward import ForwardMap, weight_names
from planer.passes.token_skim import TokenSkimConfig, apply_token_skim
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


def test_two_points_tensorrt_matches_ort_with_maps(bert: Path, tmp_path: Path) -> None:
    maps = {0: random_map(4), 1: random_map(5)}
    paths = {low: skimmed(bert, TokenSkimConfig(keep={0: 0.7, 1: 0.5}, forward=maps,
                                                 predictors={0: random_predictor(WIDTH)},
                                                 lowering=low), tmp_path / f"{low}.onnx")
             for low in ("ort", "tensorrt")}
    feeds = padded_feeds([16, 10, 4], 16, seed=1)
    real = feeds["attention_mask"].astype(bool)
    a, b = (run_ort(paths[low], feeds) for low in ("ort", "tensorrt"))
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

