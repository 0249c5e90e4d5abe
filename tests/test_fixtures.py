"""Every fixture builds, loads in onnxruntime and reproduces its torch model."""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from planer.fixtures import build  # noqa: E402

TOL = 1e-4


@functools.cache
def _torch_model(family: str) -> torch.nn.Module:
    return build.build_torch_model(family)


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _torch_run(model: torch.nn.Module, inputs: tuple[str, ...], feed: dict) -> np.ndarray:
    with torch.no_grad():
        return model(*(torch.from_numpy(feed[name]) for name in inputs)).numpy()


def _op_counts(path: Path) -> Counter:
    model = onnx.load(str(path), load_external_data=False)
    return Counter(node.op_type for node in model.graph.node)


@pytest.mark.parametrize("exporter", build.EXPORTERS)
@pytest.mark.parametrize("family", build.FAMILIES)
def test_fixture_matches_torch(family: str, exporter: str) -> None:
    path = build.fixture_path(family, exporter)
    spec = build.FAMILY_SPECS[family]
    session = _session(path)
    assert [i.name for i in session.get_inputs()] == list(spec.inputs)
    assert [o.name for o in session.get_outputs()] == [build.OUTPUT_NAME]
    for graph_input in session.get_inputs():
        assert isinstance(graph_input.shape[0], str), "batch must be dynamic"
        if graph_input.name != "pixel_values":
            assert isinstance(graph_input.shape[1], str), "seq must be dynamic"
            assert graph_input.type == "tensor(int64)"

    feed = build.example_inputs(spec.inputs, batch=2, seq=12, seed=1)
    if "attention_mask" in feed:
        assert feed["attention_mask"][1].sum() < 12  # row 2 is padded
    got = session.run(None, feed)[0]
    want = _torch_run(_torch_model(family), spec.inputs, feed)
    assert got.shape == want.shape
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)

    # Another batch and length than the export's 2 x 16: the axes really are dynamic.
    feed = build.example_inputs(spec.inputs, batch=3, seq=20, seed=2)
    want = _torch_run(_torch_model(family), spec.inputs, feed)
    np.testing.assert_allclose(session.run(None, feed)[0], want, atol=TOL, rtol=0)


@pytest.mark.parametrize("exporter", build.EXPORTERS)
def test_fixture_meta_and_files(exporter: str) -> None:
    path = build.fixture_path("bert", exporter)
    meta = build.fixture_meta("bert", exporter)
    assert meta["family"] == "bert" and meta["exporter"] == exporter
    assert meta["config"]["layers"] == 2
    assert meta["config"]["heads"] == 4
    assert meta["config"]["hidden"] == 64
    assert meta["config"]["head_size"] == 16
    assert meta["config"]["ffn"] == 128
    assert meta["config"]["activation"] == "gelu"
    assert meta["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    model = onnx.load(str(path), load_external_data=False)
    assert model.ir_version <= build.MAX_IR_VERSION
    assert meta["files"] == sorted(p.name for p in path.parent.iterdir() if p.name != "meta.json")
    if exporter == "dynamo":
        assert meta["opset"] == build.DYNAMO_OPSET
        assert (path.parent / "model.onnx.data").is_file()
    else:
        assert meta["opset"] == build.TORCHSCRIPT_OPSET


@pytest.mark.parametrize("exporter", build.EXPORTERS)
def test_activation_variants(exporter: str) -> None:
    assert build.fixture_meta("bert-relu", exporter)["config"]["activation"] == "relu"
    assert "Relu" in _op_counts(build.fixture_path("bert-relu", exporter))
    assert build.fixture_meta("bert-gelu-tanh", exporter)["config"]["activation"] == "gelu_new"
    assert "Tanh" in _op_counts(build.fixture_path("bert-gelu-tanh", exporter))
    assert "Erf" in _op_counts(build.fixture_path("bert", exporter))


@pytest.mark.parametrize("exporter", build.EXPORTERS)
def test_fresh_init_is_not_degenerate(exporter: str) -> None:
    # With HF's init (zero biases, LayerNorm 1/0) the exporters drop the zero biases and
    # merge identical initializers; the builder perturbs them so graphs look trained.
    for family in ("bert", "gpt2"):
        model = onnx.load(str(build.fixture_path(family, exporter)), load_external_data=False)
        norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
        assert len({n.input[1] for n in norms}) == len(norms) == 5
        assert all(len(n.input) == 3 for n in model.graph.node if n.op_type == "Gemm")


def test_same_weights_every_build() -> None:
    a = build.build_torch_model("bert").state_dict()
    b = build.build_torch_model("bert").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown fixture family"):
        build.fixture_path("t5")
    with pytest.raises(ValueError, match="unknown exporter"):
        build.fixture_path("bert", "tflite")


def test_failed_build_leaves_no_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANER_CACHE_DIR", str(tmp_path))

    def crash(folder: Path) -> dict:
        (folder / build.MODEL_FILE).write_bytes(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        build._cached_build("x", "dynamo", crash)
    root = tmp_path / "fixtures"
    assert [p for p in root.iterdir() if not p.name.endswith(".lock")] == []

    calls = []

    def ok(folder: Path) -> dict:
        calls.append(folder)
        (folder / build.MODEL_FILE).write_bytes(b"model")
        return {"family": "x"}

    first = build._cached_build("x", "dynamo", ok)
    second = build._cached_build("x", "dynamo", ok)
    assert first == second and len(calls) == 1
    assert json.loads((first / build.META_FILE).read_text())["files"] == [build.MODEL_FILE]
    # An entry without meta.json (an interrupted copy, say) is rebuilt, not trusted.
    (first / build.META_FILE).unlink()
    assert build._cached_build("x", "dynamo", ok) == first and len(calls) == 2
    assert not any(p.name.startswith((".tmp-", ".stale-")) for p in root.iterdir())


@pytest.mark.slow
def test_paraphrase_l3_loads() -> None:
    try:
        path = build.paraphrase_l3_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    assert path.name == "paraphrase-MiniLM-L3-v2.onnx" and path.is_file()
    names = [i.name for i in _session(path).get_inputs()]
    assert "input_ids" in names and "attention_mask" in names


def test_minilm_tokenizer_dir() -> None:
    try:
        folder = build.minilm_tokenizer_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    assert (folder / "tokenizer.json").is_file()
    assert (folder / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("exporter", build.EXPORTERS)
def test_minilm_matches_torch(exporter: str) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    try:
        folder = build.minilm_tokenizer_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    path = build.minilm_path(exporter)
    meta = build.fixture_meta("minilm", exporter)
    assert meta["config"]["layers"] == 6 and meta["config"]["hidden"] == 384
    opset = build.DYNAMO_OPSET if exporter == "dynamo" else build.TORCHSCRIPT_OPSET
    assert meta["opset"] == opset

    tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_padding()
    encodings = tokenizer.encode_batch(
        ["A man is playing a guitar on the stage tonight.", "A short one."]
    )
    feed = {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }
    assert feed["attention_mask"][1].sum() < feed["attention_mask"].shape[1]
    got = _session(path).run(None, feed)[0]
    model = build.build_minilm_torch_model()
    want = _torch_run(model, ("input_ids", "attention_mask", "token_type_ids"), feed)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_cli_prints_paths(capsys: pytest.CaptureFixture[str]) -> None:
    assert build.main(["--family", "bert", "--exporter", "torchscript"]) == 0
    out = capsys.readouterr().out
    assert str(build.fixture_path("bert", "torchscript")) in out
    assert os.path.basename(str(build.fixture_path("bert", "torchscript"))) == "model.onnx"


def test_export_failure_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANER_CACHE_DIR", str(tmp_path))

    def broken(*args: object) -> None:
        raise TypeError("unsupported op")

    monkeypatch.setattr(build, "_export", broken)
    with pytest.raises(RuntimeError, match="'vit' with the torchscript exporter.*unsupported op"):
        build.fixture_path("vit", "torchscript")
    assert not [p for p in (tmp_path / "fixtures").iterdir() if not p.name.endswith(".lock")]
