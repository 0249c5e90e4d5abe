"""Shared pytest fixtures: models (built and cached by planer.fixtures), goldens, ORT runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data"
# Tests that read the real text beside the repository (a user's clone has none of it).
needs_shared = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not beside "
                                  "the repository")


def _has_int8_dot_product() -> bool:
    """Whether the CPU has VNNI (or AMX) int8 dot products (Linux /proc/cpuinfo flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: assume the exact kernels and let the test speak
    flags = set(next((line for line in text.splitlines() if line.startswith("flags")),
                     "").split())
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


# Tests that replay ONNX Runtime's dynamic INT8 MatMuls exactly (int32 sums of u8·s8). On
# x86 CPUs without VNNI, ORT's AVX2 kernel sums u8·s8 pairs in saturating int16
# (vpmaddubsw), so its INT8 outputs differ from the exact replay (measured on a 2-core
# AMD EPYC with AVX2 only: block error 2.6e-6 against 1.2e-7 replayed).
needs_vnni = pytest.mark.skipif(not _has_int8_dot_product(), reason="this CPU has no VNNI: "
                                "ORT's AVX2 INT8 kernel saturates int16 pair sums, which "
                                "planer's exact INT8 replay does not model")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-goldens", action="store_true",
                     help="rewrite tests/golden/* from the current output")


# Fixtures that load a real model (MiniLM, paraphrase-MiniLM); tests using them are slow.
REAL_MODEL_FIXTURES = {"minilm_dynamo", "minilm_torchscript", "minilm_pair", "paraphrase_l3"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuses a test that loads a real model without `@pytest.mark.slow`.

    The default run (`-m "not slow"`) must stay quick; a test that forgets the mark would
    quietly make it slow, so the omission stops collection with the test's name.
    """
    unmarked = [item.nodeid for item in items
                if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ()))
                and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError("these tests load a real model but are not marked "
                                f"@pytest.mark.slow: {', '.join(unmarked)}")


@pytest.fixture
def update_goldens(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-goldens"))


@pytest.fixture
def golden(update_goldens: bool) -> Callable[[str, str], None]:
    """Checks text against tests/golden/NAME; a missing file fails, --update-goldens writes."""
    from tests.goldens import GOLDEN, check_golden

    def check(name: str, text: str) -> None:
        check_golden(GOLDEN / name, text, update=update_goldens)

    return check


@pytest.fixture(scope="session")
def minilm_dynamo() -> Path:
    from planer.fixtures.build import minilm_path

    return minilm_path("dynamo")


@pytest.fixture(scope="session")
def minilm_torchscript() -> Path:
    from planer.fixtures.build import minilm_path

    return minilm_path("torchscript")


def run_ort(path: Path | str, feeds: dict[str, np.ndarray], *, optimize: bool = False,
            threads: int = 1) -> list[np.ndarray]:
    """Runs a model in ORT; optimizations are off by default so ORT's fusions cannot hide a
    bad rewrite."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def text_feeds(*, batch: int, seq_len: int, vocab: int, seed: int = 0,
               pad_last: int = 0) -> dict[str, np.ndarray]:
    """Seeded token feeds; the last row gets `pad_last` padding positions."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, size=(batch, seq_len)).astype(np.int64)
    mask = np.ones((batch, seq_len), dtype=np.int64)
    if pad_last:
        mask[-1, -pad_last:] = 0
        ids[-1, -pad_last:] = 0
    return {"input_ids": ids, "attention_mask": mask,
            "token_type_ids": np.zeros((batch, seq_len), dtype=np.int64)}


def image_feeds(*, batch: int, size: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"pixel_values": rng.standard_normal((batch, 3, size, size)).astype(np.float32)}


def write_word_calibration(folder: Path) -> tuple[Path, Path]:
    """Writes seeded texts over a 40-word vocabulary plus a matching WordPiece vocab folder."""
    text = folder / "calib.txt"
    rng = np.random.default_rng(0)
    text.write_text("\n".join(" ".join(f"w{j}" for j in rng.integers(0, 40, rng.integers(4, 14)))
                              for _ in range(120)))
    vocab = folder / "tok"
    vocab.mkdir()
    (vocab / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] +
                                               [f"w{i}" for i in range(40)]) + "\n")
    return text, vocab


@pytest.fixture
def word_calibration(tmp_path: Path) -> tuple[Path, Path]:
    """Seeded texts over a 40-word vocabulary plus a matching WordPiece vocab folder."""
    return write_word_calibration(tmp_path)


def cnn_model(path: Path, seed: int = 0) -> Path:
    """Writes a small CNN (no Transformer layers) to `path`."""
    rng = np.random.default_rng(seed)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3],
                           rng.standard_normal(108).astype(np.float32))
    fc = helper.make_tensor("fc", TensorProto.FLOAT, [4, 2],
                            rng.standard_normal(8).astype(np.float32))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
         helper.make_node("Flatten", ["p"], ["f"], name="flat"),
         helper.make_node("MatMul", ["f", "fc"], ["y"], name="fc")],
        "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w, fc])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def masked_token_feeds(seq: int = 20) -> dict[str, np.ndarray]:
    """Two random token rows, the second padded over its last 6 positions."""
    rng = np.random.default_rng(4)
    mask = np.ones((2, seq), np.int64)
    mask[1, seq - 6:] = 0
    return {"input_ids": rng.integers(3, 1000, (2, seq)).astype(np.int64),
            "attention_mask": mask}


def run_torch_wrapper(wrapper: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Runs an export wrapper taking (input_ids, attention_mask) on numpy feeds."""
    import torch

    with torch.no_grad():
        return wrapper(*(torch.from_numpy(feeds[n]) for n in ("input_ids", "attention_mask")))\
            .numpy()
