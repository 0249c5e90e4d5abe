"""Data multiplexing (passes.mux, recovery.mux) on tiny fixtures: exact cases, padding, training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from planer.compiler.driver.cli import main
from planer.compiler.driver.pipeline import (
    CompileResult,
    compile_plan,
    finish_graph,
    read_canonical,
)
from planer.compiler.errors import BadInputError, UnsupportedModelError
from planer.compiler.loading import load_model
from planer.compiler.names import PROVENANCE_PASS, PassName
from planer.compiler.plan import parse_plan
from planer.compiler.targets import check_ops
from planer.fixtures.build import fixture_path
from planer.passes.mux import DemuxWeights, MuxConfig, apply_mux, multiplex
from tests.conftest import run_ort, write_word_calibration

SOURCE = fixture_path("bert", "dynamo")


def _feeds(rows: int, seed: int = 0, seq: int = 9) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = seq - rng.integers(0, 4, rows)  # uneven: the group's mask is their union
    mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int64)
    return {"input_ids": rng.integers(4, 44, (rows, seq)), "attention_mask": mask,
            "token_type_ids": np.zeros((rows, seq), np.int64)}


def _mux_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.metadata_props.get(PROVENANCE_PASS) == PassName.MUX]


def _save(model: ir.Model, path: Path) -> Path:
    finish_graph(model)
    ir.save(model, path)
    return path


def test_n1_emits_nothing_and_is_exact(tmp_path: Path) -> None:
    model, spec = read_canonical(SOURCE)
    before = _save(model, tmp_path / "before.onnx")
    model, spec = read_canonical(SOURCE)
    assert apply_mux(model, spec, MuxConfig(n=1)) == 0
    assert not _mux_nodes(model)
    after = _save(model, tmp_path / "after.onnx")
    feeds = _feeds(3)
    np.testing.assert_array_equal(run_ort(before, feeds)[0], run_ort(after, feeds)[0])


@pytest.mark.parametrize("n", [2, 4])
def test_exact_mux_then_demux_recovers_the_instances(tmp_path: Path, n: int) -> None:
    """Identity backbone, keys N·1[block i] (orthogonal), instances tile(z_i) with z_i ≥ 0.

    The mixture's block i is z_i; slot i's demux opens only block i (b1 = -M elsewhere),
    W1h = I, and W2 tiles block i into every block: slot i returns tile(z_i) = x_i.
    """
    width, block, big = 8, 8 // n, 1e3
    blocks = np.arange(width) // block
    keys = np.stack([n * (blocks == i) for i in range(n)]).astype(np.float32)
    w2 = np.tile(np.eye(block, dtype=np.float32), (n, n))  # [D, D]: block j -> every block
    # Slot i's c_i = p_i·w1p + b1 must be 0 on block i and -big elsewhere: p_i = e_i and
    # w1p row i = -big outside block i.
    w1p = np.stack([-big * (blocks != i) for i in range(n)]).astype(np.float32)
    demux = DemuxWeights(w1h=np.eye(width, dtype=np.float32), w1p=w1p,
                         instances=np.eye(n, dtype=np.float32), b1=np.zeros(width, np.float32),
                         w2=w2, b2=np.zeros(width, np.float32))
    x = ir.Value(name="x", shape=ir.Shape(["batch", "seq", width]),
                 type=ir.TensorType(ir.DataType.FLOAT))
    middle = ir.node("Identity", [x], name="backbone0")
    end = ir.node("Identity", [middle.outputs[0]], name="backbone1")
    end.outputs[0].name, end.outputs[0].shape = "y", ir.Shape(["batch", "seq", width])
    end.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], [end.outputs[0]], nodes=[middle, end], name="identity",
                     opset_imports={"": 18})
    model = ir.Model(graph, ir_version=9)
    multiplex(model, x, end.outputs[0], MuxConfig(n=n, keys=keys, demux=demux), last_layer=0)
    path = tmp_path / "exact.onnx"
    ir.save(model, path)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    rng = np.random.default_rng(0)
    for rows in (1, n, 2 * n + 1):
        z = rng.uniform(0.0, 5.0, (rows, 3, block)).astype(np.float32)
        xs = np.tile(z, (1, 1, n))
        (got,) = run_ort(path, {"x": xs})
        np.testing.assert_array_equal(got, xs)  # exact: powers of two and zeros only
    assert not check_ops(model, "tensorrt")


def test_mux_nodes_fit_tensorrt_and_interface_is_unchanged(tmp_path: Path) -> None:
    model, spec = read_canonical(SOURCE)
    original = [(v.name, v.dtype, [str(d) for d in v.shape]) for v in
                [*model.graph.inputs, *model.graph.outputs]]
    assert apply_mux(model, spec, MuxConfig(n=2)) == 1
    ops = {n.op_type for n in _mux_nodes(model)}
    assert {"Mul", "ReduceMean", "ReduceMax", "MatMul", "Relu", "Slice"} <= ops
    assert all(n.metadata_props.get("planer.block") in ("layer0/mux", "layer1/demux")
               for n in _mux_nodes(model))
    problems = [p for p in check_ops(model, "tensorrt")
                if any(repr(n.name) in p for n in _mux_nodes(model))]
    assert not problems
    path = _save(model, tmp_path / "mux.onnx")
    onnx.checker.check_model(onnx.load(path), full_check=True)
    written = load_model(path)
    assert [(v.name, v.dtype, [str(d) for d in v.shape]) for v in
            [*written.graph.inputs, *written.graph.outputs]] == original
    for rows in (1, 2, 5):
        (out,) = run_ort(path, _feeds(rows))
        assert out.shape == (rows, 9, spec.hidden) and np.isfinite(out).all()
    with pytest.raises(UnsupportedModelError, match="already multiplexed"):
        apply_mux(model, spec, MuxConfig(n=2))


def test_mux_needs_recovery_and_a_valid_width(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(BadInputError, match="--recover"):
        compile_plan(SOURCE, tmp_path / "out", mux=2)
    assert main(["compile", str(SOURCE), "-o", str(tmp_path / "cli"), "--mux", "2"]) == 2
    assert "--recover" in capsys.readouterr().err and not (tmp_path / "cli").exists()
    _, spec = read_canonical(SOURCE)
    neutral = {"layers": [{} for _ in spec.layers]}
    assert parse_plan({**neutral, "mux": 4}, spec).mux == 4
    assert parse_plan(neutral, spec).to_dict().get("mux") is None
    for bad in (3, True, "2"):
        with pytest.raises(BadInputError, match="mux"):
            parse_plan({**neutral, "mux": bad}, spec)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> CompileResult:
    """`compile --mux 2 --recover-steps 150` on the bert fixture and seeded word text."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("mux")
    text, vocab = write_word_calibration(folder)
    return compile_plan(SOURCE, folder / "out", calibration=text, tokenizer=vocab, seq_len=32,
                        mux=2, recover_steps=150, ort_kernels="off")


def _pooled(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    return (x * m).sum(1) / m.sum(1)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_training_separates_instances_and_writes_back(trained: CompileResult) -> None:
    recovery = trained.report["recovery"]
    assert recovery["mirror_max_abs_diff"] <= 1e-4 and recovery["written_max_abs_diff"] <= 1e-4
    assert trained.plan.mux == 2 and trained.report["mux"]["n"] == 2
    before = recovery["fidelity_before"]["pooled_cosine"]
    after = recovery["fidelity_after"]["pooled_cosine"]
    assert before < 0.5 < 0.9 < after  # an untrained demux is garbage; training separates
    model = load_model(trained.model_path)
    w2 = model.graph.initializers["layer1/demux/w2"].const_value.numpy()  # type: ignore
    assert not np.allclose(w2, np.eye(*w2.shape), atol=1e-3)  # the demux was trained
    assert recovery["trained_tensors"] > 6  # the backbone's weights and the demux's six


def test_padded_batch_of_5_returns_5_rows_as_if_alone(trained: CompileResult) -> None:
    path = trained.model_path
    five = _feeds(5, seed=3)
    (got,) = run_ort(path, five)
    assert got.shape[0] == 5
    # The padded row repeats the last one: the same as a batch of 6 whose row 5 is row 4.
    six = {k: np.concatenate([v, v[4:5]]) for k, v in five.items()}
    (padded,) = run_ort(path, six)
    np.testing.assert_allclose(got, padded[:5], rtol=0, atol=1e-6)
    # Rows of full groups do not depend on other groups (row 4's partner swapped out).
    other = {k: np.concatenate([v[:4], _feeds(1, seed=9)[k]]) for k, v in five.items()}
    (swapped,) = run_ort(path, other)
    np.testing.assert_allclose(got[:4], swapped[:4], rtol=0, atol=1e-6)
    # Each row close to the original run on that instance alone (after 150 tiny steps).
    alone = np.concatenate([run_ort(SOURCE, {k: v[i:i + 1] for k, v in five.items()})[0]
                            for i in range(5)])
    mask = five["attention_mask"]
    assert _cosine(_pooled(got, mask), _pooled(alone, mask)).min() > 0.85
